"""The executive page's pieces that are arithmetic or wording, on hand-built inputs (the
whole page is checked on real runs in test_report.py and test_browser.py)."""

from types import SimpleNamespace

import pandas as pd
import pytest

from analysis import narrative as N
from analysis.store import CustomerView


def page(currency="", **retention):
    uplift = pd.DataFrame([{"group": "all", "uplift_rate": 0.10, "ci_low": -0.02,
                            "ci_high": 0.22}])
    decisions = SimpleNamespace(retention=retention, margin_uplift=uplift)
    config = SimpleNamespace(report=SimpleNamespace(currency=currency))
    return SimpleNamespace(decisions=decisions, config=config, currency=currency)


def test_the_campaigns_return_at_both_ends_of_the_measured_effect():
    p = page(method="measured", uplift_rate_used=0.10, expected_margin_saved=1_000.0,
             campaign_cost=300.0)
    # the extra margin scales with the effect (1,000 at 10 %), the cost does not
    assert N.campaign_range(p) == pytest.approx((-0.02 * 10_000 - 300, 0.22 * 10_000 - 300))
    words = N._range_words(N.campaign_range(p), lambda v: f"EUR {v:,.0f}")
    assert "uncertain" in words and "lose EUR 500" in words and "bring EUR 1,900" in words
    sure = N._range_words((100.0, 900.0), lambda v: f"{v:,.0f}")
    assert sure == " (between 100 and 900 with 95 % confidence)"
    assert N.campaign_range(page(method="assumed", uplift_rate_used=None)) is None


def test_money_carries_the_configured_currency():
    assert N.money(1234.5, SimpleNamespace(currency="EUR")) == "EUR 1,234"
    assert N.money(1234.5, SimpleNamespace(currency="")) == "1,234"
    assert N.money(-3.25, SimpleNamespace(currency="$"), decimals=1) == "$ -3.2"


def test_run_to_run_changes_read_in_words_with_their_own_formats():
    deltas = pd.DataFrame([
        {"kpi": "revenue_12m", "previous": 1000.0, "current": 900.0, "change": -100.0,
         "change_share": -0.1},
        {"kpi": "top20_revenue_share", "previous": 0.5, "current": 0.55, "change": 0.05,
         "change_share": 0.1},
        {"kpi": "some_new_kpi", "previous": 2.0, "current": 3.0, "change": 1.0,
         "change_share": 0.5}])
    table = N._kpi_table(deltas, SimpleNamespace(currency="EUR")).set_index("kpi")
    row = table.loc["Revenue, last 12 months"]
    assert (row["previous"], row["current"], row["change"]) == ("EUR 1,000", "EUR 900",
                                                                "-EUR 100")
    share = table.loc["Revenue share of the top 20 % of customers, last 12 months"]
    assert (share["current"], share["change"]) == ("55.0%", "+5.0%")
    assert table.loc["some new kpi", "change"] == "+1"


def test_list_names_are_safe_file_names():
    assert N.list_name("Retain - personal outreach") == "retain-personal-outreach.csv"
    assert N.list_name("Nurture / VIP care") == "nurture-vip-care.csv"
    assert N.list_name("../../etc <b>") == "etc-b.csv"
    assert N.list_name("***") == "action.csv"


def test_the_campaigns_return_with_the_hazard_effect_uses_the_margin_at_both_ends():
    # the strategy step computed the campaign's extra margin at both ends of the effect's
    # interval (not a straight line in the effect); the cost is the same at both ends
    p = page(method="measured", uplift_rate_used=0.10, expected_margin_saved=1_000.0,
             campaign_cost=300.0, expected_margin_saved_range=[250.0, 2_100.0])
    assert N.campaign_range(p) == pytest.approx((250.0 - 300.0, 2_100.0 - 300.0))


def test_the_hazard_effect_in_plain_words():
    fit = {"effect": 0.42, "ci_low": 0.15, "ci_high": 0.69, "n_campaigns": 10,
           "window_days": 361, "value_window_days": 365}
    words = N.hazard_effect_sentence(fit)
    assert "the 10 past randomized campaigns" in words and "up to 361 days" in words
    assert "42% less likely to stop" in words and "(95 % interval 15% to 69%)" in words
    assert "over the next 365 days" in words and "could be nil" not in words
    unsure = N.hazard_effect_sentence({**fit, "ci_low": -0.1, "n_campaigns": 1})
    assert "the past randomized campaign," in unsure and "it could be nil" in unsure


def test_a_table_whose_ids_match_few_orders_is_called_out(tmp_path):
    """Section 9 warns when most customers of a table beside the order log have no order
    in it (ids written differently in two files), and only then."""
    from analysis.config import load_config
    from analysis.narrative import Page

    from .conftest import write_config

    config = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))

    def section(matched):
        quality = {"tables": [
            {"table": "transactions", "rows_read": 10, "rows_processed": 10,
             "rows_quarantined": 0, "customers": 5, "customers_in_order_log": None},
            {"table": "customers", "rows_read": 40, "rows_processed": 40,
             "rows_quarantined": 0, "customers": 40, "customers_in_order_log": matched}]}
        p = Page(config=config, run_id="r", processed_dir=None, report_dir=None,
                 previous_processed_dir=None, processed_href="", quality=quality,
                 profile=SimpleNamespace(as_of=pd.Timestamp("2025-01-01").date()),
                 customers=None, decisions=None, horizon=90, skipped=None, fallback=None,
                 inputs={})
        return " ".join(b for b in N.data_and_assumptions(p) if isinstance(b, str))

    assert "Only 3 of the 40 customers in the customers table have an order" in section(3)
    assert "have an order in the order log" not in section(20)        # half: no warning


@pytest.mark.parametrize("profit", [-2_097.0, 5_000.0])
def test_a_campaign_that_loses_money_is_not_called_a_recommendation(monkeypatch, profit):
    """The policy may contact customers whatever a contact is worth (personal outreach of
    the valuable at risk); when the campaign is then expected to lose money, the bottom
    line says so rather than "Recommended", and names the loss."""
    numbers = {"active": 100, "at_risk": 40, "revenue_at_risk": 1_000.0,
               "revenue_12m": 5_000.0, "period_days": 365, "campaign": 30,
               "campaign_high_risk": 25, "campaign_cost": 300.0,
               "incremental_profit": profit, "roi": profit / 300.0,
               "ordinary_profit": 9_000.0, "total_profit": 9_000.0 + profit,
               "actions": {}, "changes": None, "campaign_range": None}
    monkeypatch.setattr(N, "bottom_line_numbers", lambda page: numbers)
    p = SimpleNamespace(risk_known=True, snapshot=False, revenue_known=True, horizon=90,
                        currency="", config=SimpleNamespace(report=SimpleNamespace(currency="")))
    text = N.bottom_line(p)[1]
    if profit < 0:
        assert "Recommended" not in text
        assert "expected to <b>lose 2,097</b> over the next 365 days" in text
        assert "ROI -699%" in text
    else:
        assert "<b>Recommended: a retention campaign to 30 customers</b>" in text


def test_lifecycle_movement_of_a_sampled_evaluation_counts_the_sampled_customers_only():
    # the evaluation cutoff's stages are known for c1..c3 (every customer then) or for
    # c1 and c3 only (a random half, drawn by id); c4 is new since then
    now = pd.DataFrame({"customer_id": ["c1", "c2", "c3", "c4"],
                        "lifecycle_stage": ["active", "lapsed", "lost", "new"]})
    every = pd.DataFrame({"customer_id": ["c1", "c2", "c3"],
                          "lifecycle_stage": ["active", "active", "lapsed"]})
    pages = [SimpleNamespace(customers=CustomerView.of(now), horizon=90, run=SimpleNamespace(
        evaluation=evaluation, sizes=sizes, cutoffs={"eval": "2025-01-01"}))
        for evaluation, sizes in ((every, {"eval_share": 1.0}),
                                  (every.iloc[[0, 2]], {"eval_share": 0.5}))]
    whole, sampled = (N.lifecycle_movement(p) for p in pages)
    assert int(whole.to_numpy().sum()) == 4
    assert "new since then (or not scored)" in whole.index
    assert int(sampled.to_numpy().sum()) == 2
    assert "new since then (or not scored)" not in sampled.index
    text = " ".join(str(b) for b in N._movement(pages[1]))
    assert "of the 1 customers active then (a random 50.0% of the customers, drawn by id)" \
        in text
    assert "a random" not in " ".join(str(b) for b in N._movement(pages[0]))


def test_the_page_counts_the_customers_where_they_lie_as_pandas_counts_them(tmp_path):
    """The page's figures are queried where the customer table lies (DuckDB over the run
    store; here a table in memory): they equal pandas' on the same customers, with
    missing values, ties, a missing segment and risks exactly at the threshold."""
    import numpy as np

    from analysis import segments
    from analysis.config import load_config
    from analysis.narrative import Page

    from .conftest import write_config

    rng = np.random.default_rng(11)
    n = 400
    frame = pd.DataFrame({
        "customer_id": [f"c{i:03d}" for i in rng.permutation(n)],
        "segment": pd.array(rng.choice(["Loyal", "New", "Lost", ""], n)).astype(object),
        "value_tier": rng.choice(["high", "mid", "low"], n),
        "lifecycle_stage": rng.choice(list(segments.LIFECYCLE_STAGES), n),
        "churn_probability": rng.choice([0.2, 0.5, 0.7, np.nan], n),
        "spend_365d": rng.choice([0.5, 1.5, 2.0, 10.25, np.nan], n),
        "predicted_value": rng.choice([0.0, 1.0, 2.0, 3.0, 4.0, np.nan], n),
        "action": rng.choice(["Retain", "Grow", "Maintain"], n)})
    frame.loc[frame["segment"] == "", "segment"] = None
    config = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    p = Page(config=config, run_id="r", processed_dir=None, report_dir=None,
             previous_processed_dir=None, processed_href="", quality={},
             profile=SimpleNamespace(as_of=pd.Timestamp("2025-01-01").date()),
             customers=CustomerView.of(frame), decisions=None, horizon=90, skipped=None,
             fallback=None, inputs={})
    active = frame["lifecycle_stage"].isin(segments.ACTIVE_STAGES)
    at_risk = (frame["churn_probability"] >= config.strategy.high_risk) & active
    assert 0 < at_risk.sum() < active.sum() < n
    counts = p.counts
    assert {k: counts[k] for k in ("customers", "active", "at_risk", "risk_scored")} == {
        "customers": n, "active": int(active.sum()), "at_risk": int(at_risk.sum()),
        "risk_scored": int(frame["churn_probability"].notna().sum())}
    assert counts["spend"] == pytest.approx(frame["spend_365d"].sum(), rel=1e-12)
    assert counts["spend_at_risk"] == pytest.approx(frame.loc[at_risk, "spend_365d"].sum(),
                                                    rel=1e-12)
    assert counts["predicted"] == pytest.approx(frame["predicted_value"].sum(), rel=1e-12)
    crosstab = pd.crosstab(frame["segment"], frame["action"])
    crosstab.columns.name = None
    pd.testing.assert_frame_equal(N.segment_by_action(p), crosstab.rename_axis("Segment"))
    # the growth sentence: the typical mid-value prediction (the median of an even count
    # is halfway between the middle two) and the low-value customers at or above it
    mid = frame.loc[frame["value_tier"] == "mid", "predicted_value"]
    threshold = mid.median()
    growth = ((frame["value_tier"] == "low") & (frame["predicted_value"] >= threshold)).sum()
    text = " ".join(b for b in N.value(p) if isinstance(b, str))
    assert (f"{growth:,} low-value customers are predicted to spend at least as much as the "
            f"typical mid-value customer ({threshold:,.0f})") in text
    # the most valuable at risk, ties by id
    top = frame[at_risk].sort_values(["spend_365d", "customer_id"],
                                     ascending=[False, True]).head(8)["customer_id"]
    html = " ".join(b for b in N.churn(p) if isinstance(b, str))
    places = [html.index(f">{i}<") for i in top]
    assert places == sorted(places)
