import datetime as dt

import numpy as np
import pandas as pd
import pytest

from analysis.clv import BetaGeoModel, GammaGammaModel, rfm_summaries, rfm_summary

from .conftest import require_cdnow


@pytest.fixture(scope="module")
def sample_summary():
    folder = require_cdnow()
    s = pd.read_csv(folder / "CDNOW_sample.txt", sep=r"\s+", header=None,
                    names=["original_id", "customer_id", "date", "cds", "amount"],
                    dtype={"customer_id": str})
    s["order_date"] = pd.to_datetime(s["date"].astype(str), format="%Y%m%d")
    return rfm_summary(s, calibration_end=dt.date(1997, 10, 1))


def test_summary_follows_the_literature(sample_summary):
    assert len(sample_summary) == 2_357
    assert (sample_summary["frequency"] == 0).sum() == 1_411
    first = sample_summary.loc["0001"]
    assert first["frequency"] == 2 and first["recency"] == pytest.approx(30.43, abs=0.01)
    assert first["T"] == pytest.approx(38.86, abs=0.01)


def test_bgnbd_reproduces_fader_hardie_lee_2005(sample_summary):
    s = sample_summary
    model = BetaGeoModel().fit(s["frequency"], s["recency"], s["T"])
    published = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    for name, value in published.items():
        assert model.params_[name] == pytest.approx(value, rel=0.01), name
    assert model.loglik_ == pytest.approx(-9582.4, abs=0.5)


def test_gamma_gamma_reproduces_fader_hardie_2013(sample_summary):
    s = sample_summary
    model = GammaGammaModel().fit(s["frequency"], s["monetary_value"])
    for name, value in {"p": 6.25, "q": 3.74, "gamma": 15.44}.items():
        assert model.params_[name] == pytest.approx(value, rel=0.02), name


def test_bgnbd_predictions_behave():
    model = BetaGeoModel()
    model.params_ = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    # one-time buyers are "alive" with probability 1 (why P(alive) is no churn score)
    assert model.probability_alive([0], [0], [30])[0] == 1.0
    # a frequent buyer who stopped long ago is less likely alive than a recent one
    recent, stale = model.probability_alive([5, 5], [30, 5], [32, 32])
    assert recent > 0.8 > 0.3 > stale
    # expected purchases grow with the horizon and with past frequency
    e = model.expected_purchases(np.array([10, 39]), [3, 3], [30, 30], [32, 32])
    assert 0 < e[0] < e[1]
    assert model.expected_purchases(39, [6], [30], [32])[0] > e[1]
    # a new customer's expectation grows with the horizon
    assert 0.3 < model.expected_purchases_new(39) < model.expected_purchases_new(78)


def test_gamma_gamma_shrinks_towards_the_population_mean():
    gg = GammaGammaModel()
    gg.params_ = {"p": 6.25, "q": 3.74, "gamma": 15.44}
    population = 6.25 * 15.44 / 2.74
    one, many = gg.expected_spend([1, 20], [100.0, 100.0])
    assert population < one < many < 100.0
    assert gg.expected_spend([0], [0.0])[0] == pytest.approx(population)


def test_clv_is_discounted_spend_over_the_months():
    model = BetaGeoModel()
    model.params_ = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    gg = GammaGammaModel()
    gg.params_ = {"p": 6.25, "q": 3.74, "gamma": 15.44}
    args = ([3], [30.0], [32.0], [40.0])
    undiscounted = gg.customer_lifetime_value(model, *args, months=12, monthly_discount_rate=0)
    expected = model.expected_purchases(12 * 30.4375 / 7, *args[:3]) * gg.expected_spend(
        [3], [40.0])
    assert undiscounted[0] == pytest.approx(expected[0], rel=1e-9)
    assert gg.customer_lifetime_value(model, *args, months=12)[0] < undiscounted[0]


def test_fit_refuses_too_little_data():
    with pytest.raises(ValueError, match="at least"):
        BetaGeoModel().fit([0, 0, 1], [0, 0, 1], [5, 5, 5])


def test_summary_in_sql_equals_the_pandas_one():
    """The DuckDB path (used on large histories) gives the same summary as pandas:
    same-day purchases merged, refunds and non-completed lines left out."""
    from analysis.demo import DemoWorld, generate_demo
    from analysis.features import connect

    tx = generate_demo(DemoWorld(n_customers=400, seed=5))["transactions"]
    tx.loc[tx.index[:40], "amount"] *= -1                    # refunds are not purchases
    end, start = dt.date(2025, 6, 1), dt.date(2022, 6, 1)
    expected = rfm_summary(tx, calibration_end=end, start=start)
    got = rfm_summary(connect({"transactions": tx}), calibration_end=end, start=start)
    assert len(got) > 300 and (got["frequency"] > 0).sum() > 100
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_index_type=False,
                                  check_names=False)


def test_summaries_at_several_dates_from_one_pass_equal_one_summary_each():
    from analysis.demo import DemoWorld, generate_demo
    from analysis.features import connect

    tx = generate_demo(DemoWorld(n_customers=400, seed=6))["transactions"]
    tx.loc[tx.index[:40], "amount"] *= -1
    con = connect({"transactions": tx})
    ends = [dt.date(2025, 6, 1), dt.date(2024, 9, 1), dt.date(2025, 1, 1)]
    got = dict(rfm_summaries(con, calibration_ends=ends, extra_days=60))
    assert list(got) == sorted(ends)
    for end in ends:
        pd.testing.assert_frame_equal(got[end], rfm_summary(con, calibration_end=end))
    # the table of purchase days is gone once the summaries are read
    assert not con.execute("SELECT * FROM duckdb_tables() "
                           "WHERE table_name = 'purchase_days_rfm'").fetchall()


def simulate_bgnbd(n, params, *, weeks, seed):
    """Customers who all made a first purchase at week 0, living by the BG/NBD story:
    Poisson purchases at rate lambda ~ Gamma(r, alpha); after each repeat purchase they
    become inactive with probability p ~ Beta(a, b). Returns each one's purchase times."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(params["r"], 1 / params["alpha"], n)
    p = rng.beta(params["a"], params["b"], n)
    out = []
    for rate, drop in zip(lam, p, strict=True):
        times, t = [], 0.0
        while True:
            t += rng.exponential(1 / rate)
            if t > weeks:
                break
            times.append(t)
            if rng.random() < drop:
                break
        out.append(np.array(times))
    return out


def test_probability_of_no_purchase_matches_simulated_customers():
    """With the true parameters, P(no purchase in the holdout | calibration history) is
    a conditional probability: per history group, its mean must match the share of
    simulated customers who made none (within four binomial standard errors)."""
    params = {"r": 0.5, "alpha": 4.0, "a": 0.8, "b": 2.5}
    calibration, holdout = 39.0, 13.0
    lives = simulate_bgnbd(20_000, params, weeks=calibration + holdout, seed=3)
    x = np.array([(t <= calibration).sum() for t in lives], dtype=float)
    tx = np.array([t[t <= calibration].max() if (t <= calibration).any() else 0.0
                   for t in lives])
    quiet = np.array([not ((t > calibration) & (t <= calibration + holdout)).any()
                      for t in lives])
    model = BetaGeoModel()
    model.params_ = params
    predicted = model.probability_no_purchase(holdout, x, tx, np.full(len(x), calibration))
    assert ((predicted > 0) & (predicted < 1)).all()
    for group in (x == 0, x == 1, (x >= 2) & (x <= 4), x >= 5):
        observed, expected = quiet[group].mean(), predicted[group].mean()
        se = np.sqrt(expected * (1 - expected) / group.sum())
        assert abs(observed - expected) < 4 * se, (group.sum(), observed, expected)
    # a brand-new customer (no repeat, T = 0): (alpha / (alpha + t)) ** r
    assert model.probability_no_purchase(holdout, 0, 0, 0) == pytest.approx(
        (4.0 / 17.0) ** 0.5)


def test_bgnbd_fits_customers_of_a_steady_rhythm_and_predicts_their_purchases():
    """Customers who all buy at about the same rate and rarely drop out are the Poisson
    limit of BG/NBD (r and alpha grow together without bound). The fit stops at the
    bounds of :attr:`BetaGeoModel.LOG_BOUNDS`, where the predictions have settled: finite
    for everyone, and the holdout's purchases as they happened (without the bounds, two
    of these seeds gave NaN for every customer)."""
    params = {"r": 1e6, "alpha": 2e6, "a": 1e3, "b": 5e4}     # 0.5 a week, 2 % dropout
    calibration, holdout = 52.0, 13.0
    for seed in (1, 2):
        lives = simulate_bgnbd(2_000, params, weeks=calibration + holdout, seed=seed)
        x = np.array([(t <= calibration).sum() for t in lives], dtype=float)
        tx = np.array([t[t <= calibration].max() if (t <= calibration).any() else 0.0
                       for t in lives])
        t = np.full(len(x), calibration)
        bought = np.array([((w > calibration) & (w <= calibration + holdout)).sum()
                           for w in lives])
        model = BetaGeoModel().fit(x, tx, t)
        assert all(np.isfinite(v) for v in model.params_.values())
        assert np.isfinite(model.loglik_) and model.loglik_ < 0
        expected = model.expected_purchases(holdout, x, tx, t)
        assert np.isfinite(expected).all()
        assert np.isfinite(model.probability_no_purchase(holdout, x, tx, t)).all()
        assert expected.mean() == pytest.approx(bought.mean(), rel=0.05)


def test_median_time_to_next_purchase_is_where_the_chance_of_a_purchase_reaches_half():
    from analysis.clv import BetaGeoModel

    bg = BetaGeoModel()
    bg.params_ = {"r": 0.25, "alpha": 4.0, "a": 0.8, "b": 2.5}
    x, tx, T = np.array([0, 3, 10, 2]), np.array([0, 30, 38, 2]), np.array([40, 40, 40, 40])
    h = bg.median_time_to_next_purchase(x, tx, T)
    alive = bg.probability_alive(x, tx, T)
    for i in range(len(x)):
        if alive[i] > 0.5:
            p_buy = 1 - bg.probability_no_purchase(h[i], x[i], tx[i], T[i])
            assert p_buy == pytest.approx(0.5, abs=1e-9)
            # a week earlier it was less likely than not
            assert 1 - bg.probability_no_purchase(max(h[i] - 1, 0), x[i], tx[i], T[i]) < 0.5
        else:
            assert np.isnan(h[i])
    assert np.isnan(h[3]) and not np.isnan(h[2])   # long gone vs bought recently and often
    assert h[2] < h[1]                              # the more frequent buyer is sooner


def test_lifetime_outlook_dates_the_next_order_and_values_the_next_year(small_demo):
    from analysis import models

    tx = pd.read_parquet(small_demo / "transactions.parquet")
    as_of = (tx["order_date"].max() + pd.Timedelta(days=1)).date()
    ids = pd.Series(sorted(tx["customer_id"].unique()) + ["never-seen"])
    out = models.lifetime_outlook(tx, as_of=as_of, customers=ids).set_index("customer_id")
    assert list(out.index) == list(ids)
    assert pd.isna(out.loc["never-seen", "expected_next_order"])
    dated = out["expected_next_order"].dropna()
    assert len(dated) and (dated > pd.Timestamp(as_of)).all()
    assert (dated <= pd.Timestamp(as_of) + pd.Timedelta(days=7 * 104 + 7)).all()
    # customers who bought often and lately come back sooner and are worth more than
    # those long gone
    summary = rfm_summary(tx, calibration_end=as_of)
    recent = summary[(summary["frequency"] >= 5) & (summary["T"] - summary["recency"] < 8)]
    gone = summary[(summary["frequency"] >= 1) & (summary["T"] - summary["recency"] > 80)]
    assert len(recent) >= 10 and len(gone) >= 10
    wait = (out["expected_next_order"] - pd.Timestamp(as_of)).dt.days
    assert wait.reindex(recent.index).median() < wait.reindex(gone.index).fillna(10**6).median()
    assert out["predicted_clv"].reindex(recent.index).median() > \
        5 * out["predicted_clv"].reindex(gone.index).median()


def test_expected_alive_time_by_hand():
    from analysis.clv import expected_alive_time

    got = expected_alive_time(np.array([0.0, 0.01, 1e-15, 0.02]), np.array([365, 100, 365, 0]))
    assert got[0] == 365                                    # no hazard: the whole window
    assert got[1] == pytest.approx((1 - np.exp(-1.0)) / 0.01)
    assert got[2] == pytest.approx(365)                     # no loss of digits near 0
    assert got[3] == 0


def test_rates_if_alive_are_the_posterior_means_of_an_active_customer():
    bg = BetaGeoModel()
    bg.params_ = {"r": 0.5, "alpha": 4.0, "a": 0.8, "b": 2.5}
    rate, hazard = bg.rates_if_alive([0, 3], [0, 15], [10, 20])
    # rate (r + x) / (alpha + T), dropout share a / (a + b + x) of each purchase
    assert rate.tolist() == pytest.approx([0.5 / 14, 3.5 / 24])
    assert hazard.tolist() == pytest.approx([0.5 / 14 * 0.8 / 3.3, 3.5 / 24 * 0.8 / 6.3])
    # the lifetime of a customer buying at rate lambda who drops out after each purchase
    # with probability p is exponential with hazard lambda p (a geometric sum of gaps)
    rng = np.random.default_rng(0)
    lam, p = 0.5, 0.2
    lives = [rng.exponential(1 / lam, rng.geometric(p)).sum() for _ in range(20_000)]
    assert np.mean(lives) == pytest.approx(1 / (lam * p), rel=0.03)
    assert np.mean(np.array(lives) > 10) == pytest.approx(np.exp(-lam * p * 10), abs=0.01)


def test_bgnbd_on_a_sample_of_a_large_base_is_close_and_repeatable():
    from analysis.clv import fit_bgnbd

    params = {"r": 0.5, "alpha": 4.0, "a": 0.8, "b": 2.5}
    lives = simulate_bgnbd(12_000, params, weeks=39.0, seed=7)
    summary = pd.DataFrame({"frequency": [float(len(t)) for t in lives],
                            "recency": [t.max() if len(t) else 0.0 for t in lives],
                            "T": 39.0})
    full = fit_bgnbd(summary).params_
    sample = fit_bgnbd(summary, max_customers=6_000).params_
    assert sample == fit_bgnbd(summary, max_customers=6_000).params_
    for name in params:
        assert sample[name] == pytest.approx(full[name], rel=0.25), name


def test_baseline_fitted_on_a_sample_scores_everyone_close_to_the_full_fit():
    """BG/NBD and Gamma-Gamma fitted on evenly spaced customers of a large base (here
    1,500 of 4,000) score every customer, close to the fit on all of them."""
    from analysis.demo import DemoWorld, generate_demo
    from analysis.features import connect
    from analysis.models import bgnbd_baseline, lifetime_outlook

    tx = generate_demo(DemoWorld(n_customers=4_000, seed=8))["transactions"]
    con = connect({"transactions": tx})
    cutoff = dt.date(2025, 7, 1)
    ids = pd.Series(sorted(tx.loc[tx["order_date"] < pd.Timestamp(cutoff),
                                  "customer_id"].unique()))
    full, p_full = bgnbd_baseline(con, cutoff=cutoff, horizon_days=90, customers=ids,
                                  max_customers=None)
    part, p_part = bgnbd_baseline(con, cutoff=cutoff, horizon_days=90, customers=ids,
                                  max_customers=1_500)
    assert p_part["bgnbd"] != p_full["bgnbd"]                 # fitted on fewer customers
    # everyone with a purchase before the cutoff is scored, as by the full fit
    assert len(part) == len(ids) > 3_000
    assert part.notna().equals(full.notna()) and part["p_alive"].notna().mean() > 0.95
    known = full["p_no_purchase"].notna()
    assert np.corrcoef(part.loc[known, "p_no_purchase"],
                       full.loc[known, "p_no_purchase"])[0, 1] > 0.99
    ratio = part["expected_spend"].sum() / full["expected_spend"].sum()
    assert 0.85 < ratio < 1.15
    outlook = lifetime_outlook(con, as_of=cutoff, customers=ids, max_customers=1_500)
    assert outlook["predicted_clv"].notna().mean() > 0.95
