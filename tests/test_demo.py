import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.demo import DemoWorld, generate_demo


@pytest.fixture(scope="module")
def world():
    return generate_demo(DemoWorld(n_customers=6_000, seed=11))


def test_same_seed_same_world_other_seed_other_world():
    a = generate_demo(DemoWorld(n_customers=300, seed=3))
    b = generate_demo(DemoWorld(n_customers=300, seed=3))
    c = generate_demo(DemoWorld(n_customers=300, seed=4))
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["transactions"]["amount"].equals(c["transactions"]["amount"])


def test_meets_the_input_contract_and_spans_three_years(world):
    tx = world["transactions"]
    assert {"customer_id", "order_date", "amount", "order_id", "category", "channel",
            "status", "margin", "quantity"} <= set(tx.columns)
    assert (tx["order_date"].max() - tx["order_date"].min()).days >= 3 * 365
    assert set(tx["status"]) == {"completed", "cancelled", "returned"}
    assert tx["channel"].nunique() == 4 and tx["category"].nunique() == 8
    assert tx["amount"].gt(0).all() and tx["margin"].notna().all()
    assert tx["order_date"].max() <= pd.Timestamp("2025-12-31")
    # every customer's first order is on the signup day (cohorts by acquisition)
    first = tx.groupby("customer_id")["order_date"].min()
    signup = world["customers"].set_index("customer_id")["signup_date"]
    assert (first == signup.loc[first.index]).all()


def test_heterogeneous_rates_and_seasonality(world):
    truth = world["truth_customers"]
    assert truth["purchase_rate_per_day"].std() / truth["purchase_rate_per_day"].mean() > 0.8
    tx = world["transactions"]
    month = tx["order_date"].dt.month
    per_month = tx.groupby(month)["order_id"].nunique()
    assert per_month.loc[12] > 1.3 * per_month.loc[[5, 6, 7]].mean()


def test_protected_attributes_do_not_drive_behaviour(world):
    truth = world["truth_customers"].merge(world["customers"], on="customer_id")
    orders = world["transactions"].groupby("customer_id")["order_id"].nunique()
    truth = truth.assign(n_orders=truth["customer_id"].map(orders).fillna(0))
    for attr in ("gender", "age_band"):
        for measure in ("purchase_rate_per_day", "dropout_hazard_per_day", "n_orders",
                        "mean_order_value"):
            groups = [g[measure].to_numpy() for _, g in truth.groupby(attr)]
            p = stats.kruskal(*groups).pvalue
            assert p > 0.001, (attr, measure, p)


def test_complaints_and_low_satisfaction_raise_dropout(world):
    truth = world["truth_customers"]
    inter = world["interactions"]
    complainers = set(inter.loc[inter["type"] == "complaint", "customer_id"])
    tx = world["transactions"]
    span = (tx.groupby("customer_id")["order_date"].agg(["min", "max"]))
    life = (span["max"] - span["min"]).dt.days
    has = life.index.isin(complainers)
    # dropout hazard is higher for unhappy customers
    low = truth["satisfaction_z"] < -0.5
    high = truth["satisfaction_z"] > 0.5
    assert truth.loc[low, "dropout_hazard_per_day"].median() > \
        1.3 * truth.loc[high, "dropout_hazard_per_day"].median()
    # survey scores reveal satisfaction
    surveys = inter[inter["type"] == "survey"].merge(truth, on="customer_id")
    assert surveys["score"].corr(surveys["satisfaction_z"]) > 0.5
    assert has.sum() > 100


def test_campaign_is_randomized_with_a_real_effect(world):
    truth = world["truth_customers"]
    campaign = world["campaign"]
    campaign = campaign[campaign["campaign_date"] == campaign["campaign_date"].min()]
    # the first month: a twelfth of the non-control customers against the 20 % control
    assert 0.2 < campaign["treated"].mean() < 0.4
    treated = truth.set_index("customer_id").loc[campaign["customer_id"]]
    t = treated[campaign["treated"].to_numpy()]
    c = treated[~campaign["treated"].to_numpy()]
    # randomization: pre-treatment rates balanced
    assert stats.mannwhitneyu(t["purchase_rate_per_day"], c["purchase_rate_per_day"]).pvalue > 0.001
    # the effect is heterogeneous and only treated customers are saved
    assert truth["treatment_effect"].std() > 0.05
    assert truth.loc[~truth["treated"], "saved_by_campaign"].sum() == 0
    assert truth["saved_by_campaign"].sum() > 0


def test_ground_truth_future_orders_start_after_the_data():
    frames = generate_demo(DemoWorld(n_customers=500, seed=2))
    future = frames["truth_future_orders"]
    assert future["order_date"].min() > frames["transactions"]["order_date"].max()
    truth = frames["truth_customers"]
    dead = set(truth.loc[~truth["alive_at_as_of"], "customer_id"])
    assert not dead & set(future["customer_id"])  # nobody buys after dropping out
    assert np.isclose(len(frames["customers"]), 500)
