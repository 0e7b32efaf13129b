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
