import datetime as dt

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import features as F
from analysis.config import load_config
from analysis.data import load_dataset

from .conftest import ROOT, require_cdnow

CUTOFF = dt.date(2024, 3, 1)


def tx(rows):
    return pd.DataFrame(rows, columns=["order_id", "customer_id", "order_date", "amount",
                                       "status", "category", "channel", "margin"]).assign(
        order_date=lambda d: pd.to_datetime(d["order_date"]))


HAND = tx([
    ("O1", "A", "2024-01-01", 10.0, "completed", "x", "online", 3.0),
    ("O1", "A", "2024-01-01", 5.0, "completed", "y", "online", 1.0),
    ("O2", "A", "2024-01-11", 20.0, "completed", "y", "store", 4.0),
    ("O3", "A", "2024-02-10", 8.0, "returned", "x", "online", 2.0),
    ("O4", "A", "2024-02-20", -5.0, "completed", "x", "online", -1.0),
    ("O5", "A", "2024-03-05", 30.0, "completed", "x", "online", 9.0),
    ("O6", "B", "2023-12-01", 50.0, "completed", "z", "phone", 10.0),
    ("O7", "B", "2024-02-29", 7.0, "cancelled", "z", "phone", 1.0),
    ("O8", "B", "2024-04-15", 9.0, "completed", "z", "phone", 2.0),
    ("O9", "C", "2024-03-10", 12.0, "completed", "z", "online", 2.0),
    ("O10", "D", "2024-02-01", 12.0, "cancelled", "z", "online", 2.0),
])


def test_hand_computed_features_and_labels():
    got = F.build_features(F.connect({"transactions": HAND}), cutoff=CUTOFF, horizon_days=30)
    expected = pd.DataFrame({
        "customer_id": ["A", "B"],
        "recency_days": [50, 91], "frequency": [2, 1], "n_orders": [2, 1],
        "monetary_total": [30.0, 50.0], "tenure_days": [60, 91],
        "monetary_mean_order": [17.5, 50.0], "monetary_max_order": [20.0, 50.0],
        "margin_total": [7.0, 10.0], "margin_rate": [7 / 30, 0.2],
        "gap_mean_days": [10.0, np.nan], "gap_median_days": [10.0, np.nan],
        "gap_std_days": [np.nan, np.nan], "recency_vs_gap": [5.0, np.nan],
        "orders_30d": [0, 0], "spend_30d": [-5.0, 0.0], "trend_30d": [-1.0, 0.0],
        "orders_90d": [2, 0], "spend_90d": [30.0, 0.0], "trend_90d": [1.0, -1.0],
        "orders_180d": [2, 1], "spend_180d": [30.0, 50.0], "trend_180d": [1.0, 1.0],
        "orders_365d": [2, 1], "spend_365d": [30.0, 50.0], "trend_365d": [1.0, 1.0],
        "cancel_rate": [0.0, 0.5], "return_rate": [0.4, 0.0], "cutoff_month": [3, 3],
        "n_categories": [2, 1], "top_category": ["y", "z"],
        "n_channels": [2, 1], "top_channel": ["online", "phone"],
        "top_channel_share": [0.5, 1.0],
        "season_index": [np.nan, np.nan],   # less than a year of history: unknown
        "spend_last_horizon": [-5.0, 0.0],
        "churned": [0, 1], "future_spend": [30.0, 0.0], "future_margin": [9.0, 0.0],
        "future_orders": [1, 0], "declined": [0, 0],
    })
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=False,
                                  atol=1e-9)


def test_interaction_and_attribute_features_exclude_protected():
    inter = pd.DataFrame({    # B answered two surveys on its last survey day: the higher
        "customer_id": ["A", "A", "A", "B", "A", "B", "B"],
        "date": pd.to_datetime(["2023-06-01", "2024-02-15", "2024-01-01", "2024-02-01",
                                "2024-03-02", "2024-02-01", "2024-01-05"]),
        "type": ["complaint", "complaint", "survey", "survey", "complaint", "survey",
                 "survey"],
        "score": [np.nan, np.nan, 2.0, 3.0, np.nan, 4.0, 5.0],
        "resolved": pd.array([True, False, pd.NA, pd.NA, False, pd.NA, pd.NA],
                             dtype="boolean"),
    })
    customers = pd.DataFrame({"customer_id": ["A", "B"], "signup_date":
                              pd.to_datetime(["2023-12-31", "2023-11-01"]),
                              "region": ["N", "S"], "gender": ["f", "m"]})
    con = F.connect({"transactions": HAND, "interactions": inter, "customers": customers})
    got = F.build_features(con, cutoff=CUTOFF, exclude_attributes=("gender",)).set_index(
        "customer_id")
    assert got.loc["A", "n_complaints"] == 2          # the one after the cutoff is unseen
    assert got.loc["A", "complaints_90d"] == 1
    assert got.loc["A", "days_since_complaint"] == 15
    assert got.loc["A", "n_unresolved_complaints"] == 1
    assert got.loc["A", "satisfaction_last"] == 2.0 and got.loc["B", "satisfaction_mean"] == 4.0
    assert got.loc["B", "satisfaction_last"] == 4.0
    assert got.loc["B", "n_complaints"] == 0 and np.isnan(got.loc["B", "days_since_complaint"])
    assert got.loc["A", "days_since_signup"] == 61 and got.loc["A", "region"] == "N"
    assert "gender" not in got.columns
    assert "churned" not in got.columns  # no horizon, no labels


def test_minimal_contract_has_no_invented_columns():
    minimal = HAND[["customer_id", "order_date", "amount"]]
    got = F.build_features(F.connect({"transactions": minimal}), cutoff=CUTOFF,
                           horizon_days=30)
    for col in ("margin_total", "future_margin", "top_category", "top_channel"):
        assert col not in got.columns
    # without order ids, an order is a customer-day; all lines count as completed
    a = got.set_index("customer_id").loc["A"]
    assert a["n_orders"] == a["frequency"] == 3  # 01-01, 01-11, 02-10 (the return's line)


def test_a_build_leaves_the_connections_row_order_setting_as_it_was():
    # the build lets DuckDB drop row order in its working tables; the caller's queries
    # on the same connection keep theirs
    con = F.connect({"transactions": HAND})
    setting = "SELECT current_setting('preserve_insertion_order')"
    F.build_features(con, cutoff=CUTOFF, horizon_days=30)
    assert con.execute(setting).fetchall()[0][0] is True
    con.execute("SET preserve_insertion_order = false")
    F.build_features(con, cutoff=CUTOFF, horizon_days=30)
    assert con.execute(setting).fetchall()[0][0] is False


# --------------------------------------------------------------------------- leakage

line = st.tuples(
    st.sampled_from(["A", "B", "C", "E"]),
    st.integers(min_value=0, max_value=200),          # days after the cutoff
    st.floats(min_value=-50, max_value=500, allow_nan=False),
    st.sampled_from(["completed", "cancelled", "returned"]),
    st.sampled_from(["x", "y", "w"]),
    st.sampled_from(["online", "store"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, max_size=12), st.integers(min_value=1, max_value=120))
def test_rows_after_the_cutoff_never_change_features(extra, horizon):
    base = F.build_features(F.connect({"transactions": HAND}), cutoff=CUTOFF,
                            horizon_days=horizon)
    rows = [(f"N{i}", c, pd.Timestamp(CUTOFF) + pd.Timedelta(days=d), a, s, cat, ch, a / 3)
            for i, (c, d, a, s, cat, ch) in enumerate(extra)]
    # also change every existing post-cutoff row
    changed = HAND.copy()
    after = changed["order_date"] >= pd.Timestamp(CUTOFF)
    changed.loc[after, "amount"] = changed.loc[after, "amount"] * 3 + 1
    more = pd.concat([changed, tx(rows)], ignore_index=True)
    got = F.build_features(F.connect({"transactions": more}), cutoff=CUTOFF,
                           horizon_days=horizon)
    labels = list(F.LABEL_COLUMNS)
    pd.testing.assert_frame_equal(got.drop(columns=labels), base.drop(columns=labels))


# --------------------------------------------------------------------------- cutoffs


def test_honest_training_cutoffs_step_back_and_need_a_horizon_of_history():
    ev, va, train = F.honest_cutoffs(as_of=dt.date(2024, 12, 31), horizon_days=90, n_train=4,
                                     step_days=30, first_date=dt.date(2023, 1, 1))
    assert ev == dt.date(2024, 10, 2) and train[0] == va - dt.timedelta(days=90)
    assert all((a - b).days == 30 for a, b in zip(train, train[1:], strict=False))
    _, _, short = F.honest_cutoffs(as_of=dt.date(2024, 12, 31), horizon_days=90, n_train=4,
                                   step_days=30, first_date=dt.date(2024, 1, 1))
    assert short == [dt.date(2024, 4, 5)]  # 95 days of history; the next would have 65


def test_snapshots_stack_cutoffs_and_suggested_horizon():
    con = F.connect({"transactions": HAND})
    snap = F.build_snapshots(con, cutoffs=[dt.date(2024, 2, 1), CUTOFF], horizon_days=30)
    assert snap.groupby("cutoff").size().to_dict() == {pd.Timestamp("2024-02-01"): 2,
                                                       pd.Timestamp("2024-03-01"): 2}
    assert F.data_end(con) == dt.date(2024, 4, 16)
    # purchase gaps 10, 54 and 136 days: 80th percentile 103.2 -> next multiple of 30
    assert F.suggest_horizon_days(con) == 120
    assert F.resolve_horizon_days(con, horizon_days=45) == 45


# --------------------------------------------------------------------------- real data


def independent_core(lines: pd.DataFrame, cutoff: dt.date, horizon: int) -> pd.DataFrame:
    """The seven named columns, computed the plain pandas way from their definitions."""
    c = pd.Timestamp(cutoff)
    hist = lines[lines["order_date"] < c]
    purchases = hist[hist["amount"] >= 0]
    g = purchases.groupby("customer_id")["order_date"]
    out = pd.DataFrame({
        "recency_days": (c - g.max()).dt.days,
        "frequency": g.nunique(),
        "tenure_days": (c - g.min()).dt.days,
    })
    out["monetary_total"] = hist.groupby("customer_id")["amount"].sum()
    window = lines[(lines["order_date"] >= c) & (lines["order_date"] < c + pd.Timedelta(days=horizon))]
    bought = window[window["amount"] >= 0].groupby("customer_id").size()
    out["churned"] = (~out.index.isin(bought.index)).astype(int)
    out["future_spend"] = window.groupby("customer_id")["amount"].sum().reindex(out.index,
                                                                                 fill_value=0.0)
    return out.reset_index()[list(F.CORE_COLUMNS)]


def test_cdnow_core_columns_match_an_independent_computation():
    require_cdnow()
    config = load_config(ROOT / "configs" / "cdnow.yaml")
    lines = load_dataset(config)["transactions"]
    got = F.build_features(F.connect({"transactions": lines}), cutoff=dt.date(1997, 10, 1),
                           horizon_days=273)
    expected = independent_core(lines, dt.date(1997, 10, 1), 273)
    assert len(got) == 23_570
    pd.testing.assert_frame_equal(got[list(F.CORE_COLUMNS)], expected, check_dtype=False,
                                  check_exact=False, rtol=1e-9)
    assert got["churned"].mean() == pytest.approx(0.701, abs=0.001)  # README: 70.1 %
    assert got["future_spend"].sum() == pytest.approx(776_961, abs=1)


def test_demo_churn_label_agrees_with_ground_truth_dropout(small_demo):
    lines = pd.read_parquet(small_demo / "transactions.parquet")
    truth = pd.read_parquet(small_demo / "ground_truth" / "customers.parquet")
    cutoff = dt.date(2025, 6, 1)
    got = F.build_features(F.connect({"transactions": lines}), cutoff=cutoff, horizon_days=120)
    merged = got.merge(truth, on="customer_id")
    gone = merged["dropout_date"] < pd.Timestamp(cutoff)
    assert gone.sum() > 100
    assert (merged.loc[gone, "churned"] == 1).all()      # dropped out: cannot buy again
    alive = merged["dropout_date"] >= pd.Timestamp(cutoff) + pd.Timedelta(days=120)
    from analysis.demo import DemoWorld, _season

    world = DemoWorld()
    start = (cutoff - world.start).days
    season = _season(np.arange(start, start + 120), world).mean()   # June-September: low
    rate = merged["purchase_rate_per_day"] * season
    expected_buy = 1 - np.exp(-rate * 120)                # P(at least one order) if alive
    observed = 1 - merged.loc[alive, "churned"].mean()
    assert observed == pytest.approx(expected_buy[alive].mean(), abs=0.06)


def test_pandas_reference_implementation_agrees_on_the_demo_world(small_demo):
    from bench.reference import pandas_features, same_features

    lines = pd.read_parquet(small_demo / "transactions.parquet")
    cutoff = dt.date(2025, 7, 1)
    ours = F.build_features(F.connect({"transactions": lines}), cutoff=cutoff)
    theirs = pandas_features(lines, cutoff=cutoff)
    assert list(theirs.columns) == list(ours.columns)
    assert same_features(ours, theirs)
    # and it would notice a difference
    assert not same_features(ours, theirs.assign(gap_std_days=theirs["gap_std_days"] * 1.01))


def test_sampled_snapshots_keep_a_deterministic_share_of_whole_customers():
    import numpy as np

    rng = np.random.default_rng(0)
    n = 2000
    tx = pd.DataFrame({"customer_id": [f"c{i}" for i in range(n) for _ in range(3)],
                       "order_date": pd.to_datetime("2024-01-01") + pd.to_timedelta(
                           rng.integers(0, 300, 3 * n), unit="D"),
                       "amount": 10.0})
    con = F.connect({"transactions": tx})
    full = F.build_features(con, cutoff=dt.date(2024, 12, 1), horizon_days=30)
    part = F.build_features(con, cutoff=dt.date(2024, 12, 1), horizon_days=30,
                            sample_share=0.25)
    again = F.build_features(con, cutoff=dt.date(2024, 12, 1), horizon_days=30,
                             sample_share=0.25)
    other = F.build_features(con, cutoff=dt.date(2024, 11, 1), horizon_days=30,
                             sample_share=0.25)
    assert 0.2 * len(full) < len(part) < 0.3 * len(full)
    assert part["customer_id"].tolist() == again["customer_id"].tolist()     # deterministic
    assert set(part["customer_id"]) != set(other["customer_id"])             # per cutoff
    # a sampled customer's row is the same as in the full build (whole history kept)
    merged = part.merge(full, on="customer_id", suffixes=("", "_full"))
    assert (merged["monetary_total"] == merged["monetary_total_full"]).all()
    assert (merged["churned"] == merged["churned_full"]).all()


@pytest.mark.parametrize("history_days, suggested, expected", [
    (3 * 365, 180, 180),     # a long history keeps the rhythm's horizon
    (365, 180, 60),          # one year: shortened until three training cutoffs fit
    (180, 90, 30),           # 180 days: 30-day horizon, still three training cutoffs
    (120, 90, 30),           # too short even for 30 days: 30 (the models then fall back)
])
def test_auto_horizon_is_the_longest_that_leaves_training_cutoffs(history_days, suggested,
                                                                  expected):
    first = dt.date(2024, 1, 1)
    as_of = first + dt.timedelta(days=history_days)
    h = F.fit_horizon_to_history(suggested, first_date=first, as_of=as_of, step_days=30)
    assert h == expected
    _, _, train = F.honest_cutoffs(as_of=as_of, horizon_days=h, n_train=3, step_days=30,
                                   first_date=first)
    if history_days >= 180:
        assert len(train) == 3
        # and 30 days longer would not have left them
        if h < suggested:
            _, _, longer = F.honest_cutoffs(as_of=as_of, horizon_days=h + 30, n_train=3,
                                            step_days=30, first_date=first)
            assert len(longer) < 3


# --------------------------------------------------------------------------- one pass


def test_orders_spanning_days_count_what_each_cutoff_saw():
    """Orders whose lines fall on several days: a cutoff between those days sees the
    order as its lines before the cutoff have it (dated by its first day, a purchase
    from its first purchase line on, its channel the first of those lines' channels),
    and an order without an order id counts but is not counted as a future order."""
    lines = tx([
        ("P", "A", "2024-01-10", 10.0, "completed", "x", "store", 2.0),
        ("P", "A", "2024-01-20", 5.0, "completed", "y", "online", 1.0),
        ("P", "A", "2024-02-05", -3.0, "completed", "x", "online", -1.0),  # a later refund
        ("Q", "A", "2024-01-15", 7.0, "cancelled", "y", "phone", 1.0),
        ("Q", "A", "2024-01-25", 20.0, "completed", "y", "phone", 4.0),   # bought later
        ("R", "A", "2024-01-18", 8.0, "completed", "x", "store", 2.0),
        (None, "B", "2024-01-12", 4.0, "completed", "x", "store", 1.0),
        (None, "B", "2024-01-22", 6.0, "completed", "y", "store", 1.0),
        ("S", "B", "2024-01-30", 9.0, "completed", "y", "online", 2.0),
    ])
    cutoffs = [dt.date(2024, 1, 16), dt.date(2024, 1, 21), dt.date(2024, 2, 1)]
    con = F.connect({"transactions": lines})
    got = F.build_snapshots(con, cutoffs=cutoffs, horizon_days=10)
    cols = ["frequency", "n_orders", "monetary_total", "monetary_max_order",
            "gap_median_days", "recency_days", "cancel_rate", "top_channel",
            "top_channel_share", "churned", "future_spend", "future_orders",
            "spend_last_horizon"]
    expected = pd.DataFrame([
        # A before 01-16: P is 10 so far; Q is a cancelled line, not yet a purchase
        ("A", "2024-01-16", 1, 1, 10.0, 10.0, np.nan, 6, 0.5, "store", 1.0, 0, 33.0, 3, 10.0),
        ("B", "2024-01-16", 1, 1, 4.0, 4.0, np.nan, 4, 0.0, "store", 1.0, 0, 6.0, 0, 4.0),
        # P is 15 and now 'online' (its second day brought an earlier-named channel)
        ("A", "2024-01-21", 2, 2, 23.0, 15.0, 8.0, 3, 0.25, "online", 0.5, 0, 20.0, 1, 13.0),
        ("B", "2024-01-21", 1, 1, 4.0, 4.0, np.nan, 9, 0.0, "store", 1.0, 0, 15.0, 1, 4.0),
        # Q became a purchase on 01-25, dated 01-15: a purchase day between two others
        ("A", "2024-02-01", 3, 3, 43.0, 20.0, 4.0, 14, 0.2, "online", 1 / 3, 1, -3.0, 0, 20.0),
        ("B", "2024-02-01", 2, 2, 19.0, 10.0, 18.0, 2, 0.0, "online", 0.5, 1, 0.0, 0, 15.0),
    ], columns=["customer_id", "cutoff", *cols]).assign(cutoff=lambda d: pd.to_datetime(d["cutoff"]))
    pd.testing.assert_frame_equal(got[["customer_id", "cutoff", *cols]], expected,
                                  check_dtype=False, check_exact=False, atol=1e-12)
    # one pass over every cutoff is the same as one build per cutoff
    for c in cutoffs:
        pd.testing.assert_frame_equal(
            got[got["cutoff"] == pd.Timestamp(c)].drop(columns="cutoff").reset_index(drop=True),
            F.build_features(con, cutoff=c, horizon_days=10))


def test_snapshots_in_ranges_of_customers_match_the_pandas_reference(small_demo, monkeypatch):
    """Built in several ranges of customer ids (a few thousand lines each), every
    cutoff's features still equal the pandas reference's, and sampled cutoffs keep the
    same customers, with the same values, as a build of that cutoff alone."""
    from bench.reference import pandas_features, same_features

    lines = pd.read_parquet(small_demo / "transactions.parquet")
    monkeypatch.setattr(F, "LINES_PER_PASS", len(lines) // 5)
    con = F.connect({"transactions": lines})
    assert len(F._customer_ranges(con, len(lines))) >= 5
    cutoffs = [dt.date(2025, 1, 1), dt.date(2025, 4, 1), dt.date(2025, 7, 1)]
    shares = {dt.date(2025, 4, 1): 0.3}
    frames = F.snapshots_by_cutoff(con, cutoffs=cutoffs, horizon_days=60, sample_share=shares)
    assert list(frames) == cutoffs
    for c in (cutoffs[0], cutoffs[2]):
        ours = frames[c]
        assert ours["customer_id"].is_monotonic_increasing and ours["customer_id"].is_unique
        theirs = pandas_features(lines, cutoff=c)
        assert same_features(ours[list(theirs.columns)], theirs)
    sampled = frames[cutoffs[1]]
    alone = F.build_features(con, cutoff=cutoffs[1], horizon_days=60, sample_share=0.3)
    pd.testing.assert_frame_equal(sampled, alone, check_exact=False, rtol=1e-12)
    full = F.build_features(con, cutoff=cutoffs[1], horizon_days=60)
    assert 0.2 * len(full) < len(sampled) < 0.4 * len(full)


def test_snapshots_of_named_customers_equal_their_rows_in_full_builds(small_demo):
    """Given the customers of each cutoff (a campaign's, say), every snapshot holds
    exactly those who bought before it, with the values of a full build; a cutoff not
    named keeps everyone; naming and sampling one cutoff is refused."""
    import numpy as np

    con = F.connect({name: pd.read_parquet(small_demo / f"{name}.parquet")
                     for name in ("transactions", "customers", "interactions")})
    cutoffs = [dt.date(2025, 1, 1), dt.date(2025, 4, 1)]
    full = {c: F.build_features(con, cutoff=c, horizon_days=60) for c in cutoffs}
    rng = np.random.default_rng(1)
    named = {c: [*rng.choice(full[c]["customer_id"].to_numpy(), 40, replace=False),
                 "nobody-by-this-id"] for c in cutoffs}
    for given in (named, {cutoffs[0]: named[cutoffs[0]]}):
        frames = F.snapshots_by_cutoff(con, cutoffs=cutoffs, horizon_days=60,
                                       customers=given)
        for c in cutoffs:
            expected = full[c]
            if c in given:
                expected = expected[expected["customer_id"].isin(given[c])]
                assert len(expected) == 40
            pd.testing.assert_frame_equal(frames[c], expected.reset_index(drop=True),
                                          check_dtype=False)
    with pytest.raises(ValueError, match="both sampled"):
        F.snapshots_by_cutoff(con, cutoffs=cutoffs, sample_share=0.5, customers=named)
