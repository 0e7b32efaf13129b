import datetime as dt
import itertools

import numpy as np
import pandas as pd
import pytest

from analysis import features as F
from analysis import segments as S
from analysis.config import AnalysisParams
from analysis.store import RunStore


def frame(**cols):
    n = len(next(iter(cols.values())))
    return pd.DataFrame({"customer_id": [f"c{i}" for i in range(n)], **cols})


def test_rfm_map_names_every_score_pair():
    for r, fm in itertools.product(range(1, 6), repeat=2):
        hits = S.RFM_SEGMENTS[(S.RFM_SEGMENTS.r_min <= r) & (S.RFM_SEGMENTS.r_max >= r)
                              & (S.RFM_SEGMENTS.fm_min <= fm) & (S.RFM_SEGMENTS.fm_max >= fm)]
        assert len(hits), (r, fm)


def test_rfm_scores_and_segments():
    f = frame(recency_days=[1, 10, 100, 200, 400, 5, 300, 50, 20, 700],
              frequency=[30, 20, 2, 1, 1, 1, 15, 3, 10, 1],
              monetary_total=[900, 700, 50, 20, 10, 8, 800, 60, 300, 5])
    out = S.rfm_scores(f).set_index("customer_id")
    assert out.loc["c0", "rfm_score"] == "555" and out.loc["c0", "rfm_segment"] == "Champions"
    assert out.loc["c9", "r_score"] == 1 and out.loc["c9", "rfm_segment"] == "Long-gone light buyers"
    assert out.loc["c6", "rfm_segment"] == "Former top spenders"  # R 2, FM 5
    assert out.loc["c5", "rfm_segment"] == "First-time buyers"    # R 5, FM 1
    # ties share the lowest score: the four one-time buyers
    assert out.loc[["c3", "c4", "c5", "c9"], "f_score"].tolist() == [1, 1, 1, 1]


def test_segment_names_stages_and_risk_bands_share_no_word():
    import re

    from analysis.strategy import RISK_BANDS

    stop = {"a", "an", "and", "but", "for", "of", "or", "the", "to"}

    def words(names):
        return {w for name in names for w in re.findall(r"[a-z]+", name.lower())} - stop

    vocabularies = {"RFM segments": words(S.RFM_SEGMENTS["segment"]),
                    "lifecycle stages": words(S.LIFECYCLE_STAGES),
                    "risk bands": words(RISK_BANDS)}
    assert all(vocabularies.values())
    for (a, wa), (b, wb) in itertools.combinations(vocabularies.items(), 2):
        assert not wa & wb, f"{a} and {b} share {sorted(wa & wb)}"
    assert S.RFM_SEGMENTS["segment"].is_unique


def test_value_tiers_by_cumulative_share():
    f = frame(monetary_total=[500.0, 300.0, 100.0, 60.0, 40.0, -10.0])
    tiers = S.value_tiers(f, shares=(0.5, 0.3)).set_index("customer_id")
    # shares before each customer: 0, .5, .8, .9, .96, 1.0
    assert tiers["value_tier"].to_dict() == {"c0": "high", "c1": "mid", "c2": "low",
                                             "c3": "low", "c4": "low", "c5": "low"}
    assert tiers.loc["c5", "value"] == 0.0 and tiers.loc["c0", "value_rank"] == 1
    assert list(S.value_tiers(f).index) == list(range(6))  # input order kept


def test_values_equal_but_for_their_last_bits_rank_by_id_and_keep_their_tiers():
    """The same spend summed in another order (Spark, or DuckDB's threads) differs in its
    last bits: that must not decide which of two such customers is high value."""
    noisy = 0.1 + 0.2 - 0.3                        # 5.55e-17, a sum's rounding
    tiers = []
    for a, b in ((300.0 + noisy * 1e3, 300.0), (300.0, 300.0 + noisy * 1e3)):
        f = frame(monetary_total=[400.0, a, b, 0.0])     # c1 and c2 tie; shares 0, .4, .7
        tiers.append(S.value_tiers(f).set_index("customer_id"))
        assert f["monetary_total"].iloc[1] != f["monetary_total"].iloc[2]
    for t in tiers:
        assert t["value_tier"].to_dict() == {"c0": "high", "c1": "high", "c2": "mid",
                                             "c3": "low"}
        assert t["value_rank"].to_dict() == {"c0": 1, "c1": 2, "c2": 3, "c3": 4}


def test_pareto_curve_endpoints_and_shape():
    curve = S.pareto_curve(pd.Series([80.0, 10, 5, 5]), n_points=5)
    assert curve["value_share"].tolist() == pytest.approx([0, 0.8, 0.9, 0.95, 1.0])
    assert curve["customer_share"].tolist() == [0, 0.25, 0.5, 0.75, 1.0]


def test_lifecycle_against_own_rhythm():
    f = frame(tenure_days=[30, 400, 400, 400, 400, 400],
              recency_days=[10, 20, 40, 80, 200, 500],
              gap_median_days=[np.nan, 20.0, 20.0, 20.0, 20.0, np.nan])
    out = S.assign_lifecycle(f)
    assert out["lifecycle_stage"].tolist() == ["new", "active", "at risk", "lapsed", "lost",
                                               "lost"]
    assert out.loc[5, "rhythm_days"] == 20.0  # one-time buyer: population rhythm


def test_clusters_are_reproducible_and_described():
    rng = np.random.default_rng(0)
    n = 600
    group = rng.integers(0, 3, n)
    f = frame(recency_days=np.array([10, 300, 60])[group] * rng.uniform(0.8, 1.2, n),
              frequency=np.array([30, 2, 5])[group] * rng.uniform(0.8, 1.2, n),
              monetary_mean_order=np.array([80, 20, 40])[group] * rng.uniform(0.8, 1.2, n),
              tenure_days=np.full(n, 500.0), trend_180d=np.zeros(n))
    labels, summary = S.cluster_customers(f, seed=1)
    again, _ = S.cluster_customers(f, seed=1)
    pd.testing.assert_frame_equal(labels, again)
    assert len(summary) == 3                      # three planted groups found
    assert pd.crosstab(group, labels["cluster"]).gt(0).sum(axis=1).eq(1).all()
    assert summary["n_customers"].is_monotonic_decreasing
    assert summary["cluster_name"].is_unique and summary["description"].str.len().gt(20).all()


def test_cohort_matrix_on_hand_data():
    tx = pd.DataFrame({
        "customer_id": ["a", "a", "b", "b", "c"],
        "order_date": pd.to_datetime(["2024-01-05", "2024-02-10", "2024-01-20", "2024-03-01",
                                      "2024-02-02"]),
        "amount": [10.0, 20.0, 5.0, 7.0, 3.0], "status": "completed"})
    out = S.cohort_matrix(F.connect({"transactions": tx}), cutoff=dt.date(2024, 4, 1))
    jan = out[out["cohort"] == "2024-01-01"].set_index("months_since")
    assert jan["cohort_size"].tolist() == [2, 2, 2]
    assert jan["retention"].tolist() == [1.0, 0.5, 0.5]
    assert jan["revenue"].tolist() == [15.0, 20.0, 7.0]
    feb = out[out["cohort"] == "2024-02-01"]
    assert feb["cohort_size"].tolist() == [1] and feb["months_since"].tolist() == [0]


def test_segment_profile_shares_and_top_categories():
    df = frame(segment=["A", "A", "B"], monetary_total=[60.0, 20.0, 20.0],
               recency_days=[1, 3, 9], frequency=[5, 3, 1], churned=[0, 1, 1],
               top_category=["x", "x", "y"], top_channel=["web", "shop", "web"])
    out = S.segment_profile(df, by="segment", min_customers=1).set_index("segment")
    assert out.loc["A", "value_share"] == 0.8 and out.loc["A", "n_customers"] == 2
    assert out.loc["A", "churn_rate"] == 0.5
    assert out.loc["A", "top_categories"] == "x (100%)"
    assert out.index.tolist() == ["A", "B"]


def test_a_segment_too_small_is_counted_but_not_described():
    df = frame(segment=["A", "A", "B"], monetary_total=[60.0, 20.0, 20.0],
               recency_days=[1, 3, 9], frequency=[5, 3, 1], churned=[0, 1, 1],
               top_category=["x", "x", "y"], top_channel=["web", "shop", "web"])
    out = S.segment_profile(df, by="segment", min_customers=2).set_index("segment")
    assert out["described"].tolist() == [True, False]
    assert out.loc["B", "n_customers"] == 1 and out.loc["B", "value_share"] == 0.2
    assert np.isnan(out.loc["B", "churn_rate"]) and np.isnan(out.loc["B", "mean_value"])
    assert out.loc["B", "top_categories"] is None
    assert out.loc["A", "churn_rate"] == 0.5


def test_profile_customers_on_demo_world(small_demo, tmp_path):
    con = F.connect(
        {name: pd.read_parquet(small_demo / f"{name}.parquet")
         for name in ("transactions", "customers", "interactions")})
    as_of = F.data_end(con)
    profile = S.profile_customers(con, as_of=as_of, params=AnalysisParams(), seed=3,
                                  exclude_attributes=("gender", "age_band"))
    c = profile.customers
    assert {"segment", "value_tier", "lifecycle_stage", "cluster_name"} <= set(c.columns)
    assert "gender" not in c.columns and c["customer_id"].is_unique
    high = profile.tiers.set_index("value_tier").loc["high"]
    assert high["value_share"] == pytest.approx(0.5, abs=0.05)
    assert high["customer_share"] < 0.3          # value is concentrated
    written = S.write_profile(profile, tmp_path)
    back = S.read_profile(tmp_path)
    pd.testing.assert_frame_equal(back.customers, c, check_dtype=False)
    assert written["customers"] == RunStore(tmp_path).profile_table
    summary_only = S.read_profile(tmp_path, with_customers=False)
    assert summary_only.customers is None
    pd.testing.assert_frame_equal(summary_only.tiers, back.tiers)
    # a reader can take a few columns; columns the table does not have are left out
    few = RunStore(tmp_path).read_customers(["customer_id", "value_tier", "no_such_column"])
    assert list(few.columns) == ["customer_id", "value_tier"] and len(few) == len(c)


def test_behaviour_group_names_use_only_words_that_set_a_group_apart():
    from analysis.segments import _describe_cluster

    overall = pd.Series({"frequency": 4.0, "monetary_mean_order": 50.0, "recency_days": 100.0,
                         "tenure_days": 500.0})
    typical_basket = pd.Series({"frequency": 2.0, "monetary_mean_order": 48.0,
                                "recency_days": 40.0, "tenure_days": 200.0})
    name, sentence = _describe_cluster(typical_basket, overall)
    assert name == "Infrequent, newer, recent" and "basket" not in name
    big = pd.Series({"frequency": 8.0, "monetary_mean_order": 90.0, "recency_days": 200.0,
                     "tenure_days": 520.0})
    assert _describe_cluster(big, overall)[0] == "Frequent, high-basket, lapsing"


def test_a_segment_of_unknown_value_has_no_value_share():
    """An export without revenue: each segment's share of the value is unknown (NaN),
    not 0 % (the analyst notebooks showed 0.0 for every segment); known values that are
    all zero still share 0."""
    df = frame(segment=["A", "A", "B"], monetary_total=[np.nan] * 3)
    out = S.segment_profile(df, by="segment", min_customers=1)
    assert out["value_share"].isna().all() and out["mean_value"].isna().all()
    zero = S.segment_profile(df.assign(monetary_total=0.0), by="segment", min_customers=1)
    assert (zero["value_share"] == 0.0).all()
