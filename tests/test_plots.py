import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import plots  # noqa: E402


def test_a_chart_is_described_by_its_titles():
    curve = pd.DataFrame({"customer_share": [0.0, 0.5, 1.0], "value_share": [0.0, 0.8, 1.0]})
    fig = plots.plot_pareto(curve)
    assert plots.describe_figure(fig) == "How concentrated is revenue?"
    fig, axes = plt.subplots(1, 2)
    fig.suptitle("Over the runs")
    axes[0].set_title("churn rate")
    axes[1].set_title("revenue")
    assert plots.describe_figure(fig) == "Over the runs: churn rate, revenue"
    assert plots.describe_figure(plt.figure()) == "Chart"
    plt.close("all")


def test_a_chart_shows_its_title_as_its_text_form_in_ipython():
    """What a notebook stores beside the image, and the reports' alternative text."""
    from IPython.lib.pretty import pretty

    curve = pd.DataFrame({"customer_share": [0.0, 1.0], "value_share": [0.0, 1.0]})
    assert pretty(plots.plot_pareto(curve)) == "How concentrated is revenue?"
    plt.close("all")
