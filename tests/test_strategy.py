import datetime as dt

import numpy as np
import pandas as pd
import pytest

from analysis import features as F
from analysis import strategy as S
from analysis.store import RunStore
from analysis.uplift import last_coefficient

P = S.StrategyParams()


def decisions(**overrides):
    base = {"customer_id": "x", "value_tier": "mid", "churn_risk": "low",
            "lifecycle_stage": "active", "potential": False, "profitable": True,
            "retention_profitable": False, "phaseout_candidate": False}
    return {**base, **overrides}


@pytest.mark.parametrize("row, action", [
    (decisions(phaseout_candidate=True, value_tier="low"), "Review for phase-out"),
    (decisions(value_tier="high", lifecycle_stage="lapsed"), "Win back"),
    (decisions(value_tier="high", churn_risk="high"), "Retain - personal outreach"),
    (decisions(value_tier="high"), "Nurture / VIP care"),
    (decisions(retention_profitable=True), "Retain - automated offer"),
    (decisions(value_tier="low", potential=True), "Grow / develop"),
    (decisions(value_tier="low", lifecycle_stage="lost"), "No action - lapsed"),
    (decisions(value_tier="low", profitable=False), "Serve at low cost"),
    (decisions(value_tier="low"), "Maintain"),
])
def test_each_policy_row(row, action):
    out = S.assign_actions(pd.DataFrame([row]))
    assert out["action"].tolist() == [action]
    assert out["action_reason"].iloc[0]


def test_policy_is_data():
    custom = [{"action": "Call", "churn_risk": ["high"]}, {"action": "Mail"}]
    frame = pd.DataFrame([decisions(churn_risk="high"), decisions()])
    assert S.assign_actions(frame, policy=custom)["action"].tolist() == ["Call", "Mail"]
    with pytest.raises(KeyError, match="unknown column 'shoe_size'"):
        S.assign_actions(frame, policy=[{"action": "A", "shoe_size": [42]}])
    assert list(S.policy_table(custom)["conditions"]) == ["churn risk high", "everyone else"]


def test_economics_by_hand():
    c = pd.DataFrame({"customer_id": ["a", "b"], "predicted_value": [100.0, 30.0],
                      "monetary_mean_order": [50.0, 10.0], "top_channel": ["store", "web"],
                      "margin_rate": [0.4, np.nan], "n_complaints": [0, 2],
                      "tenure_days": [365, 365]})
    e = S.customer_economics(c, horizon_days=365, params=P).set_index("customer_id")
    # a: 2 orders in store at 6.0, margin 40 % of 100, account 4/year
    assert e.loc["a", "expected_margin"] == pytest.approx(40.0)
    assert e.loc["a", "cost_to_serve"] == pytest.approx(2 * 6.0 + 4.0)
    # b: unknown channel -> 2.0 per order; default margin rate; 2 complaints a year at 15
    assert e.loc["b", "cost_to_serve"] == pytest.approx(3 * 2.0 + 2 * 15.0 + 4.0)
    assert e.loc["b", "expected_profit"] == pytest.approx(30 * 0.3 - 40.0)


def test_retention_targeting_chooses_the_most_profitable_depth():
    c = pd.DataFrame({"customer_id": list("abcd"), "churn_probability": [0.9, 0.5, 0.5, 0.1],
                      "spend_365d": [1000.0, 1000.0, 50.0, 1000.0]})
    econ = pd.DataFrame({"margin_rate_used": [0.5] * 4})
    frame, summary = S.retention_targeting(c, econ, retention_rate=0.2, params=P)
    # gains: .9*.2*500-10 = 80, .5*.2*500-10 = 40, .5*.2*25-10 = -7.5, .1*.2*500-10 = 0
    assert frame["retention_gain"].tolist() == pytest.approx([80, 40, -7.5, 0])
    assert frame["targeted"].tolist() == [True, True, False, False]
    assert summary["campaign_size"] == 2 and summary["max_expected_profit"] == pytest.approx(120)
    assert summary["roi"] == pytest.approx((90 + 50 - 20) / 20)
    only_b = S.retention_targeting(c, econ, retention_rate=0.2, params=P,
                                   eligible=pd.Series([False, True, True, True]))[0]
    assert only_b["targeted"].tolist() == [False, True, False, False]


def test_unknown_churn_risk_is_never_targeted():
    c = pd.DataFrame({"customer_id": list("ab"), "churn_probability": [np.nan, 0.9],
                      "spend_365d": [1000.0, 1000.0]})
    econ = pd.DataFrame({"margin_rate_used": [0.5] * 2})
    frame, summary = S.retention_targeting(c, econ, retention_rate=0.2, params=P)
    assert frame["targeted"].tolist() == [False, True]
    assert np.isnan(frame["retention_gain"].iloc[0]) and summary["campaign_size"] == 1


def test_retention_effect_from_a_randomized_campaign():
    rng = np.random.default_rng(0)
    n = 4000
    treated = rng.random(n) < 0.5
    churned = rng.random(n) < np.where(treated, 0.30, 0.40)
    campaign = pd.DataFrame({"customer_id": range(n), "treated": treated})
    outcomes = pd.DataFrame({"customer_id": range(n), "churned": churned.astype(int),
                             "tier": np.where(np.arange(n) % 2, "a", "b")})
    eff = S.estimate_retention_effect(campaign, outcomes, by="tier", n_boot=300)
    overall = eff.set_index("group").loc["all"]
    assert overall["retention_rate"] == pytest.approx(0.25, abs=0.06)
    assert overall["ci_low"] < 0.25 < overall["ci_high"]
    assert set(eff["group"]) == {"all", "a", "b"}


def test_margin_uplift_from_a_randomized_campaign():
    rng = np.random.default_rng(1)
    n = 6000
    expected = rng.gamma(1.5, 60.0, n)
    treated = rng.random(n) < 0.5
    # a contact adds 8 % of the expected margin; the realised margin is noisy around it
    realised = expected * (1 + 0.08 * treated) * rng.gamma(4.0, 0.25, n)
    frame = pd.DataFrame({"customer_id": range(n), "treated": treated,
                          "future_margin": realised, "predicted_margin": expected,
                          "run_rate_margin": expected * rng.gamma(8.0, 0.125, n),
                          "tier": np.where(np.arange(n) % 2, "a", "b")})
    up = S.estimate_margin_uplift(frame, by="tier", covariates=("run_rate_margin",))
    overall = up.set_index("group").loc["all"]
    assert overall["uplift_rate"] == pytest.approx(0.08, abs=0.03)
    assert overall["ci_low"] < 0.08 < overall["ci_high"]
    assert set(up["group"]) == {"all", "a", "b"}
    # no effect: the interval covers zero
    frame["future_margin"] = expected * rng.gamma(4.0, 0.25, n)
    null = S.estimate_margin_uplift(frame).set_index("group").loc["all"]
    assert null["ci_low"] < 0 < null["ci_high"]
    # a group too small to judge is left out rather than reported
    small = S.estimate_margin_uplift(frame.head(50), by="tier")
    assert small.empty


def test_measured_uplift_values_a_contact_by_expected_margin():
    c = pd.DataFrame({"customer_id": list("abc"), "churn_probability": [0.9, 0.1, 0.5],
                      "spend_365d": [0.0, 0.0, 0.0], "predicted_value": [300.0, 100.0, 600.0]})
    econ = pd.DataFrame({"margin_rate_used": [0.5] * 3})
    frame, summary = S.retention_targeting(c, econ, params=P, uplift_rate=0.1,
                                           window_days=180, horizon_days=90)
    # value at stake: predicted value over 180 days x margin = 300, 100, 600
    assert frame["value_if_retained"].tolist() == pytest.approx([300, 100, 600])
    # gain: 10 % of it less the 10 of contact and offer: 20, 0, 50
    assert frame["retention_gain"].tolist() == pytest.approx([20, 0, 50])
    assert frame["targeted"].tolist() == [True, False, True]
    assert summary["method"] == "measured" and summary["campaign_size"] == 2
    assert summary["expected_margin_saved"] == pytest.approx(90)
    assert summary["expected_revenue_saved"] == pytest.approx(180)


def review_frame(**over):
    row = {"customer_id": "x", "potential": False, "trend_180d": -0.5, "tenure_days": 300,
           "days_since_complaint": np.nan, "predicted_value": 5.0}
    econ = {"expected_profit": -10.0}
    hist = {"customer_id": "x", "profit_p1": -1.0, "profit_p2": -2.0, "profit_p3": -3.0,
            "n_orders_profit": 10, "order_profit_mean": -3.0, "order_profit_se": 1.0}
    for k, v in over.items():
        (econ if k in econ else hist if k in hist else row)[k] = v
    return pd.DataFrame([row]), pd.DataFrame([econ]), pd.DataFrame([hist])


@pytest.mark.parametrize("change, candidate", [
    ({}, True),
    ({"expected_profit": 5.0}, False),              # profitable in the forecast
    ({"profit_p2": 1.0}, False),                    # profitable in one earlier period
    ({"expected_profit": -1.0}, False),             # near break-even: not material
    ({"potential": True}, False),                   # development potential
    ({"trend_180d": 0.4}, False),                   # spend rising
    ({"tenure_days": 2000}, False),                 # long-standing, small loss
    ({"tenure_days": 2000, "expected_profit": -80.0}, True),   # ... unless the loss is large
    ({"days_since_complaint": 20.0}, False),        # resolve the complaint first
    # each order loses 3 +- 1.96 x 1: the interval ends at -1.04, below zero
    ({"order_profit_se": 1.6}, False),              # -3 + 1.96 x 1.6 > 0: could be chance
    ({"order_profit_mean": 0.5}, False),            # orders pay for themselves
    ({"n_orders_profit": 1, "order_profit_se": np.nan}, False),   # one order: cannot tell
])
def test_each_phaseout_guardrail(change, candidate):
    c, e, h = review_frame(**change)
    out = S.phaseout_review(c, e, h, params=P)
    assert out["phaseout_candidate"].tolist() == [candidate]
    assert bool(out["phaseout_reasons"].iloc[0]) == candidate


def test_the_order_loss_guardrail_by_hand():
    c, e, h = review_frame(order_profit_mean=-2.0, order_profit_se=1.0)
    # 95 %: -2 + 1.96 = -0.04 < 0, listed; 99 %: -2 + 2.58 > 0, not
    assert S.phaseout_review(c, e, h, params=P)["phaseout_candidate"].item()
    strict = S.StrategyParams(phaseout_confidence=0.99)
    out = S.phaseout_review(c, e, h, params=strict)
    assert not out["phaseout_candidate"].item() and not out["order_loss_sure"].item()
    reason = S.phaseout_review(c, e, h, params=P)["phaseout_reasons"].item()
    assert "-2.00 per order on average, at best -0.04 (95% interval)" in reason
    # without orders to judge by (a snapshot's history) the guardrail does not apply
    plain = h.drop(columns=["n_orders_profit", "order_profit_mean", "order_profit_se"])
    assert S.phaseout_review(c, e, plain, params=P)["phaseout_candidate"].item()


def test_order_profits_by_hand():
    tx = pd.DataFrame({"customer_id": ["a", "a", "a", "b"], "order_id": ["1", "2", "3", "4"],
                       "order_date": pd.to_datetime(["2024-01-05", "2024-02-10", "2024-03-20",
                                                     "2024-03-01"]),
                       "amount": [50.0, 10.0, 100.0, 20.0], "margin": [8.0, 1.0, 12.0, 5.0],
                       "status": "completed", "channel": ["phone", "online", "phone", "web"]})
    out = S.order_profits(F.connect({"transactions": tx}), as_of=dt.date(2024, 4, 1),
                          params=P).set_index("customer_id")
    profit = np.array([8 - 9.0, 1 - 1.5, 12 - 9.0])     # each order less its channel's cost
    assert out.loc["a", "n_orders_profit"] == 3
    assert out.loc["a", "order_profit_mean"] == pytest.approx(profit.mean())
    assert out.loc["a", "order_profit_se"] == pytest.approx(profit.std(ddof=1) / np.sqrt(3))
    assert out.loc["b", "order_profit_mean"] == pytest.approx(5 - 2.0)   # unlisted channel
    assert np.isnan(out.loc["b", "order_profit_se"])


def test_guardrail_effects_count_who_each_step_keeps_off():
    review = pd.DataFrame({
        "unprofitable_now": [True, True, True, True, False],
        "unprofitable_all_periods": [True, True, True, False, False],
        "material_loss": [True, True, True, True, True],
        "order_loss_sure": [True, True, True, True, False],
        "low_potential": [True, True, False, True, True],
        "tenure_ok": [True, True, True, True, True],
        "no_recent_complaint": [True, False, True, True, True]})
    g = S.guardrail_effects(review)
    assert g["customers_remaining"].tolist() == [4, 3, 3, 3, 2, 2, 1]
    assert g["kept_off"].tolist() == [0, 1, 0, 0, 1, 0, 1]
    # a review without the order guardrail (a snapshot) has one step fewer
    assert len(S.guardrail_effects(review.drop(columns="order_loss_sure"))) == 6


def test_period_profits_from_history():
    tx = pd.DataFrame({"customer_id": ["a", "a", "a"], "order_id": ["1", "2", "3"],
                       "order_date": pd.to_datetime(["2024-03-20", "2024-02-10", "2024-01-05"]),
                       "amount": [100.0, 10.0, 50.0], "margin": [30.0, 1.0, 20.0],
                       "status": "completed", "channel": ["phone", "online", "store"]})
    out = S.period_profits(F.connect({"transactions": tx}), as_of=dt.date(2024, 4, 1),
                           horizon_days=30, periods=3, params=P)
    row = out.iloc[0]
    assert row["profit_p1"] == pytest.approx(30 - 9.0)    # 2024-03-02 .. 2024-03-31
    assert row["profit_p2"] == pytest.approx(1 - 1.5)     # 2024-02-01 .. 2024-03-01
    assert row["profit_p3"] == pytest.approx(20 - 6.0)    # 2024-01-02 .. 2024-01-31


def test_early_warnings_name_the_rule():
    c = pd.DataFrame({
        "customer_id": ["late", "drop", "angry", "sad", "risky", "lost"],
        "lifecycle_stage": ["at risk", "active", "active", "active", "active", "lost"],
        "frequency": [5, 5, 5, 5, 5, 5], "recency_days": [90, 10, 10, 10, 10, 900],
        "recency_vs_gap": [3.0, 0.5, 0.5, 0.5, 0.5, 30.0],
        "trend_90d": [0.0, -0.6, 0.0, 0.0, 0.0, -1.0], "spend_90d": [0, 10, 50, 50, 50, 0.0],
        "complaints_90d": [0, 0, 1, 0, 0, 0], "satisfaction_last": [4, 4, 4, 1, 4, 1],
        "churn_probability": [0.3, 0.3, 0.3, 0.3, 0.8, 0.99]})
    alerts = S.early_warnings(c, params=P)
    fired = alerts.groupby("customer_id")["rule"].apply(set).to_dict()
    assert fired == {"late": {"overdue"}, "drop": {"spend drop"}, "angry": {"new complaint"},
                     "sad": {"low satisfaction"}, "risky": {"high churn risk"}}
    previous = pd.DataFrame({"customer_id": ["late", "drop", "risky"],
                             "churn_probability": [0.05, 0.25, 0.5]})
    rising = S.early_warnings(c, params=P, previous=previous)
    rose = rising[rising["rule"] == "churn risk rising"]
    assert rose["customer_id"].tolist() == ["late", "risky"]   # +0.25 and +0.30; drop +0.05
    assert rose["detail"].iloc[0] == "churn probability 5% -> 30% since the previous run"


def test_holm_adjustment_by_hand():
    adjusted = S.holm(np.array([0.01, 0.04, 0.03, 0.5]))
    # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3, x2, x1 = .04, .09, .08 -> .09 (monotone), .5
    assert adjusted.tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_fairness_audit_is_not_fooled_by_many_comparisons():
    rng = np.random.default_rng(11)
    n = 20_000
    attrs = pd.DataFrame({"customer_id": range(n),
                          **{f"attr{i}": rng.choice(list("abcdef"), n) for i in range(12)}})
    actions = pd.DataFrame({"customer_id": range(n), "action": rng.choice(
        ["Maintain", "Grow", "Retain", "Serve at low cost", "Review for phase-out"], n,
        p=[.6, .2, .15, .045, .005])})
    audit = S.fairness_audit(actions, attrs, protected=tuple(f"attr{i}" for i in range(12)),
                             params=P)
    chance = audit[((audit["ratio"] < 0.8) | (audit["ratio"] > 1.25)) & (audit["p_value"] < 0.01)]
    assert len(chance) > 0          # uncorrected, chance alone would raise flags here
    assert not audit["flag"].any()


def test_fairness_audit_flags_a_planted_bias_and_not_chance():
    rng = np.random.default_rng(3)
    n = 6000
    attrs = pd.DataFrame({"customer_id": range(n),
                          "gender": rng.choice(["f", "m", "x"], n, p=[.48, .48, .04])})
    fair = rng.choice(["Maintain", "Serve at low cost", "Review for phase-out"], n,
                      p=[.9, .08, .02])
    actions = pd.DataFrame({"customer_id": range(n), "action": fair})
    audit = S.fairness_audit(actions, attrs, protected=("gender",), params=P)
    assert not audit["flag"].any()
    biased = np.where((attrs["gender"] == "f") & (rng.random(n) < 0.10),
                      "Review for phase-out", fair)
    audit = S.fairness_audit(actions.assign(action=biased), attrs, protected=("gender",),
                             params=P)
    flagged = audit[audit["flag"]]
    assert set(flagged["action"]) == {"Review for phase-out"}
    assert {"f", "m"} <= set(flagged["group"])


def test_fairness_audit_lists_small_groups_without_testing_them():
    rng = np.random.default_rng(5)
    n = 3000
    gender = np.where(np.arange(n) < 12, "x", rng.choice(["f", "m"], n))
    attrs = pd.DataFrame({"customer_id": range(n), "gender": gender})
    actions = pd.DataFrame({"customer_id": range(n), "action": np.where(
        np.arange(n) < 12, "Review for phase-out", rng.choice(["Maintain", "Grow"], n))})
    audit = S.fairness_audit(actions, attrs, protected=("gender",), params=P)
    small = audit[audit["group"] == "x"]
    assert len(small) == 3 and not small["judged"].any() and not small["flag"].any()
    assert small["p_value"].isna().all() and small["ratio"].max() == np.inf
    assert audit.loc[audit["group"] != "x", "judged"].all()


def test_fairness_summary_shows_flagged_rows_and_says_the_rest():
    def row(attribute, group, action, n_group, judged, flag):
        return {"attribute": attribute, "group": group, "action": action, "n_group": n_group,
                "rate": 0.1, "rate_others": 0.1, "ratio": 2.0 if flag else 1.0,
                "judged": judged, "p_value": np.nan if not judged else 0.5,
                "p_adjusted": np.nan if not judged else 0.5, "flag": flag}

    audit = pd.DataFrame([
        row("gender", "f", "Grow", 2000, True, False),
        row("gender", "m", "Grow", 1900, True, False),
        row("gender", "x", "Grow", 12, False, False),
        row("gender", "x", "Review for phase-out", 12, False, False),
        row("age_band", "18-24", "Grow", 400, True, True),
        row("age_band", "85+", "Grow", 4, False, False),
    ])
    flagged, sentence = S.fairness_summary(audit, min_group=30)
    assert flagged[["attribute", "group"]].values.tolist() == [["age_band", "18-24"]]
    assert sentence == ("2 other comparisons, none flagged; 2 groups too small to judge "
                        "(fewer than 30 customers): gender x (12), age_band 85+ (4).")
    none_flagged, sentence = S.fairness_summary(
        audit[~audit["flag"] & audit["judged"]], min_group=30)
    assert none_flagged.empty
    assert sentence == ("None of the 2 comparisons is flagged; every group has at least 30 "
                        "customers.")


def test_snapshot_decisions_on_a_hand_built_frame():
    params = S.StrategyParams(cost_per_account_year=120.0, margin_rate=0.5,
                              retention_rate=0.2, phaseout_min_loss=1.0)
    c = pd.DataFrame({
        "customer_id": ["gone", "loyal", "upsell", "loss", "risky"],
        "lifecycle_stage": ["lost", "active", "active", "active", "active"],
        "value_tier": ["high", "high", "low", "low", "mid"],
        "churn_probability": [0.9, 0.05, 0.1, 0.1, 0.8],
        "predicted_value": [0.0, 300.0, 60.0, 10.0, 150.0],
        "spend_365d": [1200.0, 1200.0, 240.0, 48.0, 600.0],
        "tenure_months": [30.0, 40.0, 24.0, 6.0, 10.0],
        "monetary_total": [3000.0, 4000.0, 480.0, 24.0, 500.0]})
    run = S.decide_snapshot(c, horizon_days=90, params=params)
    out = run.customers.set_index("customer_id")
    assert out.loc["gone", "cost_to_serve"] == 0.0               # left: costs nothing more
    assert out.loc["gone", "action"] == "Win back"
    assert out.loc["loyal", "action"] == "Nurture / VIP care"
    assert out.loc["upsell", "action"] == "Grow / develop"        # low tier, low risk, a year+
    # 'loss': 10 x 0.5 = 5 of margin against 120 x 90/365 = 29.6 of cost, and a lifetime
    # margin of 24 x 0.5 / 6 = 2 a month against 10: unprofitable now and over time
    assert bool(out.loc["loss", "phaseout_candidate"])
    assert out.loc["loss", "action"] == "Review for phase-out"
    # 'risky': 0.8 x 0.2 x 12 months of margin (600 x 0.5) = 48 - 10 of contact cost
    assert out.loc["risky", "retention_gain"] == pytest.approx(0.8 * 0.2 * 300 - 10)
    assert out.loc["risky", "action"] == "Retain - automated offer"
    assert run.retention["campaign_size"] == 1 and run.retention_effect.empty


def _decided_world():
    """Five active customers whose actions cover every way into (and out of) the campaign."""
    params = S.StrategyParams(cost_per_account_year=120.0, margin_rate=0.5,
                              retention_rate=0.2, phaseout_min_loss=1.0, high_risk=0.5)
    c = pd.DataFrame({
        "customer_id": ["vip", "steady", "risky", "falling", "small"],
        "lifecycle_stage": ["active"] * 5,
        "value_tier": ["high", "high", "mid", "high", "low"],
        "churn_probability": [0.3, 0.01, 0.8, 0.6, 0.1],
        "predicted_value": [900.0, 900.0, 150.0, 20.0, 60.0],
        "spend_365d": [3600.0, 3600.0, 600.0, 100.0, 240.0],
        "tenure_months": [30.0, 40.0, 10.0, 20.0, 24.0],
        "monetary_total": [9000.0, 9000.0, 500.0, 3000.0, 480.0]})
    return S.decide_snapshot(c, horizon_days=90, params=params), params


def test_the_campaign_is_exactly_the_retain_actions_and_the_totals_add_up():
    run, params = _decided_world()
    out = run.customers.set_index("customer_id")
    # 'vip': high value, low risk, but 0.3 x 0.2 x 1,800 of margin = 108 > 10: a contact
    # pays, so it is in the campaign (not left in VIP care at no campaign cost)
    assert out.loc["vip", "action"] == "Retain - automated offer"
    # 'steady': 0.01 x 0.2 x 1,800 = 3.6 < 10: VIP care, outside the campaign
    assert out.loc["steady", "action"] == "Nurture / VIP care"
    # 'falling': high value, high risk: personal outreach although 0.6 x 0.2 x 50 = 6 < 10,
    # so the campaign carries its negative incremental profit rather than hiding it
    assert out.loc["falling", "action"] == "Retain - personal outreach"
    assert out.loc["falling", "incremental_profit"] == pytest.approx(0.6 * 0.2 * 50 - 10)
    retain = out.index[out["action"].str.startswith(S.RETAIN_PREFIX)]
    assert set(retain) == set(out.index[out["in_campaign"]]) == {"vip", "risky", "falling"}
    assert run.retention["campaign_size"] == 3
    assert run.retention["campaign_cost"] == pytest.approx(3 * (params.contact_cost
                                                                + params.offer_cost))
    assert run.retention["targeted_by_profit"] == 2           # vip and risky pay for themselves
    assert run.retention["campaign_high_risk"] == 2           # risky and falling
    # one period for every number: 12 months (the assumed value window) for all
    period = run.retention["decision_period_days"]
    assert period == run.retention["value_window_days"]
    assert out.loc["small", "ordinary_profit"] == pytest.approx(
        out.loc["small", "expected_profit"] * period / 90)
    assert (out.loc[~out["in_campaign"], "incremental_profit"] == 0).all()
    acts = run.actions.set_index("action")
    assert acts["customers"].sum() == len(out)
    assert acts["total_profit"].sum() == pytest.approx(run.retention["total_profit"])
    assert acts["incremental_profit"].sum() == pytest.approx(
        run.retention["expected_incremental_profit"])
    assert acts["action_cost"].sum() == pytest.approx(run.retention["campaign_cost"])
    assert (acts["ordinary_profit"] + acts["incremental_profit"]).sum() == pytest.approx(
        run.retention["ordinary_profit"] + run.retention["expected_incremental_profit"])


def test_the_campaign_file_is_the_retain_actions(tmp_path):
    run, _ = _decided_world()
    run.customers.assign(churn_probability=0.5, reasons="=HYPERLINK(\"x\")").to_parquet(
        tmp_path / "customers.parquet", index=False)
    S.write_strategy(run, tmp_path)
    campaign = pd.read_csv(tmp_path / "strategy" / "campaign.csv")
    retain = run.customers[run.customers["action"].str.startswith(S.RETAIN_PREFIX)]
    assert sorted(campaign["customer_id"]) == sorted(retain["customer_id"])
    assert list(campaign.columns) == list(S.CAMPAIGN_COLUMNS)
    assert campaign["incremental_profit"].is_monotonic_decreasing
    assert not campaign["reasons"].str.startswith("=").any()      # neutralised for spreadsheets


def test_decisions_the_executors_wrote_as_part_files_are_read_as_one_table(tmp_path):
    """On a cluster Spark's executors write the decision table as a folder of part files
    (strategy.decide_on_spark; the run's customers are then None): the campaign file is
    read from it for the ids given, and read_strategy and the phase-out list read it as
    the one table."""
    import dataclasses

    run, _ = _decided_world()
    out = run.customers.copy()
    out.loc[out.index[-1], "phaseout_candidate"] = True      # (one on the list, to read)
    store = RunStore(tmp_path)
    store.write_profile_table(out[["customer_id"]].assign(churn_probability=0.5,
                                                           reasons="why"))
    folder = store.decisions_table
    folder.mkdir(parents=True)
    half = len(out) // 2
    out.iloc[:half].to_parquet(folder / "part-00000.parquet", index=False)
    out.iloc[half:].to_parquet(folder / "part-00001.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    retain = out.loc[out["action"].str.startswith(S.RETAIN_PREFIX), "customer_id"]
    assert 0 < len(retain) < len(out)
    # the warnings too, in the rules' order, then by id
    ids = sorted(out["customer_id"])
    alerts = pd.DataFrame({"customer_id": [ids[0], ids[1], ids[2], ids[0], ids[3], ids[1]],
                           "rule": ["overdue"] * 3 + ["spend drop"] * 2 + ["new complaint"],
                           "detail": "x"})
    store.alerts_table.mkdir(parents=True)
    cut = 4
    alerts.iloc[:cut].to_parquet(store.alerts_table / "part-00000.parquet", index=False)
    alerts.iloc[cut:].to_parquet(store.alerts_table / "part-00001.parquet", index=False)
    S.write_strategy(dataclasses.replace(run, customers=None, alerts=None), tmp_path,
                     campaign_ids=retain.tolist())
    counted = S.alert_counts(tmp_path)
    assert (counted["alerts"], counted["customers"]) == (len(alerts),
                                                         alerts["customer_id"].nunique())
    expected = alerts["rule"].value_counts()
    assert counted["by_rule"].set_index("rule")["alerts"].to_dict() == expected.to_dict()
    assert counted["by_rule"]["alerts"].is_monotonic_decreasing
    pd.testing.assert_frame_equal(S.read_alerts(tmp_path, cut + 2),
                                  alerts.head(cut + 2).reset_index(drop=True),
                                  check_dtype=False)
    campaign = pd.read_csv(tmp_path / "strategy" / "campaign.csv", dtype={"customer_id": str})
    assert sorted(campaign["customer_id"]) == sorted(retain)
    back = S.read_strategy(tmp_path)
    # (texts come back as pandas' strings; numbers and flags keep their types)
    pd.testing.assert_frame_equal(back.customers, out, check_dtype=False)
    kept = out.select_dtypes(["number", "bool"]).columns
    assert len(kept) > 10 and (back.customers.dtypes[kept] == out.dtypes[kept]).all()
    listed = S.phaseout_list(tmp_path)
    assert listed["customer_id"].tolist() == out.loc[out["phaseout_candidate"],
                                                     "customer_id"].tolist() != []


def test_the_policy_reads_as_sentences():
    table = S.policy_table().set_index("action")["conditions"]
    assert table[S.PHASEOUT_REVIEW] == "on the phase-out list (every guardrail passed)"
    assert table[S.WIN_BACK] == "lifecycle stage lapsed or lost and value tier high"
    assert table[S.SERVE_LOW_COST] == ("value tier low and not profitable at the current "
                                       "cost to serve")
    assert not table.str.contains(r"\bin True\b|\[|_").any()


def test_learned_uplift_values_each_contact_by_its_own_incremental_margin():
    c = pd.DataFrame({"customer_id": list("abc"), "churn_probability": [0.9, 0.1, 0.5],
                      "spend_365d": [0.0, 0.0, 0.0], "predicted_value": [300.0, 100.0, 600.0]})
    econ = pd.DataFrame({"margin_rate_used": [0.5] * 3})
    # b gains most although its expected margin is the smallest
    frame, summary = S.retention_targeting(c, econ, params=P, uplift_rate=0.1,
                                           window_days=180, horizon_days=90,
                                           uplift_per_customer=np.array([5.0, 40.0, 25.0]))
    assert frame["value_if_retained"].tolist() == pytest.approx([300, 100, 600])
    assert frame["retention_gain"].tolist() == pytest.approx([-5, 30, 15])
    assert frame["rank"].tolist() == [3, 1, 2]
    assert frame["targeted"].tolist() == [False, True, True]
    assert summary["method"] == "learned" and summary["campaign_size"] == 2
    assert summary["expected_margin_saved"] == pytest.approx(65)


def test_the_effect_is_measured_over_the_longest_window_enough_campaigns_share():
    as_of = dt.date(2026, 1, 1)
    monthly = pd.DataFrame({"campaign_date": [as_of - dt.timedelta(days=30 * k)
                                              for k in range(1, 13)]})
    window, dates = S.measurement_window(monthly, as_of=as_of, horizon_days=90)
    # 365 days have passed for none of them, 270 for four (360, 330, 300, 270 days ago)
    assert window == 270 and len(dates) == 4 and max(dates) == as_of - dt.timedelta(days=270)
    one = monthly.head(1).assign(campaign_date=as_of - dt.timedelta(days=200))
    assert S.measurement_window(one, as_of=as_of, horizon_days=90) == (
        200, [as_of - dt.timedelta(days=200)])
    two = monthly.tail(2)      # 330 and 360 days ago: too few to pool, the earliest alone
    assert S.measurement_window(two, as_of=as_of, horizon_days=90) == (
        360, [as_of - dt.timedelta(days=360)])


def test_a_customer_in_several_campaigns_is_one_cluster():
    rng = np.random.default_rng(3)
    n = 400
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    y = X @ [1.0, 2.0, 0.5] + rng.normal(size=n)
    _, se_independent = last_coefficient(X, y)
    # the same rows twice, as if every customer were in two campaigns: HC1 would halve
    # the error by counting each customer twice; clustering by customer does not
    ids = np.arange(n)
    _, se_doubled_hc1 = last_coefficient(np.vstack([X, X]), np.concatenate([y, y]))
    _, se_clustered = last_coefficient(np.vstack([X, X]), np.concatenate([y, y]),
                                  clusters=np.concatenate([ids, ids]))
    assert se_doubled_hc1 < 0.75 * se_independent
    assert se_clustered == pytest.approx(se_independent, rel=0.05)


def test_who_carries_which_reasons():
    """Churn reasons for everyone on a list or under a warning and the tops of the
    tables; value reasons only where the case rests on value (phase-out review) and the
    highest values."""
    n = 400
    rng = np.random.default_rng(3)
    c = pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(n)],
        "action": np.where(np.arange(n) < 50, S.RETAIN_AUTOMATED,
                           np.where(np.arange(n) < 60, S.PHASEOUT_REVIEW, S.MAINTAIN)),
        "alerts": np.where(np.arange(n) % 7 == 0, "overdue", ""),
        "churn_probability": rng.random(n), "predicted_value": rng.random(n) * 100})
    churn, value = S.needs_reasons(c), S.needs_value_reasons(c)
    top_value = set(c["predicted_value"].nlargest(S.TOP_OF_TABLE).index)
    top_churn = set(c["churn_probability"].nlargest(S.TOP_OF_TABLE).index)
    assert set(c.index[value]) == top_value | set(range(50, 60))
    assert set(c.index[churn]) == (set(range(60)) | set(range(0, n, 7)) | top_value
                                   | top_churn)


def test_alert_rules_are_joined_per_customer_in_the_alerts_order():
    rng = np.random.default_rng(3)
    alerts = pd.DataFrame({"customer_id": rng.choice(list("abcdefg"), 40),
                           "rule": rng.choice(["overdue", "declining", "complaint"], 40)})
    expected = alerts.groupby("customer_id")["rule"].agg("; ".join)
    joined = S._rules_by_customer(alerts)
    assert joined.sort_index().to_dict() == expected.to_dict()
    assert S._rules_by_customer(alerts.iloc[:0]).empty
