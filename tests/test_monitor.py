import numpy as np
import pandas as pd
import pytest

from analysis import monitor as M
from analysis.store import CustomerView, RunStore


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 5000)
    assert M.population_stability(a, rng.normal(0, 1, 5000)) < 0.02
    assert M.population_stability(a, rng.normal(1.5, 1, 5000)) > 0.25
    drift = M.feature_drift(pd.DataFrame({"x": a, "y": a}),
                            pd.DataFrame({"x": a + 2, "y": a}))
    assert drift["feature"].tolist() == ["x", "y"]
    assert drift["level"].tolist() == ["large shift", "stable"]


def test_realized_outcomes_of_an_earlier_run(tmp_path):
    """Counted where the tables lie (an earlier run's store, the labels' Parquet file):
    the AUC is scikit-learn's, ties among the probabilities counted half; customers
    without a probability, or not in both, do not count."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from analysis.store import RunStore

    rng = np.random.default_rng(4)
    n = 3_000
    ids = [f"c{i:04d}" for i in range(n)]
    store = RunStore(tmp_path / "run")
    store.write_profile_table(pd.DataFrame({"customer_id": ids}))
    churn = rng.choice(np.linspace(0.05, 0.95, 19), n)          # many ties
    churn[:7] = np.nan
    value = rng.gamma(2.0, 20.0, n)
    value[7:20] = np.nan
    store.write_scores(pd.DataFrame({"customer_id": ids, "churn_probability": churn,
                                     "predicted_value": value}))
    churned = (rng.random(n) < churn).astype(int)
    actual = pd.DataFrame({"customer_id": ids, "churned": churned,
                           "future_spend": rng.gamma(2.0, 20.0, n)}).iloc[50:]
    actual.to_parquet(tmp_path / "actual.parquet", index=False)
    out = M.realized_outcomes(store, tmp_path / "actual.parquet")
    kept = pd.DataFrame({"customer_id": ids, "p": churn, "v": value}).merge(
        actual, on="customer_id").dropna(subset=["p"])
    y = kept["churned"].to_numpy()
    assert out["customers"] == len(kept) == n - 50
    assert out["churn_auc"] == pytest.approx(roc_auc_score(y, kept["p"]), abs=1e-12)
    assert out["brier"] == pytest.approx(brier_score_loss(y, kept["p"]), rel=1e-12)
    assert out["observed_churn_rate"] == pytest.approx(y.mean(), rel=1e-12)
    assert out["predicted_churn_rate"] == pytest.approx(kept["p"].mean(), rel=1e-12)
    assert out["value_mae"] == pytest.approx(
        (kept["future_spend"] - kept["v"]).abs().mean(), rel=1e-12)
    assert out["predicted_total"] == pytest.approx(kept["v"].sum(), rel=1e-12)
    assert out["actual_total"] == pytest.approx(kept["future_spend"].sum(), rel=1e-12)
    # one class only: no AUC
    actual.assign(churned=0).to_parquet(tmp_path / "none.parquet", index=False)
    assert np.isnan(M.realized_outcomes(store, tmp_path / "none.parquet")["churn_auc"])


def test_kpi_deltas_migration_and_new_alerts(tmp_path):
    deltas = M.kpi_deltas({"customers": 110, "as_of": "x"}, {"customers": 100})
    assert deltas.to_dict("records") == [{"kpi": "customers", "previous": 100,
                                          "current": 110, "change": 10,
                                          "change_share": 0.1}]
    before = pd.DataFrame({"customer_id": ["a", "b", "c"], "tier": ["high", "low", "low"]})
    now = pd.DataFrame({"customer_id": ["a", "b", "d"], "tier": ["mid", "low", "high"]})
    m = M.migration_matrix(CustomerView.of(now), before, column="tier")
    assert m.loc["high", "mid"] == 1 and m.loc["low", "(gone)"] == 1
    assert m.loc["(new)", "high"] == 1
    # the warnings raised now and not before, counted per rule where they lie (the
    # current run's as part files), most first, ties in the rules' order
    runs = {}
    for name, rows in {"old": [("a", "overdue"), ("b", "spend drop")],
                       "new": [("a", "overdue"), ("c", "overdue"), ("a", "spend drop"),
                               ("b", "spend drop"), ("d", "new complaint"),
                               ("e", "new complaint")]}.items():
        runs[name] = RunStore(tmp_path / name)
        table = pd.DataFrame(rows, columns=["customer_id", "rule"]).assign(detail="x")
        runs[name].alerts_table.mkdir(parents=True)
        for k, part in enumerate((table.iloc[:3], table.iloc[3:])):
            part.to_parquet(runs[name].alerts_table / f"part-{k}.parquet", index=False)
    fresh = M.new_alerts(runs["old"].folder, runs["new"].folder)
    assert list(zip(fresh["rule"], fresh["alerts"])) == [
        ("new complaint", 2), ("overdue", 1), ("spend drop", 1)]
    every = M.new_alerts(None, runs["new"].folder)
    assert list(zip(every["rule"], every["alerts"])) == [
        ("overdue", 2), ("spend drop", 2), ("new complaint", 2)]


def test_run_kpis_quote_the_methods_that_scored(tmp_path):
    import json

    # (a run written before the run store: its export alone; a spend unknown, a refund)
    pd.DataFrame({"customer_id": list("abcde"),
                  "lifecycle_stage": ["active", "lost", "active", "at risk", "new"],
                  "spend_365d": [10.0, 0.0, np.nan, -3.0, 4.0],
                  "value_tier": ["high", "low", "high", "mid", "low"],
                  "churn_probability": [0.6, 0.2, 0.5, np.nan, 0.9],
                  "predicted_value": [5.0, 0.0, np.nan, 1.0, 2.0],
                  "phaseout_candidate": [False, True, None, False, True]}).to_parquet(
        tmp_path / "customers.parquet")
    (tmp_path / "profile.json").write_text(json.dumps({"as_of": "2026-01-01"}))
    models = {"churn": {"model": {"roc_auc": 0.80}, "blend": {"roc_auc": 0.85},
                        "chosen": "blend", "selection": {}},
              "value": {"model": {"mae": 5.0}, "bgnbd_gg": {"mae": 4.0},
                        "chosen": "bgnbd_gg"}}
    (tmp_path / "models.json").write_text(json.dumps(models))
    kpis = M.run_kpis(tmp_path)
    assert kpis["churn_auc"] == 0.85 and kpis["value_mae"] == 4.0
    # counted where the table lies: spends below 0 count as 0, unknown ones not at all;
    # at risk: 50 %+ among the active (new, active, past their rhythm)
    assert {k: kpis[k] for k in ("customers", "active_customers", "revenue_12m",
                                 "top20_revenue_share", "high_value_customers",
                                 "at_risk_customers", "predicted_value", "revenue_at_risk",
                                 "phaseout_customers")} \
        == {"customers": 5, "active_customers": 4, "revenue_12m": 14.0,
            "top20_revenue_share": pytest.approx(10 / 14), "high_value_customers": 2,
            "at_risk_customers": 3, "predicted_value": 8.0, "revenue_at_risk": 14.0,
            "phaseout_customers": 2}
    # a run written before the choice existed was scored by XGBoost
    for kind in ("churn", "value"):
        del models[kind]["chosen"]
    (tmp_path / "models.json").write_text(json.dumps(models))
    kpis = M.run_kpis(tmp_path)
    assert kpis["churn_auc"] == 0.80 and kpis["value_mae"] == 5.0


def test_monthly_trend_counts_buyers_revenue_and_churn_by_hand():
    import datetime as dt

    from analysis.features import connect

    lines = pd.DataFrame({
        "customer_id": ["a", "a", "b", "b", "c"],
        "order_date": pd.to_datetime(["2024-03-01", "2024-12-20", "2024-06-01",
                                      "2024-07-01", "2024-11-15"]),
        "amount": [100.0, 50.0, 30.0, -10.0, 80.0]})
    con = connect({"transactions": lines})
    trend = M.monthly_trend(con, as_of=dt.date(2025, 1, 1), horizon_days=60, months=2)
    last = trend.iloc[-1]
    assert last["as_of"] == dt.date(2025, 1, 1)
    assert last["buying_customers"] == 3                  # a, b, c bought within the year
    assert last["revenue_12m"] == pytest.approx(100 + 50 + 30 - 10 + 80)
    # the year before 2024-11-02 (60 days back): a and b bought; a bought again after, b
    # did not (its return is not a purchase); c first bought after it
    assert last["churn_rate"] == pytest.approx(0.5)
    # the top 20 % of 3 buyers is 1 customer: a, with 150 of 250
    assert last["top20_revenue_share"] == pytest.approx(150 / 250)
    assert trend.iloc[0]["as_of"] < last["as_of"]


def test_the_previous_run_is_of_the_same_config_even_when_another_ran_since(tmp_path):
    """Two configs that share output folders (two shops' exports side by side, each with
    the default folders) never compare with each other: the baseline of a run is the last
    successful run of a config of the same name and mode, found in the history when
    reports/latest points at the other config's; its history shows its own runs only."""
    import json
    import os

    from analysis.publish import previous_run

    processed, reports = tmp_path / "processed", tmp_path / "reports"
    reports.mkdir()

    def finished(run_id, name, mode="transactions"):
        folder = processed / run_id
        folder.mkdir(parents=True)
        pd.DataFrame({"customer_id": ["a"]}).to_parquet(folder / "customers.parquet")
        (folder / "metrics.json").write_text(json.dumps({"mode": mode,
                                                          "config": {"name": name}}))
        M.append_history(processed / "history.parquet", {"run_id": run_id, "config": name,
                                                         "as_of": "2025-01-01"})
        if (reports / "latest").is_symlink():
            (reports / "latest").unlink()
        os.symlink(run_id, reports / "latest")

    finished("shop-a-1", "shop-a")
    finished("shop-b-1", "shop-b")
    assert previous_run(reports, processed, "new", "transactions", "shop-b") == \
        processed / "shop-b-1"
    assert previous_run(reports, processed, "new", "transactions", "shop-a") == \
        processed / "shop-a-1"                              # not shop b's, the latest
    assert previous_run(reports, processed, "new", "transactions", "shop-c") is None
    finished("shop-a-2", "shop-a", mode="snapshot")           # another mode is no baseline
    assert previous_run(reports, processed, "new", "transactions", "shop-a") == \
        processed / "shop-a-1"
    history = M.read_history(processed / "history.parquet", config="shop-a")
    assert history["run_id"].tolist() == ["shop-a-1", "shop-a-2"]
    assert len(M.read_history(processed / "history.parquet")) == 3
