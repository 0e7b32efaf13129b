from pathlib import Path

import pytest
import yaml

from analysis.config import AnalysisParams, load_config
from analysis.errors import ConfigError

from .conftest import ROOT, write_config


def test_shipped_configs_load_with_paths_relative_to_the_config():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.tables["transactions"].path == ROOT / "data" / "raw" / "demo" / "transactions.parquet"
    assert demo.output.processed_dir == ROOT / "data" / "processed"
    assert demo.protected == ("gender", "age_band")
    cdnow = load_config(ROOT / "configs" / "cdnow.yaml")
    spec = cdnow.tables["transactions"]
    assert spec.resolved_format == "csv" and spec.sep == "whitespace"
    assert spec.columns == {"customer_id": "customer_id", "order_date": "date",
                            "amount": "dollar_value", "quantity": "number_of_cds"}
    assert cdnow.analysis.horizon_days == "auto"


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    path = write_config(tmp_path, {"transactions": "tx.csv"}, analysis={"horizon": 90})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "horizon" in str(err.value) and "horizon_days" in str(err.value)
    assert "analysis" in str(err.value)


def test_bad_choice_lists_valid_values(tmp_path):
    path = write_config(tmp_path, {"transactions": "tx.csv"}, mode="retail")
    with pytest.raises(ConfigError, match="transactions, snapshot"):
        load_config(path)


def test_missing_required_table_for_mode(tmp_path):
    path = write_config(tmp_path, {"customers": "c.csv"})
    with pytest.raises(ConfigError, match="needs a 'transactions' table"):
        load_config(path)


def test_unknown_contract_column_in_mapping(tmp_path):
    path = write_config(tmp_path, {"transactions": {"path": "tx.csv",
                                                    "columns": {"revenue": "x"}}})
    with pytest.raises(ConfigError, match="revenue"):
        load_config(path)


def test_tier_shares_must_leave_room_for_low(tmp_path):
    path = write_config(tmp_path, {"transactions": "tx.csv"},
                        analysis={"tier_shares": [0.7, 0.4]})
    with pytest.raises(ConfigError, match="tier_shares"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_relative_table_path_and_horizon_auto(tmp_path):
    path = write_config(tmp_path, {"transactions": "sub/tx.csv"},
                        analysis={"horizon_days": "auto", "as_of": "2024-01-31"})
    cfg = load_config(path)
    assert cfg.tables["transactions"].path == (tmp_path / "sub" / "tx.csv").resolve()
    assert cfg.analysis.horizon_days == "auto"
    assert str(cfg.analysis.as_of) == "2024-01-31"
    assert Path(cfg.to_dict()["tables"]["transactions"]["path"]).name == "tx.csv"


def test_memory_limit_is_a_size(tmp_path):
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"},
                                   analysis={"memory_limit": "1.5GB"}))
    assert cfg.analysis.memory_limit == "1.5GB"
    # the budget is the stage's; DuckDB gets half of it, in DuckDB's reading of units
    assert cfg.analysis.duckdb_memory_limit == "750MB"
    assert AnalysisParams(memory_limit="2GiB").duckdb_memory_limit == f"{2**30 // 10**6}MB"
    assert AnalysisParams().duckdb_memory_limit is None
    # a query run while Python holds much of the budget gets three quarters of the rest
    four = AnalysisParams(memory_limit="4GB")
    assert four.duckdb_memory_left(0) == "2000MB"
    assert four.duckdb_memory_left(3 * 10**9) == "750MB"
    assert four.duckdb_memory_left(4 * 10**9) == "256MB"          # never below 256 MB
    assert AnalysisParams().duckdb_memory_left(10**9) is None
    with pytest.raises(ConfigError, match="analysis.memory_limit"):
        load_config(write_config(tmp_path, {"transactions": "tx.csv"},
                                 analysis={"memory_limit": "lots"}))


def test_duckdb_respects_the_memory_limit_and_spills():
    import pandas as pd

    from analysis.features import connect

    con = connect({"transactions": pd.DataFrame({
        "customer_id": ["a"], "order_date": pd.to_datetime(["2024-01-01"]), "amount": [1.0]})},
        memory_limit="300MB")
    limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.replace(" ", "") in {"286.1MiB", "300.0MB", "286MiB"}, limit
    assert "csl-duckdb-spill" in con.execute(
        "SELECT current_setting('temp_directory')").fetchone()[0]
    # freed memory goes back to the system instead of staying with DuckDB's allocator
    flush = con.execute("SELECT current_setting('allocator_flush_threshold')").fetchone()[0]
    assert flush.replace(" ", "") in {"32.0MB", "30.5MiB", "32MB"}, flush


def test_every_yaml_example_in_the_readme_is_a_valid_config(tmp_path):
    """The README's examples are what users copy: each YAML block must parse as YAML and
    as a config (paths need not exist; they are resolved, not opened)."""
    import re

    from analysis.config import parse_config

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        raw = yaml.safe_load(block)
        config = parse_config(raw, base_dir=tmp_path)
        assert set(config.tables) == set(raw["tables"])
        for key in ("analysis", "strategy", "snapshot"):
            for name, value in (raw.get(key) or {}).items():
                got = getattr(getattr(config, key), name)
                assert got == value or tuple(got) == tuple(value), (key, name)


def test_the_spark_guides_config_example_is_valid(tmp_path):
    """docs/spark.md's YAML are config fragments users copy: the settings (with a table
    added) parse, and name the engine, master and settings they show; the tables of a
    catalog parse as a table and a file."""
    import re

    from analysis.config import parse_config

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "spark.md").read_text(), re.S)
    assert len(blocks) == 2
    raw = {**yaml.safe_load(blocks[0]), "tables": {"transactions": "tx.csv"}}
    config = parse_config(raw, base_dir=tmp_path)
    assert config.analysis.engine == "spark" and config.spark.master == "local[*]"
    assert config.spark.conf == {"spark.driver.memory": "8g",
                                 "spark.sql.shuffle.partitions": "400"}
    config = parse_config(yaml.safe_load(blocks[1]), base_dir=tmp_path)
    tables = config.tables
    assert tables["transactions"].source == "sales.orders"
    assert tables["transactions"].resolved_format == "table"
    assert tables["customers"].source == Path("/dbfs/mnt/exports/customers.parquet")


# --------------------------------------------------------------------------- every key checked


def _minimal(**extra):
    return {"tables": {"transactions": "tx.csv"}, **extra}


@pytest.mark.parametrize("raw, where, unknown", [
    (_minimal(analysiss={}), None, "analysiss"),
    (_minimal(source="elsewhere.yaml"), None, "source"),
    ({"tables": {"transactions": {"path": "tx.csv", "delimiter": ";"}}}, "tables.transactions",
     "delimiter"),
    ({"tables": {"transactions": {"path": "tx.csv", "columns": {"revenue": "x"}}}},
     "tables.transactions.columns", "revenue"),
    (_minimal(cleaning={"dedup": "auto"}), "cleaning", "dedup"),
    (_minimal(analysis={"horizon": 90}), "analysis", "horizon"),
    (_minimal(strategy={"margin": 0.3}), "strategy", "margin"),
    (_minimal(snapshot={"folds": 3}), "snapshot", "folds"),
    (_minimal(output={"processed": "p"}), "output", "processed"),
], ids=["top", "source", "table", "columns", "cleaning", "analysis", "strategy", "snapshot",
        "output"])
def test_every_unknown_key_at_every_level_is_refused_naming_its_place(tmp_path, raw, where,
                                                                       unknown):
    from analysis.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path, source=tmp_path / "c.yaml")
    assert err.value.key == where
    message = str(err.value)
    assert f"unknown key(s) {unknown}" in message and "; valid: " in message
    assert str(tmp_path / "c.yaml") in message
    if unknown == "source":      # set by the loader, never by the file
        assert "valid: analysis, cleaning, mode, name, output, pii, protected, report, seed," in message


def test_unknown_keys_are_all_named_with_the_closest_valid_one(tmp_path):
    from analysis.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(_minimal(strategy={"margin": 0.3, "contact": 1, "zzz": 2}),
                     base_dir=tmp_path)
    message = str(err.value)
    assert "unknown key(s) contact, margin, zzz" in message
    assert "did you mean contact_cost, margin_rate?" in message
    # and an unknown key is reported before a bad value elsewhere
    with pytest.raises(ConfigError, match="unknown key.*horizon"):
        parse_config(_minimal(mode="retail", analysis={"horizon": 9}), base_dir=tmp_path)


@pytest.mark.parametrize("section, key, value, choices", [
    ("cleaning", "dedupe", "sometimes", "auto, always, never"),
    ("analysis", "device", "gpu", "cpu, cuda"),
    ("snapshot", "tenure_unit", "decades", "days, weeks, months, years"),
    ("snapshot", "revenue_period", "fortnight", "day, week, month, quarter, year"),
])
def test_a_bad_choice_lists_the_choices_and_names_the_key(tmp_path, section, key, value,
                                                          choices):
    from analysis.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(_minimal(**{section: {key: value}}), base_dir=tmp_path)
    assert err.value.key == f"{section}.{key}"
    assert str(err.value).endswith(f"{value!r} is not one of: {choices}")
    with pytest.raises(ConfigError) as err:
        parse_config({"tables": {"transactions": {"path": "x", "format": "json"}}},
                     base_dir=tmp_path)
    assert err.value.key == "tables.transactions.format"
    assert "'json' is not one of: auto, csv, parquet, excel" in str(err.value)


@pytest.mark.parametrize("raw, key, fragment", [
    (_minimal(seed="abc"), "seed", "bad value 'abc': expected a whole number"),
    (_minimal(analysis={"n_cutoffs": 2.5}), "analysis.n_cutoffs", "expected a whole number"),
    (_minimal(analysis={"horizon_days": "abc"}), "analysis.horizon_days",
     "positive number of days or 'auto'"),
    (_minimal(analysis={"horizon_days": 0}), "analysis.horizon_days", "positive number"),
    (_minimal(analysis={"tier_shares": [0.5, 0.2, 0.1]}), "analysis.tier_shares",
     "needs two shares"),
    (_minimal(analysis={"as_of": "yesterday"}), "analysis.as_of", "a date such as"),
    (_minimal(strategy={"margin_rate": "high"}), "strategy.margin_rate", "expected a number"),
    (_minimal(strategy={"cost_per_order_by_channel": {"web": "x"}}),
     "strategy.cost_per_order_by_channel.web", "bad value 'x'"),
    (_minimal(strategy={"policy": [{"when": 1}]}), "strategy.policy", "with an 'action'"),
    (_minimal(snapshot={"cv_folds": 1}), "snapshot.cv_folds", "at least 2 folds"),
    (_minimal(analysis=[1]), "analysis", "expected a mapping"),
    ({"tables": {"transactions": {"sep": ";"}}}, "tables.transactions", "needs a 'path'"),
    ({"tables": {"orders": "x.csv"}}, "tables", "unknown table 'orders'; valid: transactions"),
    ({"tables": {}}, "tables", "needs a 'tables' mapping"),
    ({"mode": "snapshot", "tables": {"transactions": "x"}}, "tables",
     "mode 'snapshot' needs a 'customers' table"),
    ({"tables": {"transactions": {"path": "x", "names": ["a", ["b"]]}}},
     "tables.transactions.names[1]", "expected text"),
])
def test_a_bad_value_names_the_key_the_value_and_the_rule(tmp_path, raw, key, fragment):
    from analysis.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_values_are_coerced_as_yaml_writes_them(tmp_path):
    from analysis.config import parse_config

    cfg = parse_config(_minimal(
        name=2024, seed="7", protected=None, pii=["email"], analysis=None,
        cleaning={"min_date": "2000-01-01"}, output={"processed_dir": "p"},
        snapshot={"churn_positive": True, "cv_folds": "3"},
        strategy={"margin_rate": 1, "cost_per_order_by_channel": {"web": 2}}),
        base_dir=tmp_path)
    assert cfg.name == "2024" and cfg.seed == 7 and cfg.protected == () and cfg.pii == ("email",)
    assert str(cfg.cleaning.min_date) == "2000-01-01"
    assert cfg.snapshot.churn_positive == "yes" and cfg.snapshot.cv_folds == 3
    assert cfg.strategy.margin_rate == 1.0 and isinstance(cfg.strategy.margin_rate, float)
    assert cfg.strategy.cost_per_order_by_channel == {"web": 2.0}
    assert cfg.output.processed_dir == (tmp_path / "p").resolve()
    assert cfg.source is None and cfg.analysis.horizon_days == 90
    # the parameter groups are values: immutable, and usable without a file
    with pytest.raises(ValueError):
        cfg.strategy.margin_rate = 0.5
    snap = cfg.snapshot.model_copy(update={"discount_rate": 0.0})
    assert snap.discount_rate == 0.0 and cfg.snapshot.discount_rate == 0.1
    assert list(cfg.strategy.table()["parameter"])[:2] == ["margin_rate", "cost_per_order"]


def test_to_dict_round_trips_through_json_and_the_parser(tmp_path):
    import json

    from analysis.config import parse_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["tables"]["transactions"]["path"] == str(cfg.tables["transactions"].path)
    assert data["analysis"]["tier_shares"] == list(cfg.analysis.tier_shares)
    again = parse_config({k: v for k, v in data.items() if k != "source"}, base_dir=tmp_path)
    assert again.to_dict() == {**data, "source": None}


def test_a_run_on_spark_without_java_stops_with_a_config_error_naming_the_key(
        tmp_path, small_demo, monkeypatch):
    """``engine: spark`` and its ``spark:`` section parse; a run on Spark where no Java
    runtime is found stops with a clear config error (exit 2, naming the key and how to
    install) before anything is written, never a traceback from a notebook's kernel and
    never a run that silently uses DuckDB."""
    from analysis.report import run_pipeline

    path = write_config(tmp_path, {"transactions": {
        "path": str(small_demo / "transactions.parquet")}},
        analysis={"engine": "spark"}, spark={"master": "local[2]",
                                             "conf": {"spark.driver.memory": "1g"}})
    config = load_config(path)
    assert config.analysis.engine == "spark" and config.spark.master == "local[2]"
    assert dict(config.spark.conf) == {"spark.driver.memory": "1g"}
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="analysis.engine") as stop:
        run_pipeline(path, run_id="spark")
    assert stop.value.exit_code == 2 and "make spark" in str(stop.value)
    assert str(path) in str(stop.value)
    assert not (tmp_path / "reports").exists() and not (tmp_path / "processed").exists()
    with pytest.raises(ConfigError, match="engine"):
        load_config(write_config(tmp_path, {"transactions": {
            "path": str(small_demo / "transactions.parquet")}}, analysis={"engine": "polars"}))


def test_a_spark_setting_java_refuses_stops_the_run_with_a_config_error(tmp_path, small_demo):
    """The run's Spark driver starts before the first stage: a setting the Java process
    refuses stops the run there, naming the config, the ``spark`` section and what Java
    said, and no report is published."""
    pytest.importorskip("pyspark")
    from analysis.engine import require_spark
    from analysis.report import run_pipeline

    try:
        require_spark()
    except ConfigError:
        pytest.skip("no Java runtime")
    path = write_config(tmp_path, {"transactions": {
        "path": str(small_demo / "transactions.parquet")}},
        analysis={"engine": "spark"}, spark={"conf": {"spark.driver.memory": "lots"}})
    with pytest.raises(ConfigError, match="Invalid maximum heap size") as stop:
        run_pipeline(path, run_id="spark", log=lambda line: None)
    assert stop.value.exit_code == 2 and "key 'spark'" in str(stop.value)
    assert str(path) in str(stop.value)
    assert not (tmp_path / "reports" / "latest").exists()


def test_a_snapshot_run_starts_no_spark_driver_whatever_the_engine():
    """Only an order log is queried by an engine; a snapshot export (one row per
    customer) runs as it does on DuckDB, without starting or needing Spark."""
    from types import SimpleNamespace as NS

    from analysis.report import _on_spark

    assert _on_spark(NS(analysis=NS(engine="spark"), mode="transactions"))
    assert not _on_spark(NS(analysis=NS(engine="spark"), mode="snapshot"))
    assert not _on_spark(NS(analysis=NS(engine="duckdb"), mode="transactions"))
