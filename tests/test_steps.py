"""The step functions, called directly (no notebook) on a small world, in run order:
each writes its own tables once, the scoring date and the horizon are resolved once and
read by the later steps, and the retention campaign is the Retain actions."""
import json

import pandas as pd
import pytest

from analysis import data, models, segments, snapshot, strategy
from analysis.config import load_config
from analysis.demo import generate_snapshot_demo
from analysis.store import RunStore
from .conftest import shipped_config, write_yaml


def _digest(path):
    return path.read_bytes()


def test_order_log_steps_in_order_each_write_their_own_table_once(demo_config, tmp_path):
    config = load_config(demo_config)
    folder = tmp_path / "run"
    store = RunStore(folder)
    summary = data.quality_step(config, folder)
    tables = summary["tables"].set_index("table")
    assert (tables["rows_processed"] + tables["rows_quarantined"] == tables["rows_read"]).all()
    assert (folder / "clean" / "transactions.parquet").is_file()

    profile = segments.profile_step(config, folder)
    # the scoring date and the horizon are resolved once, by the first step, and recorded
    assert store.scoring_date() == profile.as_of and store.horizon_days() == 90
    profiled = _digest(store.profile_table)
    assert "churn_probability" not in pd.read_parquet(store.profile_table)

    run = models.churn_step(config, folder)
    assert run is not None
    # the models step read the scoring date and the horizon the profile step recorded,
    # and scored the customers on the profile's own features
    assert run.cutoffs["score"] == profile.as_of.isoformat()
    assert run.horizon_days == 90 and run.sizes["score"] == len(profile.customers)
    scored = _digest(store.scores_table)

    decisions = strategy.strategy_step(config, folder)
    # no later step rewrote an earlier step's table
    assert _digest(store.profile_table) == profiled
    assert _digest(store.scores_table) == scored
    joined = store.read_customers(["customer_id", "lifecycle_stage", "churn_probability",
                                   "action"])
    assert len(joined) == len(profile.customers) and joined["action"].notna().all()
    assert joined["churn_probability"].between(0, 1).all()
    campaign = pd.read_csv(folder / "strategy" / "campaign.csv", dtype={"customer_id": str})
    retain = decisions.customers.loc[
        decisions.customers["action"].str.startswith(strategy.RETAIN_PREFIX), "customer_id"]
    assert set(campaign["customer_id"]) == set(retain)
    assert decisions.retention["decision_period_days"] >= store.horizon_days()


def test_snapshot_steps_share_the_strategy_step(tmp_path):
    frame, _ = generate_snapshot_demo(600, seed=11)
    frame.to_csv(tmp_path / "export.csv", index=False)
    raw = shipped_config("snapshot", tmp_path, tables={"customers": tmp_path / "export.csv"})
    config = load_config(write_yaml(tmp_path / "snapshot.yaml", raw))
    folder = tmp_path / "run"
    store = RunStore(folder)
    data.quality_step(config, folder)
    run, profile = snapshot.model_step(config, folder, as_of="2026-06-30")
    assert run is not None and store.scoring_date().isoformat() == "2026-06-30"
    assert store.horizon_days() == snapshot.horizon_days(config)
    # a snapshot has no order log: its segments carry no recency or frequency at all
    assert not {"median_recency_days", "median_frequency"} & set(profile.segments.columns)
    decisions = strategy.strategy_step(config, folder)
    joined = store.read_customers(["customer_id", "churn_probability", "action"])
    assert len(joined) == len(frame) and joined["action"].notna().all()
    pd.testing.assert_series_equal(
        joined["churn_probability"].reset_index(drop=True),
        profile.customers["churn_probability"].reset_index(drop=True))
    assert json.loads((folder / "models.json").read_text())["mode"] == "snapshot"
    assert set(decisions.customers["customer_id"]) == set(joined["customer_id"])


def test_reasons_for_listed_customers_are_exactly_those_of_a_full_run(small_demo, tmp_path):
    """With ``reasons_for: listed`` the models step explains a sample only, and the
    strategy step gives every customer a person reads about the same reasons a run that
    explains everyone gives them."""
    from .conftest import write_config

    def run(name, reasons_for):
        folder = tmp_path / name
        folder.mkdir()
        config = load_config(write_config(folder, {
            "transactions": {"path": str(small_demo / "transactions.parquet")},
            "customers": {"path": str(small_demo / "customers.parquet")},
            "interactions": {"path": str(small_demo / "interactions.parquet")},
            "campaign": {"path": str(small_demo / "campaign.parquet")},
        }, protected=["gender", "age_band"],
            analysis={"horizon_days": 90, "reasons_for": reasons_for, "reasons_sample": 150}))
        out = folder / "run"
        data.quality_step(config, out)
        segments.profile_step(config, out)
        models.churn_step(config, out)
        strategy.strategy_step(config, out)
        return RunStore(out)

    full, listed = run("full", "all"), run("listed", "listed")
    columns = ["customer_id", "action", "alerts", "churn_probability", "predicted_value",
               "reasons", "value_reasons"]
    a, b = full.read_customers(columns), listed.read_customers(columns)
    reasons = ["reasons", "value_reasons"]
    pd.testing.assert_frame_equal(a.drop(columns=reasons), b.drop(columns=reasons))
    assert a[reasons].notna().all().all()
    checks = [("reasons", strategy.needs_reasons(b))]
    if models.read_model_run(listed.folder, tables=()).value_chosen == "model":
        # (with BG/NBD scoring, every customer's value reason is its outlook in words)
        checks.append(("value_reasons", strategy.needs_value_reasons(b)))
    for column, need in checks:
        assert need.sum() >= 100 and (~need).sum() > 200, column
        # the customers a person reads about: the same reasons as when everyone is
        # explained
        pd.testing.assert_series_equal(b.loc[need, column], a.loc[need, column])
        # the others: only the sample's, at most 150
        others = b.loc[~need, column]
        assert 0 < others.notna().sum() <= 150, column
    assert models.read_model_run(listed.folder, tables=()).sizes["explained"] == 150
    assert len(pd.read_parquet(listed.folder / "models" / "churn_shap.parquet")) == 150
