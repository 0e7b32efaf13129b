"""The command line, including the acceptance commands of the foundation issue."""

import pandas as pd
import pytest

from analysis import cli
from analysis.features import CORE_COLUMNS

from .conftest import ROOT, require_cdnow, write_config


@pytest.mark.parametrize("command", [[], ["demo-data"], ["validate"], ["features"], ["run"],
                                     ["pseudonym"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if not command:
        for name in ("demo-data", "validate", "features", "run", "pseudonym"):
            assert name in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "commands" in capsys.readouterr().out


def test_validate_cdnow_reports_the_published_counts(tmp_path, capsys):
    require_cdnow()
    code = cli.main(["validate", "--config", str(ROOT / "configs" / "cdnow.yaml"),
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "69,659 rows read, 69,659 processed, 0 quarantined; 23,570 customers; " \
           "1997-01-01 to 1998-06-30" in out
    assert (tmp_path / "clean" / "transactions.parquet").is_file()


def cdnow_copy(tmp_path, transform):
    """A copy of the CDNOW log changed by ``transform`` (a function of its lines)."""
    source = require_cdnow() / "CDNOW_master.txt"
    lines = source.read_text().splitlines()
    (tmp_path / "cdnow.txt").write_text("\n".join(transform(lines)) + "\n")
    config = (ROOT / "configs" / "cdnow.yaml").read_text().replace(
        "../../shared/datasets/cdnow/CDNOW_master.txt", "cdnow.txt")
    (tmp_path / "cdnow.yaml").write_text(config)
    return tmp_path / "cdnow.yaml"


def test_cdnow_without_amount_column_stops_and_names_it(tmp_path, capsys):
    config = cdnow_copy(tmp_path, lambda lines: [" ".join(l.split()[:3]) for l in lines])
    code = cli.main(["validate", "--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert "required column 'dollar_value'" in err and "cdnow.txt" in err
    assert "rule: required_column" in err


def test_cdnow_with_three_bad_dates_quarantines_exactly_those(tmp_path, capsys):
    bad = {10: "1997XX01", 500: "19971340", 60000: "unknown"}

    def spoil(lines):
        out = list(lines)
        for i, value in bad.items():
            parts = out[i].split()
            parts[1] = value
            out[i] = " ".join(parts)
        return out

    config = cdnow_copy(tmp_path, spoil)
    code = cli.main(["validate", "--config", str(config), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "69,659 rows read, 69,656 processed, 3 quarantined" in out
    q = pd.read_csv(tmp_path / "out" / "quarantine" / "transactions.csv", dtype=str)
    assert q["source_row"].astype(int).tolist() == sorted(bad)
    assert set(q["rule"]) == {"unparseable_date"}
    assert q["raw:date"].tolist() == [bad[i] for i in sorted(bad)]


def test_features_command_writes_the_core_columns(tmp_path, capsys):
    require_cdnow()
    out = tmp_path / "f.parquet"
    code = cli.main(["features", "--config", str(ROOT / "configs" / "cdnow.yaml"),
                     "--cutoff", "1997-10-01", "--horizon-days", "273", "--out", str(out)])
    assert code == 0
    frame = pd.read_parquet(out)
    assert len(frame) == 23_570 and set(CORE_COLUMNS) <= set(frame.columns)
    assert "23,570 customers" in capsys.readouterr().out


def test_demo_data_command(tmp_path):
    assert cli.main(["demo-data", "--customers", "50", "--seed", "1", "--out",
                     str(tmp_path), "--format", "csv"]) == 0
    tx = pd.read_csv(tmp_path / "transactions.csv")
    assert tx["customer_id"].nunique() == 50
    assert (tmp_path / "ground_truth" / "customers.parquet").is_file()


def test_bad_date_argument_is_a_usage_error(tmp_path, capsys):
    config = write_config(tmp_path, {"transactions": "tx.csv"})
    with pytest.raises(SystemExit) as done:
        cli.main(["features", "--config", str(config), "--cutoff", "01/02/2024", "--out", "x"])
    assert done.value.code == 2
    assert "not a date" in capsys.readouterr().err


def test_config_error_exit_code(tmp_path, capsys):
    assert cli.main(["validate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
