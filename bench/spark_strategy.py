"""The strategy step on Spark: the executors value, decide and write every customer from
the run store's tables where they lie (``strategy.decide_on_spark``, this code) against
the way the step decided on Spark before (session 17): the customer table read into the
driver and decided there in pandas (``strategy.decide`` with the Spark engine for its
SQL); and, for scale, ``strategy.decide`` on DuckDB. Each in its own process (its Python
peak RSS is its own; the JVM is not counted, its heap capped at 3 GB), on the e2e-1m
run's scores, profile, models and cleaned inputs (campaigns, protected attributes); the
decision tables must be equal.

    python bench/spark_strategy.py bench/out/e2e-1m/processed/<run_id> [master]

Prints one JSON object; copy it to ``bench/results/`` with a note.
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.bench import in_own_process
from analysis.memory import peak_rss_mb

MODES = ("executors", "spark-driver", "duckdb")


def one(pdir: str, mode: str, master: str, out: str) -> dict:
    from analysis import strategy as S
    from analysis.config import load_config
    from analysis.engine import spark_session
    from analysis.features import connect, connect_spark
    from analysis.models import read_model_run
    from analysis.store import RunStore

    # a run folder of its own: the e2e-1m run's tables, linked, and its own decisions
    run_dir = Path(out)
    run_dir.mkdir(parents=True)
    for name in ("clean", "segments", "models", "profile.json", "models.json"):
        (run_dir / name).symlink_to(Path(pdir).resolve() / name)
    config = load_config(Path(__file__).parent / "e2e-1m.yaml")
    store = RunStore(run_dir)
    run = read_model_run(run_dir, tables=())
    clean = run_dir / "clean"
    kwargs = {"as_of": store.scoring_date(), "horizon_days": store.horizon_days(),
              "params": config.strategy, "protected": config.protected,
              "campaign": pd.read_parquet(clean / "campaign.parquet"),
              "value_model": run.value, "churn_model": run.churn,
              "exclude_attributes": config.protected + config.pii}
    session = None
    if mode != "duckdb":
        session = spark_session(master, {"spark.driver.memory": "3g",
                                         "spark.sql.shuffle.partitions": "16"})
    start = time.perf_counter()
    if mode == "executors":
        eng = connect_spark(clean, session=session)
        decided, ids = S.decide_on_spark(eng, store, attributes=clean / "customers.parquet",
                                         **kwargs)
        S.write_strategy(decided, run_dir, campaign_ids=ids)
    else:
        con = connect_spark(clean, session=session) if mode == "spark-driver" \
            else connect(clean, memory_limit=config.analysis.duckdb_memory_limit)
        decided = S.decide(con, store.read_customers(S.DECISION_COLUMNS),
                           attributes=pd.read_parquet(clean / "customers.parquet", columns=[
                               "customer_id", *config.protected]),
                           features=store.read_profile_table, **kwargs)
        S.write_strategy(decided, run_dir)
    seconds = time.perf_counter() - start
    if session is not None:
        session.stop()
    return {"seconds": round(seconds, 1),
            "python_peak_mib": round(peak_rss_mb(resource.RUSAGE_SELF)),
            "method": decided.retention["method"],
            "campaign_size": decided.retention["campaign_size"],
            "expected_incremental_profit": decided.retention["expected_incremental_profit"]}


def equal(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """The same decision table: texts and flags exactly (a missing text is not an empty
    one), numbers to 1e-9."""
    def values(column: pd.Series) -> list:
        return column.astype(object).where(column.notna(), None).tolist()

    same = list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns if same else ():
        if a[c].dtype.kind == "f":
            same &= bool(np.allclose(a[c], b[c], rtol=1e-9, atol=1e-9, equal_nan=True))
        else:
            same &= values(a[c]) == values(b[c])
    return same


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one(*sys.argv[2:6])))
        sys.exit(0)
    pdir = sys.argv[1]
    master = sys.argv[2] if len(sys.argv) > 2 else "local[*]"
    result: dict = {"run": pdir, "master": master}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            result[mode] = in_own_process(__file__, pdir, mode, master, Path(tmp) / mode)
        tables = {m: pd.read_parquet(Path(tmp) / m / "strategy" / "customers.parquet")
                  for m in MODES}
        result["customers"] = len(tables["executors"])
        result["equal_to_spark_driver"] = equal(tables["spark-driver"], tables["executors"])
        result["equal_to_duckdb"] = equal(tables["duckdb"], tables["executors"])
        result["same_actions_as_duckdb"] = float(
            (tables["duckdb"]["action"].to_numpy() == tables["executors"]["action"]
             .to_numpy()).mean())
    result["ratio_seconds_to_spark_driver"] = round(
        result["executors"]["seconds"] / result["spark-driver"]["seconds"], 2)
    print(json.dumps(result, indent=2))
