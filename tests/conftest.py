"""Shared fixtures: a small demo world and helpers that write configs next to data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from analysis.demo import write_demo

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


def require_cdnow() -> Path:
    if not (CDNOW / "CDNOW_master.txt").is_file():
        pytest.skip("../shared/datasets/cdnow is not beside the checkout")
    return CDNOW
