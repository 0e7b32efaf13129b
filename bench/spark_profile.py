"""The profile step on Spark's executors (``segments.profile_customers`` with a Spark
engine: the customer table built, segmented and written there) against the driver's
(DuckDB and pandas): one run of each, in a process of its own, on a run's cleaned
tables; the customer tables and every summary must agree (text and whole numbers
exactly, floats to 1e-9: sums taken in another order).

    python bench/spark_profile.py bench/out/e2e-1m/processed/s15a [master] > out.json

Prints one JSON object (seconds and the Python process's peak memory per engine, the
customers, equal or not); copy it to ``bench/results/`` with a note.
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.bench import in_own_process
from analysis.memory import peak_rss_mb

SUMMARIES = ("segments", "tiers", "lifecycle", "clusters", "cohorts", "pareto")


def profile(run: Path, engine: str, out: Path, master: str) -> dict:
    """Profile the run's customers at its scoring date on one engine; write the table
    and summaries to ``out``."""
    from analysis import features, segments
    from analysis.config import AnalysisParams
    from analysis.engine import spark_session

    recorded = json.loads((run / "profile.json").read_text())
    as_of = pd.Timestamp(recorded["as_of"]).date()
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if engine == "spark":
        start = time.perf_counter()
        con = features.connect_spark(run / "clean", session=spark_session(
            master, {"spark.driver.memory": "3g"}))
        seconds["session"] = round(time.perf_counter() - start, 1)
    else:
        con = features.connect(run / "clean", memory_limit="2GB")
    start = time.perf_counter()
    made = segments.profile_customers(con, as_of=as_of, params=AnalysisParams(), seed=42,
                                      horizon_days=recorded.get("horizon_days"),
                                      table=out / "customers.parquet")
    seconds["profile"] = round(time.perf_counter() - start, 1)
    if made.customers is not None:
        made.customers.to_parquet(out / "customers.parquet", index=False)
    for name in SUMMARIES:
        getattr(made, name).to_parquet(out / f"{name}.parquet", index=False)
    return {"seconds": seconds,
            "python_peak_mib": round(peak_rss_mb(resource.RUSAGE_SELF)),
            "customers": made.n_customers}


def agree(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    for col in a.columns:
        x, y = a[col], b[col]
        if x.dtype.kind in "fiu" and y.dtype.kind in "fiu":
            if not np.allclose(x.to_numpy(float), y.to_numpy(float), rtol=1e-9, atol=1e-12,
                               equal_nan=True):
                return False
        elif not (x.astype(object).where(x.notna(), None).tolist()
                  == y.astype(object).where(y.notna(), None).tolist()):
            return False
    return True


if __name__ == "__main__" and sys.argv[1] == "--one":
    print(json.dumps(profile(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]),
                             sys.argv[5])))
elif __name__ == "__main__":
    run = Path(sys.argv[1])
    master = sys.argv[2] if len(sys.argv) > 2 else "local[*]"
    out = Path(tempfile.mkdtemp(prefix="spark-profile-"))
    result = {"run": str(run), "master": master}
    for engine in ("duckdb", "spark"):
        result[engine] = in_own_process(__file__, run, engine, out / engine, master)
    equal = {}
    for name in ("customers", *SUMMARIES):
        # (read through Arrow: a Spark-written table's text as pandas' strings)
        a, b = (pq.read_table(out / e / f"{name}.parquet").to_pandas() for e in
                ("duckdb", "spark"))
        if name == "customers":
            b = b.set_index("customer_id").loc[a["customer_id"]].reset_index()
        equal[name] = agree(a, b)
    result["equal"] = equal
    result["ratio"] = round(result["spark"]["seconds"]["profile"]
                            / result["duckdb"]["seconds"]["profile"], 1)
    print(json.dumps(result, indent=2))
