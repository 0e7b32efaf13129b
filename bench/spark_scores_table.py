"""The models step's scores table on Spark: written by the executors from the profile
step's table where it lies (``models.scores_on_spark``, this code) against the way the
step made it before (session 16): the profile table read into the driver, the executors
scoring and explaining it (``models.score_on_spark``), the scores collected and the
value method and lifetime outlook computed on the driver over every customer's RFM
summary (``models._scores_here``). Each in its own process (its Python peak RSS is its
own; the JVM is not counted), on the e2e-1m run's models, features and cleaned log,
every customer given reasons; the two tables must be equal.

    python bench/spark_scores_table.py bench/out/e2e-1m/processed/<run_id> [master]

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


def one(pdir: str, mode: str, master: str, out: str) -> dict:
    from analysis import models as M
    from analysis.engine import SparkEngine, spark_session
    from analysis.features import connect_spark
    from analysis.store import RunStore

    store = RunStore(pdir)
    run = M.read_model_run(pdir, tables=())
    as_of, horizon = store.scoring_date(), run.horizon_days
    session = spark_session(master, {"spark.driver.memory": "3g"})
    eng = SparkEngine(session)
    connect_spark(Path(pdir) / "clean", session=session)
    table = session.read.parquet(str(store.profile_table))
    # (the training customers are not kept by a run: the lookup, used only when the RFM
    # cells score the value, is fitted on the scoring date's own last period)
    rfm = M.RfmLookup.fit(table.select("customer_id", *M.RfmLookup.COLUMNS,
                                       "spend_last_horizon").limit(300_000).toPandas()
                          .rename(columns={"spend_last_horizon": "future_spend"}),
                          target="future_spend")
    start = time.perf_counter()
    if mode == "executors":
        M.scores_on_spark(run, eng, table, as_of=as_of, horizon_days=horizon, rfm=rfm,
                          out=out)
    else:
        features = store.read_profile_table()
        scored = M.score_on_spark(run, table, session, ids=features["customer_id"])
        M._scores_here(run, eng, features, as_of=as_of, horizon_days=horizon, rfm=rfm,
                       churn_probability=scored["churn_probability"].to_numpy(),
                       model_value=scored["value_model"].to_numpy(),
                       reasons=(scored["churn_reasons"].to_numpy(dtype=object),
                                scored["value_reasons"].to_numpy(dtype=object))
                       ).to_parquet(out, index=False)
    seconds = time.perf_counter() - start
    session.stop()
    return {"seconds": round(seconds, 1),
            "python_peak_mib": round(peak_rss_mb(resource.RUSAGE_SELF)),
            "value_method": run.value_chosen, "churn_method": run.churn_chosen}


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one(*sys.argv[2:6])))
        sys.exit(0)
    pdir = sys.argv[1]
    master = sys.argv[2] if len(sys.argv) > 2 else "local[*]"
    result: dict = {"run": pdir, "master": master}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("executors", "driver"):
            result[mode] = in_own_process(__file__, pdir, mode, master,
                                          Path(tmp) / f"{mode}.parquet")
        a, b = (pd.read_parquet(Path(tmp) / f"{m}.parquet") for m in ("executors", "driver"))
        result["customers"] = len(a)
        b = b.astype({c: a[c].dtype for c in a.columns})
        same = list(a.columns) == list(b.columns) and a["customer_id"].equals(b["customer_id"])
        for c in a.columns:
            if a[c].dtype.kind == "f":
                same &= bool(np.allclose(a[c], b[c], rtol=1e-9, atol=1e-12, equal_nan=True))
            else:
                same &= bool(a[c].fillna("").astype(str).equals(b[c].fillna("").astype(str)))
        result["equal"] = same
    result["ratio_seconds"] = round(result["executors"]["seconds"]
                                    / result["driver"]["seconds"], 2)
    print(json.dumps(result, indent=2))
