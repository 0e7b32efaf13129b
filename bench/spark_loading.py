"""Loading and validating the input on Spark's executors (``data.quality_step`` with
``analysis.engine: spark``: ``data.load_dataset_on_spark``) against the driver's load
(``engine: duckdb``): one run of each on a config's tables; the cleaned tables, the
quarantine files and the summary must be equal.

    python bench/spark_loading.py bench/e2e-1m.yaml [master] > out.json

Prints one JSON object (seconds per engine, rows, equal or not); copy it to
``bench/results/`` with a note.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from analysis import data
from analysis.config import load_config
from analysis.engine import spark_session

config = load_config(sys.argv[1])
master = sys.argv[2] if len(sys.argv) > 2 else "local[*]"
out = Path(tempfile.mkdtemp(prefix="spark-loading-"))
seconds, summaries = {}, {}
for engine in ("duckdb", "spark"):
    run = config.model_copy(update={
        "analysis": config.analysis.model_copy(update={"engine": engine}),
        "spark": config.spark.model_copy(update={"master": master})})
    if engine == "spark":
        start = time.perf_counter()
        session = spark_session(master, {"spark.driver.memory": "3g"})
        seconds["spark_session"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    summaries[engine] = data.quality_step(run, out / engine)
    seconds[engine] = round(time.perf_counter() - start, 1)


def values(path: Path) -> pa.Table:
    """The table's values in Arrow (pandas' objects would take 10 GB a table), times in
    microseconds and text as strings: Spark's types for pandas'."""
    table = pq.read_table(path).replace_schema_metadata(None)
    kinds = [pa.timestamp("us") if pa.types.is_timestamp(f.type)
             else pa.string() if pa.types.is_large_string(f.type) else f.type
             for f in table.schema]
    return table.cast(pa.schema([pa.field(f.name, k) for f, k in zip(table.schema, kinds)]))


equal = {}
for name in config.tables:
    clean = [out / e / "clean" / f"{name}.parquet" for e in ("duckdb", "spark")]
    equal[f"clean_{name}"] = bool(values(clean[0]).equals(values(clean[1])))
    quarantine = [(out / e / "quarantine" / f"{name}.csv").read_bytes()
                  for e in ("duckdb", "spark")]
    equal[f"quarantine_{name}"] = quarantine[0] == quarantine[1]
quality = [json.loads((out / e / "data_quality.json").read_text()) for e in ("duckdb", "spark")]
equal["summary"] = quality[0] == quality[1]
rows = {t["table"]: {"read": t["rows_read"], "quarantined": t["rows_quarantined"]}
        for t in quality[0]["tables"]}
print(json.dumps({
    "config": sys.argv[1], "master": master,
    "spark_cores": session.sparkContext.defaultParallelism,
    "rows": rows,
    "input_mb": round(sum(Path(s.path).stat().st_size for s in config.tables.values())
                      / 2**20, 1),
    "parquet_rows_transactions": pq.ParquetFile(
        config.tables["transactions"].path).metadata.num_rows,
    "seconds_driver": seconds["duckdb"], "seconds_spark": seconds["spark"],
    "seconds_spark_session": seconds["spark_session"],
    "ratio": round(seconds["spark"] / seconds["duckdb"], 1),
    "equal": equal}, indent=2))
session.stop()
