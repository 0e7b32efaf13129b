"""The uplift learner, the Qini curve and AUUC, and the demo's monthly campaigns."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import features as F
from analysis.demo import DemoWorld, generate_demo
from analysis.uplift import (
    HAZARD_ROW_COLUMNS,
    UpliftLearner,
    auuc,
    compare_rankings,
    contact_value,
    customer_share,
    estimate_hazard_effect,
    full_window_dates,
    hazard_effect_rows,
    learn_uplift,
    qini_curve,
    uplift_at_depth,
)


def _campaigns(rate: np.ndarray, *, n: int, x: np.ndarray, seed: int):
    """Randomised rows: baseline margin 40 + 40 x0, noise sd 25, a contact adds
    ``rate`` x the baseline; a quarter are contacted."""
    rng = np.random.default_rng(seed)
    baseline = 40 + 40 * x[:, 0]
    t = rng.random(n) < 0.25
    y = baseline + t * rate * baseline + rng.normal(0, 25, n)
    return t, y, rate * baseline


@pytest.fixture(scope="module")
def planted():
    n = 8_000
    x = np.random.default_rng(0).random((n, 4))
    het = np.where(x[:, 1] > 0.5, 0.6, 0.0)           # half gain 60 %, half nothing
    t, y, tau = _campaigns(het, n=n, x=x, seed=1)
    model = UpliftLearner(random_state=0).fit(x, t, y)
    t0, y0, tau0 = _campaigns(np.full(n, 0.3), n=n, x=x, seed=2)   # same mean, no spread
    flat = UpliftLearner(random_state=0).fit(x, t0, y0)
    return x, tau, model, tau0, flat


def test_the_learner_recovers_a_planted_heterogeneous_effect(planted):
    x, tau, model, _, _ = planted
    est = model.predict(x)
    assert model.weight_ > 0.5                                  # heterogeneity identified
    assert stats.spearmanr(est, tau).statistic > 0.5
    top = est >= np.quantile(est, 2 / 3)
    bottom = est <= np.quantile(est, 1 / 3)
    # the planted groups differ by 0.6 x a baseline of 40..80: the top third by estimate
    # must hold far more true uplift than the bottom third
    assert tau[top].mean() > tau[bottom].mean() + 0.5 * (tau[tau > 0].mean() - 0.0)


def test_without_heterogeneity_it_shrinks_to_the_pooled_effect(planted):
    x, _, model, _, flat = planted
    assert abs(flat.pooled_rate_ - 0.3) < 0.1
    assert flat.weight_ < model.weight_
    # the per-customer uplift rate hardly spreads once shrunk: a fraction of the spread
    # of the heterogeneous case, and of its own unshrunk spread
    rate_het = model.predict(x) / model.predict_baseline(x)
    rate_flat = flat.predict(x) / flat.predict_baseline(x)
    rate_raw = flat.predict_unshrunk(x) / flat.predict_baseline(x)
    assert rate_flat.std() < 0.25 * rate_het.std()
    assert rate_flat.std() < 0.5 * rate_raw.std()


def test_qini_curve_and_auuc_on_a_hand_computed_example():
    score = [4, 3, 2, 1]
    treated = [True, False, True, False]
    outcome = [10.0, 2.0, 6.0, 4.0]
    curve = qini_curve(score, treated, outcome)
    # top k: treated sum less control sum x n_treated / n_control, over the 2 treated
    np.testing.assert_allclose(curve["qini"], [0, 5, 4, 6, 5])
    assert curve["qini"].iloc[-1] == pytest.approx(np.mean([10, 6]) - np.mean([2, 4]))
    # mean of (5 - 1.25, 4 - 2.5, 6 - 3.75, 5 - 5)
    assert auuc(curve) == pytest.approx(1.875)
    assert auuc(qini_curve([1, 2, 3, 4], treated, outcome)) < auuc(curve)
    assert uplift_at_depth(score, treated, outcome, share=0.5) == pytest.approx(8.0)
    result = compare_rankings({"good": np.array(score), "bad": -np.array(score)},
                              treated, outcome, depth_share=0.5)
    assert result["winner"] == "good" and result["n_treated"] == 2


def test_full_window_dates_need_both_arms_and_a_closed_window():
    campaign = pd.DataFrame({
        "customer_id": ["a", "b", "a", "b", "a"],
        "campaign_date": pd.to_datetime(["2025-01-01", "2025-01-01", "2025-02-01",
                                         "2025-02-01", "2025-03-01"]),
        "treated": [True, False, True, False, True]})
    assert full_window_dates(campaign, as_of=dt.date(2025, 5, 5), window_days=90) == [
        dt.date(2025, 1, 1), dt.date(2025, 2, 1)]        # March: no control row
    assert full_window_dates(campaign, as_of=dt.date(2025, 4, 15), window_days=90) == [
        dt.date(2025, 1, 1)]


@pytest.fixture(scope="module")
def demo():
    world = DemoWorld(n_customers=5_000, seed=5)
    return world, generate_demo(world)


def test_demo_has_monthly_campaigns_with_a_persistent_random_control(demo):
    world, frames = demo
    campaign, truth, tx = frames["campaign"], frames["truth_customers"], frames["transactions"]
    dates = sorted(campaign["campaign_date"].unique())
    assert len(dates) == 12
    gaps = np.diff(dates).astype("timedelta64[D]").astype(int)
    assert set(gaps) == {30}
    assert pd.Timestamp(world.as_of) - dates[0] <= pd.Timedelta(days=366)
    # the control group: about 20 %, never contacted, present in every campaign
    assert 0.17 < truth["control_group"].mean() < 0.23
    control = set(truth.loc[truth["control_group"], "customer_id"])
    assert not control & set(campaign.loc[campaign["treated"], "customer_id"])
    assert campaign.loc[~campaign["treated"], "customer_id"].isin(control).all()
    # nobody is contacted twice
    assert not campaign.loc[campaign["treated"], "customer_id"].duplicated().any()
    # randomised within each campaign: contacted and control balanced on spend in the
    # year before (standardised difference over all campaign rows, ~0.02 standard error)
    rows = []
    for date in dates:
        part = campaign[campaign["campaign_date"] == date]
        before = tx[(tx["order_date"] < date) & (tx["order_date"] >= date - pd.Timedelta(
            days=365))].groupby("customer_id")["amount"].sum()
        rows.append(part.assign(spend=part["customer_id"].map(before).fillna(0.0)))
    rows = pd.concat(rows)
    t, c = rows.loc[rows["treated"], "spend"], rows.loc[~rows["treated"], "spend"]
    smd = (t.mean() - c.mean()) / np.sqrt((t.var() + c.var()) / 2)
    assert abs(smd) < 0.1
    assert 0.15 < rows["treated"].mean() < 0.4


def test_demo_keeps_a_single_campaign_world():
    frames = generate_demo(DemoWorld(n_customers=800, seed=3, n_campaigns=1))
    campaign = frames["campaign"]
    assert campaign["campaign_date"].nunique() == 1
    assert campaign["treated"].any() and (~campaign["treated"]).any()


def test_a_contacts_value_by_hand():
    from analysis.clv import expected_alive_time as alive

    expected_margin = np.array([100.0, 100.0, 0.0, 50.0, 100.0])
    hazard = np.array([0.0, 0.01, 0.01, np.nan, 0.002])
    got = contact_value(expected_margin, hazard, effect=0.5, horizon_days=90, window_days=365)
    # 100 of margin over 90 days at hazard 0.01: a margin rate of 100 / A(0.01, 90) while
    # active; the contact halves the hazard, adding A(0.005, 365) - A(0.01, 365) days of it
    by_hand = 100 * (((1 - np.exp(-0.005 * 365)) / 0.005 - (1 - np.exp(-3.65)) / 0.01)
                     / ((1 - np.exp(-0.9)) / 0.01))
    assert got[1] == pytest.approx(by_hand)
    assert got[0] == 0            # would stay anyway: nothing to gain
    assert got[2] == 0            # nothing expected from them (gone): nothing to gain
    assert got[3] == 0            # no hazard estimate: not valued
    assert 0 < got[4] < got[1]    # a lower risk of leaving, less to gain
    assert got[4] == pytest.approx(100 * (alive(0.001, 365) - alive(0.002, 365))
                                   / alive(0.002, 90))
    # no effect, no value; the value grows with the effect
    assert contact_value(expected_margin, hazard, effect=0.0, horizon_days=90,
                         window_days=365).tolist() == [0.0] * 5
    assert (contact_value(expected_margin, hazard, effect=0.6, horizon_days=90,
                          window_days=365)[[1, 4]] > got[[1, 4]]).all()


def _hazard_rows(effect: float, *, n: int, seed: int) -> pd.DataFrame:
    """Campaign rows from the story :func:`estimate_hazard_effect` assumes: each customer
    is active with probability p_alive, buys on Poisson days at their rate while active
    and stays an exponential time; a contact (a quarter, at random) takes ``effect`` off
    the hazard. Three campaigns, followed 360, 240 and 120 days."""
    rng = np.random.default_rng(seed)
    window = rng.choice([360, 240, 120], n)
    p_alive = rng.uniform(0.4, 1.0, n)
    rate = rng.gamma(2.0, 0.02, n)
    hazard = rng.gamma(1.5, 0.003 / 1.5, n)
    treated = rng.random(n) < 0.25
    alive = rng.random(n) < p_alive
    life = rng.exponential(1 / (hazard * np.where(treated, 1 - effect, 1.0)))
    days = rng.poisson(rate * np.minimum(life, window)) * alive
    return pd.DataFrame({"customer_id": np.arange(n), "campaign_date": window,
                         "treated": treated, "propensity": 0.25, "window_days": window,
                         "p_alive": p_alive, "purchase_rate": rate, "hazard": hazard,
                         "purchase_days": days.astype(float)})


def test_the_hazard_effect_is_recovered_from_purchase_days():
    fit = estimate_hazard_effect(_hazard_rows(0.4, n=60_000, seed=1))
    assert fit["converged"] and fit["n_campaigns"] == 3 and fit["window_days"] == 360
    assert fit["ci_low"] < 0.4 < fit["ci_high"]
    assert abs(fit["effect"] - 0.4) < 0.12 and fit["se"] < 0.06
    none = estimate_hazard_effect(_hazard_rows(0.0, n=60_000, seed=2))
    assert none["ci_low"] < 0 < none["ci_high"]
    assert estimate_hazard_effect(_hazard_rows(0.4, n=60, seed=3).assign(treated=False)) \
        is None


def test_hazard_effect_rows_are_the_active_customers_with_their_own_window():
    rng = np.random.default_rng(4)
    days = pd.date_range("2024-01-01", "2024-12-31")
    ids = [f"c{i:02d}" for i in range(40)]
    tx = pd.DataFrame({"customer_id": np.repeat(ids, 12),
                       "order_date": rng.choice(days, 480),
                       "amount": 20.0, "status": "completed"})
    # c00 stops buying in March: not active at the June campaign
    tx = tx[~((tx["customer_id"] == "c00") & (tx["order_date"] >= "2024-03-01"))]
    campaign = pd.DataFrame({"customer_id": ids, "campaign_date": pd.Timestamp("2024-06-01"),
                             "treated": np.arange(40) % 4 == 0})
    rows = hazard_effect_rows(F.connect({"transactions": tx}), campaign,
                              as_of=dt.date(2025, 1, 1), horizon_days=60, window_days=120)
    assert list(rows.columns) == list(HAZARD_ROW_COLUMNS)
    assert "c00" not in set(rows["customer_id"]) and len(rows) >= 30
    assert (rows["window_days"] == 120).all()
    assert rows["propensity"].iloc[0] == pytest.approx(rows["treated"].mean())
    window = tx[(tx["order_date"] >= "2024-06-01") & (tx["order_date"] < "2024-09-29")]
    expected = window.groupby("customer_id")["order_date"].nunique()
    got = rows.set_index("customer_id")["purchase_days"]
    assert got.to_dict() == pytest.approx(expected.reindex(got.index, fill_value=0).to_dict())
    assert (rows["hazard"] > 0).all() and rows["p_alive"].between(0, 1).all()
    # a campaign whose first horizon has not closed yet gives no rows
    late = campaign.assign(campaign_date=pd.Timestamp("2024-12-01"))
    assert hazard_effect_rows(F.connect({"transactions": tx}), late,
                              as_of=dt.date(2025, 1, 1), horizon_days=60,
                              window_days=120).empty


def test_customer_share_keeps_whole_customers_the_same_in_every_run():
    ids = [f"c{i}" for i in range(5000)]
    campaign = pd.DataFrame({
        "customer_id": ids * 3,
        "campaign_date": np.repeat(pd.to_datetime(["2025-01-01", "2025-02-01",
                                                   "2025-03-01"]), 5000),
        "treated": np.tile(np.arange(5000) % 4 == 0, 3)})
    part = customer_share(campaign, share=0.2)
    assert 0.17 < len(part) / len(campaign) < 0.23
    # a kept customer keeps every campaign's row
    assert part.groupby("customer_id").size().eq(3).all()
    # the same customers in another run and in a subset of the campaigns
    again = customer_share(campaign.iloc[::-1], share=0.2)
    assert set(again["customer_id"]) == set(part["customer_id"])
    one = customer_share(campaign[campaign["campaign_date"] == "2025-02-01"], share=0.2)
    assert set(one["customer_id"]) == set(part["customer_id"])
    assert customer_share(campaign, share=1.0) is campaign


def test_the_learner_of_a_large_base_learns_from_a_fixed_share_of_whole_customers(demo):
    """Above ``max_rows`` campaign rows the learner fits and is judged on those of a
    fixed share of the customers: about ``max_rows`` rows, every campaign of a kept
    customer, and the same result twice."""
    world, frames = demo
    con = F.connect({k: frames[k] for k in ("transactions", "customers", "interactions")})
    kwargs = dict(as_of=world.as_of, horizon_days=90, window_days=90, margin_rate=0.3,
                  exclude_attributes=("gender", "age_band"))
    full = learn_uplift(con, frames["campaign"], max_rows=None, **kwargs)
    dates = set(full.dates)
    on_dates = frames["campaign"][pd.to_datetime(
        frames["campaign"]["campaign_date"]).dt.date.isin(dates)]
    cap = len(on_dates) // 3
    part = learn_uplift(con, frames["campaign"], max_rows=cap, **kwargs)
    again = learn_uplift(con, frames["campaign"], max_rows=cap, **kwargs)
    assert part.dates == full.dates
    # active customers only: fewer rows than the campaign rows kept
    assert 0.2 * full.model.n_rows_ < part.model.n_rows_ < 0.45 * full.model.n_rows_
    assert part.model.n_rows_ <= cap
    assert part.evaluation["auuc"] == again.evaluation["auuc"]
    n_held = part.evaluation["n_treated"] + part.evaluation["n_control"]
    assert n_held < 0.45 * (full.evaluation["n_treated"] + full.evaluation["n_control"])


def test_a_beaten_learner_is_not_refitted_when_the_caller_will_not_use_it(demo):
    world, frames = demo
    con = F.connect({k: frames[k] for k in ("transactions", "customers", "interactions")})
    kwargs = dict(as_of=world.as_of, horizon_days=90, window_days=90, margin_rate=0.3,
                  exclude_attributes=("gender", "age_band"), max_rows=None,
                  baselines=lambda rows: {"pooled": np.zeros(len(rows))})
    refitted = learn_uplift(con, frames["campaign"], **kwargs)
    judged = learn_uplift(con, frames["campaign"], refit_beaten=False, **kwargs)
    assert judged.evaluation == refitted.evaluation
    # this world's campaigns show no heterogeneity the learner can confirm: it ties with
    # one effect for everyone, and the simpler ranking wins
    assert refitted.evaluation["winner"] == "pooled"
    # the model judged, fitted on the campaigns before the held-out ones
    train = refitted.evaluation["train_campaigns"]
    assert [d.isoformat() for d in judged.dates] == train
    assert len(train) < len(refitted.dates)
    assert judged.model.n_rows_ < refitted.model.n_rows_


def test_recent_campaign_customers_hold_everyone_active_at_each_campaign(demo):
    """The customers features are built for at a campaign: every one of its customers
    active at it (a purchase within one horizon before), and none without a line then."""
    from analysis.uplift import recent_campaign_customers

    world, frames = demo
    con = F.connect({k: frames[k] for k in ("transactions", "customers", "interactions")})
    campaign = frames["campaign"]
    dates = sorted(pd.to_datetime(campaign["campaign_date"]).dt.date.unique())[:3]
    found = recent_campaign_customers(con, campaign, dates=dates, horizon_days=90)
    tx = frames["transactions"]
    for d in dates:
        at = set(campaign.loc[pd.to_datetime(campaign["campaign_date"]).dt.date == d,
                              "customer_id"])
        feats = F.build_features(con, cutoff=d, horizon_days=90)
        active = set(feats.loc[feats["recency_days"] <= 90, "customer_id"]) & at
        lines = tx[(tx["order_date"] < pd.Timestamp(d))
                   & (tx["order_date"] >= pd.Timestamp(d) - pd.Timedelta(days=90))]
        assert active <= set(found[d]) <= set(lines["customer_id"]) & at
        assert len(active) > 100 and len(found[d]) < len(at)
