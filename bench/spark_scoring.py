"""Scoring and explaining customers on Spark's executors (``models.score_on_spark``)
against the same function on the driver (``models.score_customers``): one run of each
on the e2e-1m run's models and features, the first ``N`` customers (default 200,000),
every customer given reasons; the results must be equal.

    python bench/spark_scoring.py bench/out/e2e-1m/processed/<run_id> [N] [master]

Prints one JSON object (seconds, customers per second, equal or not); copy it to
``bench/results/`` with a note.
"""
import json
import sys
import time

import numpy as np

from analysis.engine import spark_session
from analysis.models import read_model_run, score_customers, score_on_spark
from analysis.store import RunStore

pdir = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
master = sys.argv[3] if len(sys.argv) > 3 else "local[*]"
run = read_model_run(pdir, tables=())
features = RunStore(pdir).read_profile_table().iloc[:n].reset_index(drop=True)
start = time.perf_counter()
here = score_customers(run, features)
seconds_driver = time.perf_counter() - start
start = time.perf_counter()
session = spark_session(master, {"spark.driver.memory": "3g"})
seconds_session = time.perf_counter() - start
start = time.perf_counter()
there = score_on_spark(run, features, session)
seconds_spark = time.perf_counter() - start
equal = (there["customer_id"].tolist() == here["customer_id"].tolist()
         and np.allclose(there["churn_probability"], here["churn_probability"], rtol=1e-12)
         and there["churn_reasons"].tolist() == here["churn_reasons"].tolist()
         and there["value_reasons"].fillna("").tolist()
         == here["value_reasons"].fillna("").tolist())
print(json.dumps({
    "customers": len(features), "churn_method": run.churn_chosen,
    "value_method": run.value_chosen, "master": master,
    "spark_cores": session.sparkContext.defaultParallelism,
    "seconds_driver": round(seconds_driver, 1), "seconds_spark": round(seconds_spark, 1),
    "seconds_spark_session": round(seconds_session, 1),
    "customers_per_second_driver": round(len(features) / seconds_driver),
    "customers_per_second_spark": round(len(features) / seconds_spark),
    "equal": bool(equal)}, indent=2))
session.stop()
