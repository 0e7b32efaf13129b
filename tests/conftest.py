"""Shared fixtures: a small demo world and helpers that write configs next to data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# One thread per OpenMP/BLAS pool (XGBoost, scikit-learn, NumPy), in this process and in
# the notebook kernels it starts (they inherit the environment). The suite's models are
# small: on CI's two shared cores, threads that spin while waiting for each other cost
# far more than they save (a 400-row cross-validation: 20 s of CPU with two threads,
# 0.6 s with one). Set before NumPy or XGBoost is loaded; a value already set wins.
for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_pool, "1")

from analysis.demo import write_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CDNOW = ROOT.parent / "shared" / "datasets" / "cdnow"


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 1,500-customer demo world (Parquet), generated once per test session."""
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, n_customers=1_500, seed=7)
    return out


def write_config(folder: Path, tables: dict, **extra) -> Path:
    """Write a config YAML into ``folder`` with outputs kept inside ``folder``."""
    raw = {"name": "test", "mode": "transactions", "tables": tables,
           "output": {"processed_dir": "processed", "reports_dir": "reports"}}
    raw.update(extra)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def demo_config(tmp_path, small_demo) -> Path:
    """A config over the small demo world, writing outputs under tmp_path."""
    return write_config(tmp_path, {
        "transactions": {"path": str(small_demo / "transactions.parquet")},
        "customers": {"path": str(small_demo / "customers.parquet")},
        "interactions": {"path": str(small_demo / "interactions.parquet")},
        "campaign": {"path": str(small_demo / "campaign.parquet")},
    }, protected=["gender", "age_band"], analysis={"horizon_days": 90})


#: The configs the project ships; each one runs end to end in the suite.
SHIPPED = ROOT / "configs"


def shipped_config(name: str, folder: Path, tables: dict[str, Path] | None = None) -> dict:
    """``configs/<name>.yaml`` as shipped, with its outputs under ``folder`` and its
    tables read from ``tables`` where given (small generated stand-ins for the data
    ``make data`` writes), else from the file the shipped config names."""
    raw = yaml.safe_load((SHIPPED / f"{name}.yaml").read_text())
    for table, spec in raw["tables"].items():
        spec["path"] = str(tables[table] if tables and table in tables
                           else (SHIPPED / spec["path"]).resolve())
    raw["output"] = {"processed_dir": str(folder / "processed"),
                     "reports_dir": str(folder / "reports")}
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def require_cdnow() -> Path:
    if not (CDNOW / "CDNOW_master.txt").is_file():
        pytest.skip("../shared/datasets/cdnow is not beside the checkout")
    return CDNOW


def require_spark() -> None:
    """Skip unless pyspark (the ``spark`` extra, which ``make test`` installs) and a Java
    runtime are here."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("pyspark") is None or importlib.util.find_spec("sqlglot") is None:
        pytest.skip("the 'spark' extra is not installed (make spark)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java runtime for Spark (make spark installs one where it can)")


#: A script payload planted in data values (must show as text, never run).
SCRIPT_PAYLOAD = '<script>window.__xss = 1</script>toys'


@pytest.fixture(scope="session")
def telco_run(tmp_path_factory):
    """One snapshot-mode pipeline run on a messy telecom-style export: column names that
    differ by case and spaces or hold characters XGBoost refuses in a feature name,
    churn labels in mixed case, blank total charges, and a script payload in a category,
    run with the parameters of the shipped ``configs/snapshot.yaml``. Shared by the
    snapshot and browser tests."""
    import numpy as np

    from analysis.demo import generate_snapshot_demo
    from analysis.report import run_pipeline

    folder = tmp_path_factory.mktemp("telco")
    frame, _ = generate_snapshot_demo(1_500, seed=5)
    rng = np.random.default_rng(5)
    frame["Churn"] = [v.upper() if r < 0.2 else v.lower() if r < 0.4 else v
                      for v, r in zip(frame["Churn"], rng.random(len(frame)), strict=True)]
    frame["PaymentMethod"] = frame["PaymentMethod"].replace({"Mailed check": SCRIPT_PAYLOAD})
    frame = frame.rename(columns={"customerID": "Customer ID", "TotalCharges": " Total Charges ",
                                  "MonthlyCharges": "monthly_charges", "Churn": "CHURN",
                                  "PaperlessBilling": "Paperless [billing]",
                                  "StreamingTV": "Streaming<TV>"})
    frame.to_csv(folder / "telco.csv", index=False)
    # the shipped snapshot config, its column mapping spelled the way this export has it
    raw = shipped_config("snapshot", folder, tables={"customers": folder / "telco.csv"})
    raw["name"] = "telco"
    raw["tables"]["customers"]["columns"] = {
        "customer_id": "customer id", "churn": "churn", "tenure": "tenure",
        "recurring_revenue": "Monthly Charges", "total_revenue": "total charges"}
    config = write_yaml(folder / "telco.yaml", raw)
    return run_pipeline(config, run_id="telco", log=lambda line: None)
