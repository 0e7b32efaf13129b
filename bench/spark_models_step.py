"""The models step (``models.churn_step``) on Spark against DuckDB, on a finished run's
cleaned tables and profile (the e2e-1m run's), each engine in its own process: seconds,
the Python process's peak memory (the JVM is not counted) and the out-of-time figures.
On Spark the driver should hold samples only: the training, validation and evaluation
samples, and the customers it explains; the executors score every customer and write
the scores.

    python bench/spark_models_step.py bench/out/e2e-1m/processed/<run_id> [n_cutoffs] [master]

``n_cutoffs`` (default 4: evaluation, validation and two training cutoffs) keeps a run
on two cores short; both engines use the same. ``SPARK_CONF`` (JSON) adds Spark settings
to the 3 GB driver's. Prints one JSON object; copy it to ``bench/results/`` with a note.
"""
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from analysis.bench import in_own_process
from analysis.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]


def one(source: str, engine: str, n_cutoffs: int, master: str, folder: str) -> dict:
    from analysis import models as M
    from analysis.config import parse_config

    raw = yaml.safe_load((ROOT / "bench" / "e2e-1m.yaml").read_text())
    raw["analysis"].update(engine=engine, n_cutoffs=n_cutoffs)
    raw["spark"] = {"master": master, "conf": {"spark.driver.memory": "3g",
                                               **json.loads(os.environ.get("SPARK_CONF",
                                                                           "{}"))}}
    config = parse_config(raw, base_dir=ROOT / "bench")
    # the run folder: the source run's cleaned tables and profile (linked, not copied)
    run = Path(folder)
    run.mkdir()
    for name in ("clean", "segments", "profile.json", "data_quality.json"):
        os.symlink(Path(source).resolve() / name, run / name)
    (run / "models").mkdir()
    start = time.perf_counter()
    result = M.churn_step(config, run)
    seconds = time.perf_counter() - start
    return {"engine": engine, "seconds": round(seconds, 1),
            "python_peak_mib": round(peak_rss_mb(resource.RUSAGE_SELF)),
            "trained_with": result.churn.trained_with_, "sizes": result.sizes,
            "churn_chosen": result.churn_chosen, "value_chosen": result.value_chosen,
            "churn_auc_active": round(float(result.churn_metrics_active.set_index("method")
                                            .loc[result.churn_chosen, "roc_auc"]), 6),
            "value_mae": round(float(result.value_metrics.set_index("method")
                                     .loc[result.value_chosen, "mae"]), 4),
            "scores_in_memory": result.scores is not None}


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5],
                             sys.argv[6])))
        sys.exit(0)
    source = sys.argv[1]
    n_cutoffs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    master = sys.argv[3] if len(sys.argv) > 3 else "local[*]"
    result: dict = {"run": source, "n_cutoffs": n_cutoffs, "master": master,
                    "spark_conf": json.loads(os.environ.get("SPARK_CONF", "{}"))}
    tmp = tempfile.mkdtemp(dir=ROOT / "bench" / "out")
    try:
        for engine in ("duckdb", "spark"):
            result[engine] = in_own_process(__file__, source, engine, n_cutoffs, master,
                                            Path(tmp) / engine)
        import pandas as pd

        scores = [pd.read_parquet(Path(tmp) / e / "models" / "scores.parquet")
                  for e in ("duckdb", "spark")]
        result["scores_rows"] = [len(s) for s in scores]
        result["same_customers_in_order"] = bool(
            scores[0]["customer_id"].equals(scores[1]["customer_id"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
