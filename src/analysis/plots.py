"""Charts. Each function takes a computed frame, draws it, and returns the figure.

Nothing here computes a number the report relies on, and nothing saves a file. One
theme for every chart (:func:`set_theme`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis.explain import FEATURE_LABELS
from analysis.segments import (
    STAGE_ACTIVE,
    STAGE_AT_RISK,
    STAGE_LAPSED,
    STAGE_LOST,
    STAGE_NEW,
    TIER_HIGH,
    TIER_LOW,
    TIER_MID,
    VALUE_TIERS,
)

__all__ = [
    "PALETTE",
    "close",
    "TIER_COLORS",
    "describe_figure",
    "plot_beeswarm",
    "plot_calibration",
    "plot_dependence",
    "plot_drivers",
    "plot_gain_curves",
    "plot_history",
    "plot_value_deciles",
    "plot_cohort_heatmap",
    "plot_lifecycle",
    "plot_monthly_orders",
    "plot_pareto",
    "plot_profit_curve",
    "plot_quarantine",
    "plot_segments",
    "plot_survival",
    "plot_tenure_cohorts",
    "plot_tiers",
    "plot_trend",
    "set_theme",
]

PALETTE = ["#1f4e79", "#2e86c1", "#85c1e9", "#f39c12", "#c0392b", "#7f8c8d", "#27ae60",
           "#8e44ad", "#16a085", "#d35400", "#34495e"]
TIER_COLORS = {TIER_HIGH: "#1f4e79", TIER_MID: "#2e86c1", TIER_LOW: "#aed6f1"}
STAGE_COLORS = {STAGE_NEW: "#27ae60", STAGE_ACTIVE: "#1f4e79", STAGE_AT_RISK: "#f39c12",
                STAGE_LAPSED: "#d35400", STAGE_LOST: "#7f8c8d"}


def set_theme() -> None:
    """The one look of every chart."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE,
                  rc={"figure.dpi": 96, "savefig.dpi": 96, "axes.titleweight": "bold",
                      "axes.titlesize": 12, "axes.spines.right": False,
                      "axes.spines.top": False, "figure.autolayout": True})


def close(fig: Figure) -> None:
    """Forget a shown chart (pyplot keeps every open figure, and a notebook shows those
    still open at the end of a cell)."""
    plt.close(fig)


def describe_figure(fig: Figure) -> str:
    """A chart in words, from its titles: the figure's title, then its axes' titles
    (``"Over the runs: active customers, revenue 12m"``); ``"Chart"`` when untitled."""
    suptitle = fig.get_suptitle().strip()
    titles = [t for ax in fig.axes if (t := ax.get_title().strip())]
    if suptitle and titles:
        return f"{suptitle}: {', '.join(titles)}"
    return suptitle or "; ".join(titles) or "Chart"


class _Chart(Figure):
    """A figure whose text form in IPython is :func:`describe_figure` rather than
    ``<Figure size ... with 1 Axes>``: a notebook stores it beside the chart's image,
    and the rendered reports use it as the image's alternative text."""

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(describe_figure(self))


def _axes(ax=None, size=(7, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, FigureClass=_Chart)
    return ax.figure, ax


def plot_pareto(curve: pd.DataFrame, *, value_label: str = "revenue", ax=None) -> Figure:
    """Pareto curve from :func:`analysis.segments.pareto_curve`."""
    fig, ax = _axes(ax)
    ax.plot(curve["customer_share"] * 100, curve["value_share"] * 100, color=PALETTE[0], lw=2)
    ax.plot([0, 100], [0, 100], color=PALETTE[5], ls="--", lw=1, label="equal shares")
    ax.fill_between(curve["customer_share"] * 100, curve["value_share"] * 100,
                    alpha=0.08, color=PALETTE[0])
    ax.set_xlabel("share of customers, highest value first (%)")
    ax.set_ylabel(f"share of {value_label} (%)")
    ax.set_title(f"How concentrated is {value_label}?")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.legend(loc="lower right", frameon=False)
    return fig


def plot_tiers(tiers: pd.DataFrame, ax=None) -> Figure:
    """Customer share and value share per tier; ``tiers`` has value_tier,
    customer_share, value_share."""
    fig, ax = _axes(ax, (7, 3))
    order = [t for t in VALUE_TIERS if t in set(tiers["value_tier"])]
    t = tiers.set_index("value_tier").loc[order]
    y = np.arange(len(order))
    ax.barh(y - 0.2, t["customer_share"] * 100, height=0.38, color=PALETTE[5],
            label="share of customers")
    ax.barh(y + 0.2, t["value_share"] * 100, height=0.38,
            color=[TIER_COLORS[o] for o in order], label="share of value")
    ax.set_yticks(y, [f"{o} value" for o in order])
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title("Value tiers: customers against the value they bring")
    # below the axes, where no bar can be under it
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    return fig


def plot_segments(profile: pd.DataFrame, *, top: int = 12, ax=None) -> Figure:
    """Customer and value share per segment from :func:`analysis.segments.segment_profile`."""
    fig, ax = _axes(ax, (7, 0.42 * min(len(profile), top) + 1.2))
    p = profile.head(top)
    y = np.arange(len(p))
    ax.barh(y - 0.2, p["customer_share"] * 100, height=0.38, color=PALETTE[5],
            label="share of customers")
    ax.barh(y + 0.2, p["value_share"] * 100, height=0.38, color=PALETTE[0],
            label="share of value")
    ax.set_yticks(y, p["segment"].astype(str))
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title("Segments: size against value")
    # below the axes, where no bar can be under it
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    return fig


def plot_lifecycle(counts: pd.DataFrame, ax=None) -> Figure:
    """Customers per lifecycle stage; ``counts`` has lifecycle_stage, n_customers."""
    fig, ax = _axes(ax, (7, 2.8))
    c = counts.set_index("lifecycle_stage")["n_customers"]
    stages = [s for s in STAGE_COLORS if s in c.index]
    ax.bar(stages, c.loc[stages], color=[STAGE_COLORS[s] for s in stages])
    ax.yaxis.set_major_formatter(mticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("customers")
    ax.set_title("Where customers are in their lifecycle")
    return fig


def plot_cohort_heatmap(cohorts: pd.DataFrame, *, max_months: int = 12, ax=None) -> Figure:
    """Retention by acquisition month and months since first purchase."""
    pivot = cohorts[cohorts["months_since"].between(1, max_months)].pivot(
        index="cohort", columns="months_since", values="retention")
    pivot.index = pd.to_datetime(pivot.index).strftime("%Y-%m")
    height = max(3.0, 0.16 * len(pivot) + 1.2)
    fig, ax = _axes(ax, (8, height))
    sns.heatmap(pivot * 100, ax=ax, cmap="Blues", vmin=0, cbar_kws={"label": "% buying"},
                linewidths=0)
    ax.set_xlabel("months since first purchase")
    ax.set_ylabel("first purchase in")
    ax.set_title("Cohort retention: share of each month's new customers buying again")
    return fig


def plot_monthly_orders(monthly: pd.DataFrame, ax=None) -> Figure:
    """Orders and revenue per month; ``monthly`` has month, orders, revenue."""
    fig, ax = _axes(ax, (8, 3))
    ax.plot(pd.to_datetime(monthly["month"]), monthly["revenue"], color=PALETTE[0], lw=2)
    ax.yaxis.set_major_formatter(mticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("revenue")
    ax.set_title("Revenue per month")
    return fig


def plot_quarantine(by_rule: pd.DataFrame, ax=None) -> Figure:
    """Quarantined rows per table and rule; ``by_rule`` has table, rule, rows."""
    fig, ax = _axes(ax, (7, 0.4 * max(len(by_rule), 1) + 1.2))
    if by_rule.empty:
        ax.text(0.5, 0.5, "no row was set aside", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title("Rows quarantined, by rule: none")
        return fig
    labels = by_rule["table"].astype(str) + ": " + by_rule["rule"].astype(str)
    ax.barh(labels, by_rule["rows"], color=PALETTE[4])
    ax.invert_yaxis()
    ax.set_xlabel("rows set aside")
    ax.set_title("Rows quarantined, by rule")
    return fig


METHOD_NAMES = {"model": "XGBoost model", "model_uncalibrated": "model (uncalibrated)",
                "logistic": "logistic regression", "blend": "blend (XGBoost + logistic)",
                "rule": "one-column rule", "rfm": "RFM lookup",
                "bgnbd": "BG/NBD", "bgnbd_gg": "BG/NBD + Gamma-Gamma",
                "last_period": "last period repeats"}


#: Line styles of the methods on one chart, so that they can be told apart in grey too.
LINE_STYLES = ("-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "x")


def plot_gain_curves(evaluation: pd.DataFrame, *, target: str, methods: list[str],
                     prefix: str, ax=None, names: dict[str, str] | None = None) -> Figure:
    """Cumulative share of ``target`` captured when customers are ranked by each method,
    each with its own colour, line style and marker; ``names`` names the methods
    (default :data:`analysis.models.METHOD_NAMES`)."""
    names = METHOD_NAMES if names is None else names
    fig, ax = _axes(ax, (7, 3.8))
    actual = evaluation[target].clip(lower=0).to_numpy(dtype=float)
    total = actual.sum()
    x = np.arange(1, len(actual) + 1) / len(actual) * 100
    for i, method in enumerate(methods):
        order = np.argsort(-evaluation[f"{prefix}{method}"].to_numpy(), kind="stable")
        ax.plot(x, np.cumsum(actual[order]) / total * 100, lw=2 if method == "model" else 1.3,
                color=PALETTE[i], ls=LINE_STYLES[i % len(LINE_STYLES)],
                marker=MARKERS[i % len(MARKERS)], markevery=max(len(x) // 8, 1),
                markersize=4, label=names.get(method, method))
    best = np.cumsum(np.sort(actual)[::-1]) / total * 100
    ax.plot(x, best, color=PALETTE[5], ls=":", lw=1, label="perfect ranking")
    ax.plot([0, 100], [0, 100], color=PALETTE[5], ls="--", lw=1, label="random")
    what = "churners" if target == "churned" else "future spend"
    ax.set_xlabel("customers targeted, highest score first (%)")
    ax.set_ylabel(f"share of {what} reached (%)")
    ax.set_title(f"Gain curve: how fast each method finds the {what}")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


def plot_calibration(table: pd.DataFrame, ax=None) -> Figure:
    """Observed against predicted churn per bin (:func:`analysis.models.calibration_table`)."""
    fig, ax = _axes(ax, (4.5, 4))
    ax.plot([0, 1], [0, 1], color=PALETTE[5], ls="--", lw=1, label="perfect calibration")
    ax.plot(table["mean_predicted"], table["observed"], marker="o", color=PALETTE[0],
            label="model")
    ax.set_xlabel("predicted churn probability")
    ax.set_ylabel("observed churn rate")
    ax.set_title("Calibration on unseen data")
    ax.legend(frameon=False, loc="upper left")
    return fig


def plot_drivers(drivers: pd.DataFrame, *, top: int = 12, ax=None,
                 title: str = "What drives the prediction",
                 xlabel: str = "share of the explanation (mean |SHAP|, %)") -> Figure:
    """Global drivers (:func:`analysis.explain.global_drivers`) as horizontal bars."""
    d = drivers.head(top)
    fig, ax = _axes(ax, (7, 0.34 * len(d) + 1.2))
    ax.barh(d["label"], d["share"] * 100, color=PALETTE[0])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig


def plot_beeswarm(shap: pd.DataFrame, features: pd.DataFrame, columns: list[str], *,
                  sample: int = 2_000, seed: int = 0, ax=None) -> Figure:
    """SHAP value of each customer for each feature, coloured by the feature's value
    (its percentile among customers; grey for text or missing values)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(shap), min(sample, len(shap)), replace=False)
    fig, ax = _axes(ax, (7.5, 0.42 * len(columns) + 1.4))
    cmap = plt.get_cmap("coolwarm")
    for i, col in enumerate(columns):
        values = shap[col].to_numpy()[rows]
        raw = features[col].iloc[rows]
        if pd.api.types.is_numeric_dtype(raw):
            pct = raw.rank(pct=True).to_numpy()
            colors = [cmap(p) if p == p else (0.6, 0.6, 0.6, 1) for p in pct]
        else:
            colors = [(0.6, 0.6, 0.6, 1)] * len(values)
        jitter = rng.uniform(-0.3, 0.3, len(values))
        ax.scatter(values, i + jitter, c=colors, s=4, alpha=0.6, linewidths=0)
    ax.set_yticks(range(len(columns)),
                  [_label(c) for c in columns])
    ax.invert_yaxis()
    ax.axvline(0, color=PALETTE[5], lw=1)
    ax.set_xlabel("SHAP value (impact on the prediction)")
    ax.set_title("Each dot is a customer: red = high value of the feature, blue = low")
    return fig


def plot_dependence(shap: pd.DataFrame, features: pd.DataFrame, column: str, *,
                    sample: int = 3_000, seed: int = 0, ax=None) -> Figure:
    """SHAP value against the feature's value for one feature."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(shap), min(sample, len(shap)), replace=False)
    fig, ax = _axes(ax, (6, 3.2))
    x = features[column].iloc[rows]
    y = shap[column].to_numpy()[rows]
    if pd.api.types.is_numeric_dtype(x):
        ax.scatter(x, y, s=5, alpha=0.4, color=PALETTE[1], linewidths=0)
    else:
        sns.stripplot(x=x.astype(str).to_numpy(), y=y, ax=ax, size=2, alpha=0.4,
                      color=PALETTE[1])
    ax.axhline(0, color=PALETTE[5], lw=1)
    ax.set_xlabel(_label(column))
    ax.set_ylabel("SHAP value")
    ax.set_title(f"How {_label(column)} moves the prediction")
    return fig


def plot_value_deciles(deciles: pd.DataFrame, ax=None) -> Figure:
    """Mean predicted against mean actual spend per decile of the prediction."""
    fig, ax = _axes(ax, (7, 3.2))
    x = deciles["decile"].to_numpy()
    ax.bar(x - 0.2, deciles["mean_score"], width=0.4, color=PALETTE[1], label="predicted")
    ax.bar(x + 0.2, deciles["mean_actual"], width=0.4, color=PALETTE[0], label="actual")
    ax.set_xticks(x)
    ax.set_xlabel("decile of predicted value (1 = highest)")
    ax.set_ylabel("mean spend over the horizon")
    ax.set_title("Predicted against actual spend, by decile")
    ax.legend(frameon=False)
    return fig


def _label(column: str) -> str:
    return FEATURE_LABELS.get(column, column)


def plot_profit_curve(curve: pd.DataFrame, depth: int, *, ax=None) -> Figure:
    """Cumulative expected profit of a retention campaign by targeting depth."""
    fig, ax = _axes(ax, (7, 3.2))
    shown = curve[curve["cumulative_profit"].notna()]
    limit = max(3 * depth, 50)
    shown = shown[shown["depth"] <= limit]
    ax.plot(shown["depth"], shown["cumulative_profit"], color=PALETTE[0], lw=2)
    if depth:
        best = shown.loc[shown["depth"] == depth, "cumulative_profit"]
        ax.axvline(depth, color=PALETTE[3], ls="--", lw=1)
        if len(best):
            ax.annotate(f"best depth: {depth:,}", (depth, best.iloc[0]), xytext=(5, -15),
                        textcoords="offset points", fontsize=9)
    ax.axhline(0, color=PALETTE[5], lw=1)
    ax.set_xlabel("customers contacted, highest expected gain first")
    ax.set_ylabel("cumulative expected profit")
    ax.set_title("Retention campaign: profit by targeting depth")
    return fig


def plot_history(history: pd.DataFrame, *, columns=("active_customers", "revenue_12m",
                                                     "at_risk_customers", "churn_auc")) -> Figure:
    """KPIs over runs (one small panel each), from :func:`analysis.monitor.read_history`."""
    cols = [c for c in columns if c in history]
    fig, axes = plt.subplots(1, len(cols), figsize=(3 * len(cols), 2.6), squeeze=False,
                             FigureClass=_Chart)
    x = pd.to_datetime(history["as_of"])
    for ax, col in zip(axes[0], cols, strict=True):
        ax.plot(x, history[col], marker="o", color=PALETTE[0])
        ax.set_title(col.replace("_", " "), fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.suptitle("Over the runs")
    return fig


def plot_survival(km: pd.DataFrame, ax=None) -> Figure:
    """Kaplan-Meier curves (``group``, ``tenure``, ``survival``) as steps, one per group;
    from :func:`analysis.snapshot.kaplan_meier`."""
    fig, ax = _axes(ax, (7, 3.8))
    for i, (name, part) in enumerate(km.groupby("group", sort=False)):
        ax.step(np.r_[0, part["tenure"]], np.r_[1.0, part["survival"]], where="post",
                lw=2.4 if name == "all" else 1.6, color="#333333" if name == "all"
                else PALETTE[(i - 1) % len(PALETTE)], label=str(name))
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(mticker.PercentFormatter(1.0))
    ax.set_xlabel("tenure")
    ax.set_ylabel("still a customer")
    ax.set_title("Share of customers still with us, by tenure")
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_tenure_cohorts(cohorts: pd.DataFrame, ax=None) -> Figure:
    """Churn rate per tenure band (``tenure_band``, ``customers``, ``churn_rate``)."""
    fig, ax = _axes(ax, (7, 3.2))
    shown = cohorts[cohorts["customers"] > 0]
    ax.bar(shown["tenure_band"], shown["churn_rate"], color=PALETTE[1])
    for x, (rate, n) in enumerate(zip(shown["churn_rate"], shown["customers"], strict=True)):
        ax.annotate(f"{n:,}", (x, rate), ha="center", va="bottom", fontsize=8)
    ax.yaxis.set_major_formatter(mticker.PercentFormatter(1.0))
    ax.set_ylabel("churned")
    ax.set_title("Churn by tenure (customers per band on top)")
    return fig


#: The panels of :func:`plot_trend`: column, title, axis format.
TREND_PANELS = (("buying_customers", "Buying customers (a purchase in 12 months)", "{x:,.0f}"),
                ("revenue_12m", "Revenue over the previous 12 months", "{x:,.0f}"),
                ("churn_rate", "Churn: no purchase in the horizon", "{x:.0%}"),
                ("top20_revenue_share", "Revenue share of the top 20 % of buyers", "{x:.0%}"))


def plot_trend(trend: pd.DataFrame) -> Figure:
    """The key numbers month by month (:func:`analysis.monitor.monthly_trend`), one small
    panel each, titled in words."""
    fig, axes = plt.subplots(1, len(TREND_PANELS), figsize=(12, 2.8), squeeze=False,
                             FigureClass=_Chart)
    x = pd.to_datetime(trend["as_of"])
    for ax, (col, title, fmt) in zip(axes[0], TREND_PANELS, strict=True):
        ax.plot(x, trend[col], marker="o", markersize=3, color=PALETTE[0])
        ax.set_title(title, fontsize=9)
        ax.yaxis.set_major_formatter(mticker.StrMethodFormatter(fmt))
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("The last 12 months, month by month")
    return fig
