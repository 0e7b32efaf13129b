"""The features on Apache Spark (``analysis.engine: spark``), in local mode: the one
definition of the queries (DuckDB's SQL, transpiled by sqlglot) gives the same tables
on both engines.

Spark is the ``spark`` extra, which ``make test`` installs (with Java); without it these
tests are skipped. Floats are compared to 1e-9 (relative, or absolute for sums that
cancel out to about zero): sums taken in another order differ in their last bits, as
DuckDB's own do between runs (README, "Reproducible"); counts, dates and text exactly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from analysis import features as F
from analysis.engine import to_spark
from .conftest import ROOT, require_cdnow

pytest.importorskip("pyspark")
pytest.importorskip("sqlglot")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("no Java runtime for Spark (make spark installs one where it can)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def session():
    from analysis.engine import spark_session

    spark = spark_session("local[2]", app_name="tests")
    yield spark
    spark.stop()


def _same(duck: pd.DataFrame, spark: pd.DataFrame) -> None:
    assert list(spark.columns) == list(duck.columns)
    pd.testing.assert_frame_equal(spark, duck, check_dtype=True, check_exact=False,
                                  rtol=1e-9, atol=1e-9)


def test_the_rewrites_keep_duckdbs_meaning_on_spark(session):
    """What sqlglot leaves to us: an ordered FIRST (ties broken by the next key, missing
    keys last), ARG_MAX over a ROW key, a SEMI JOIN, an average of decimals and a
    MATERIALIZED hint; each query gives DuckDB's rows on Spark."""
    rows = pd.DataFrame({"c": ["a", "a", "a", "b", "b", "c"],
                         "k": ["x", "y", "z", "p", "q", "r"],
                         "v": [2.0, 2.0, 1.0, None, 3.0, None],
                         "d": pd.to_datetime(["2024-01-02", "2024-01-02", "2024-01-01",
                                              "2024-01-01", "2024-01-01", "2024-01-03"])})
    con = duckdb.connect()
    con.register("t", rows)
    from analysis.engine import SparkEngine

    spark = SparkEngine(session)
    spark.register("t", rows)
    queries = [
        "SELECT c, FIRST(k ORDER BY v DESC, k) AS top FROM t GROUP BY c ORDER BY c",
        "SELECT c, ARG_MAX(v, ROW(d, v)) FILTER (WHERE v IS NOT NULL) AS last "
        "FROM t GROUP BY c ORDER BY c",
        "SELECT t.c, t.k FROM t SEMI JOIN (SELECT 'b' AS c) m ON t.c = m.c ORDER BY t.k",
        # a share from decimal literals (Spark's own AVG would round it to 5 places),
        # through a MATERIALIZED hint
        "WITH m AS MATERIALIZED (SELECT c, CASE WHEN v > 1.5 THEN 1.0 ELSE 0.0 END AS w "
        "FROM t) SELECT c, AVG(w) AS share FROM m GROUP BY c ORDER BY c",
    ]
    assert "MIN_BY(K, STRUCT(" in to_spark(queries[0]).upper()
    assert "MAX_BY(V, STRUCT(D, V))" in to_spark(queries[1]).upper()
    assert "LEFT SEMI JOIN" in to_spark(queries[2]).upper()
    assert "MATERIALIZED" not in to_spark(queries[3]).upper()
    for query in queries:
        expected = con.execute(query).df()
        got = spark.frame(query)
        assert got.astype(object).where(got.notna(), None).values.tolist() == \
            expected.astype(object).where(expected.notna(), None).values.tolist(), query
    # the ties: "a" has x and y at 2.0 (x first by name), "b" skips its missing value
    assert spark.frame(queries[0])["top"].tolist() == ["x", "q", "r"]
    assert spark.frame(queries[3])["share"].tolist() == [2 / 3, 0.5, 0.0]
    assert spark.frame(queries[3])["share"].dtype == "float64"
    # a local session gets two shuffle partitions a core, not a cluster's 200
    assert session.conf.get("spark.sql.shuffle.partitions") == "4"


def test_the_features_command_on_spark_writes_duckdbs_table_for_cdnow(tmp_path):
    """#19's acceptance: ``features --engine spark`` on CDNOW writes the same table as
    without it."""
    require_cdnow()
    out = {}
    for engine in ("duckdb", "spark"):
        out[engine] = tmp_path / f"{engine}.parquet"
        done = subprocess.run(
            [sys.executable, "-m", "analysis", "features", "--config",
             str(ROOT / "configs" / "cdnow.yaml"), "--cutoff", "1997-10-01",
             "--horizon-days", "273", "--engine", engine, "--out", str(out[engine])],
            capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"on {engine}:" in done.stdout
    duck, spark = pd.read_parquet(out["duckdb"]), pd.read_parquet(out["spark"])
    assert len(duck) == 23_570
    _same(duck, spark)


def test_a_sampled_snapshot_on_spark_keeps_its_share_and_the_same_draw(session, small_demo,
                                                                      tmp_path):
    """Snapshots at two cutoffs in one pass (one for named customers only) equal DuckDB's.
    Sampling hashes with Spark's own hash: about the share asked for, exactly the
    customers whose salted id hashes below it, each with the features the full
    snapshot gives them. The log is read from a Parquet file of pandas' nanosecond
    timestamps, which Spark does not read as they are."""
    (tmp_path / "transactions.parquet").symlink_to(small_demo / "transactions.parquet")
    spark = F.connect_spark(tmp_path, session=session)
    types = {r[0]: r[1] for r in session.sql("DESCRIBE tx_raw").collect()}
    assert types["order_date"].startswith("timestamp")
    duck = F.connect(tmp_path)
    assert F.data_end(spark) == F.data_end(duck)
    cutoff = F.data_end(spark) - dt.timedelta(days=120)
    # two cutoffs in one pass, the earlier limited to named customers: DuckDB's frames
    # (the whole run on Spark, in test_report.py, compares the other inputs' features)
    earlier = cutoff - dt.timedelta(days=300)
    named = {earlier: duck.execute("SELECT DISTINCT customer_id FROM lines ORDER BY 1")
             .df()["customer_id"].iloc[::3]}
    kw = dict(cutoffs=[earlier, cutoff], horizon_days=90, customers=named)
    a, b = F.snapshots_by_cutoff(duck, **kw), F.snapshots_by_cutoff(spark, **kw)
    assert list(b) == [earlier, cutoff] and len(a[earlier]) > 100
    assert set(b[earlier]["customer_id"]) <= set(named[earlier])
    for when in a:
        _same(a[when], b[when])
    full = b[cutoff]
    assert F.suggest_horizon_days(spark) == F.suggest_horizon_days(duck)
    part = F.build_features(spark, cutoff=cutoff, horizon_days=90, sample_share=0.3)
    assert 0.2 * len(full) < len(part) < 0.4 * len(full)
    draw = spark.rows(f"SELECT customer_id FROM (SELECT DISTINCT customer_id FROM lines "
                      f"WHERE order_date < DATE '{cutoff}') c WHERE "
                      + spark.hash_bucket(f"c.customer_id || '{cutoff}'") + " < 300000")
    drawn = {r[0] for r in draw} & set(full["customer_id"])    # (those with a purchase)
    assert sorted(part["customer_id"]) == sorted(drawn)
    # a table the session already has (a Delta or catalog table) is read where it is
    session.sql("SELECT * FROM tx_raw WHERE order_date < DATE '2099-01-01'"
                ).createOrReplaceTempView("tx_raw")
    on_session = F.connect_spark(None, session=session)
    assert on_session.rows("SELECT COUNT(*) FROM lines") == duck.execute(
        "SELECT COUNT(*) FROM lines").fetchall()
    assert F.data_end(on_session) == F.data_end(duck)
    _same(full.set_index("customer_id").loc[part["customer_id"]].reset_index(),
          part)


#: A stage's kernel, standing in: a session, what it finds, a cached view it leaves behind.
STAGE = """
import json, os, sys
from analysis.engine import spark_session
s = spark_session("local[2]")
print(json.dumps([s.sparkContext.applicationId, sorted(t.name for t in s.catalog.listTables()),
                  s.conf.get("spark.sql.shuffle.partitions"),
                  s._jsparkSession.sharedState().cacheManager().isEmpty(),
                  s.sparkContext.pythonExec == sys.executable]))
df = s.range(10).persist()
df.count()
df.createOrReplaceTempView("made_by_" + sys.argv[1])
"""


def test_a_runs_stages_share_one_spark_driver_each_with_a_session_of_its_own(
        tmp_path, monkeypatch):
    """The stages of a run on Spark, each in a process of its own, use the one driver the
    run started (the same application), each with its own session: no view or cache of
    the stage before, the local master's settings; the driver is gone after the run, and
    what it printed is in its log, not on the run's terminal. Listing the catalog leaves
    no ``spark-warehouse`` folder where the run was started."""
    from analysis.engine import SHARED_DRIVER, shared_spark_driver

    monkeypatch.chdir(tmp_path)
    log = tmp_path / "driver.log"
    with shared_spark_driver("local[2]", log=log) as pid:
        assert os.environ[SHARED_DRIVER] == "1" and Path(f"/proc/{pid}").exists()
        # (Spark's Python workers: this Python on a local master, unless the user said)
        env = {k: v for k, v in os.environ.items() if k != "PYSPARK_PYTHON"}
        seen = [json.loads(subprocess.run([sys.executable, "-c", STAGE, name], check=True,
                                          capture_output=True, text=True, env=env).stdout)
                for name in ("first", "second")]
    assert seen[0][0] == seen[1][0]                   # one application, one driver
    assert seen[0][4] is seen[1][4] is True
    assert seen[1][1] == [] and seen[1][3] is True    # nothing of the first stage's
    assert seen[0][2] == seen[1][2] == "4"
    assert not Path(f"/proc/{pid}").exists() and SHARED_DRIVER not in os.environ
    assert "log4j" in log.read_text()         # (Spark's first words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.log"]


def test_under_spark_submit_the_stages_share_its_driver(tmp_path):
    """``spark-submit ... cli.py run``: the stages use spark-submit's driver, one after
    the other (each used to start a context of its own there, and the second failed:
    only one may run in a Java process)."""
    import pyspark

    runner = tmp_path / "runner.py"
    runner.write_text(
        "import json, subprocess, sys\n"
        "from analysis.engine import shared_spark_driver\n"
        "with shared_spark_driver('local[2]') as pid:\n"
        f"    seen = [subprocess.run([sys.executable, '-c', {STAGE!r}, n], check=True,\n"
        "        capture_output=True, text=True).stdout for n in ('first', 'second')]\n"
        "print(json.dumps([pid] + [json.loads(s) for s in seen]))\n")
    python = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run([str(Path(pyspark.__file__).parent / "bin" / "spark-submit"),
                           "--master", "local[1]", str(runner)], capture_output=True,
                          text=True, env={**os.environ, **python}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pid, first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert pid is None and first[0] == second[0] and second[1] == []


def test_a_large_frame_reaches_spark_as_a_file_whatever_its_name(session):
    """Beyond FRAME_ROWS_IN_MEMORY rows a frame goes to a local Spark as a Parquet file;
    a name starting with "_" (the project's own frames) must not make it a file Spark
    skips as hidden (a 20,000-customer demo's campaign failed so)."""
    from analysis.engine import SparkEngine

    spark = SparkEngine(session)
    n = SparkEngine.FRAME_ROWS_IN_MEMORY + 1
    frame = pd.DataFrame({"customer_id": [f"C{i:07d}" for i in range(n)],
                          "day": pd.Timestamp("2024-03-01")})
    spark.register("_campaign_rows", frame)
    try:
        assert spark.rows("SELECT COUNT(*), MIN(customer_id), MAX(day) FROM _campaign_rows") \
            == [(n, "C0000000", pd.Timestamp("2024-03-01").to_pydatetime())]
        assert list(spark.scratch.glob("frame-campaign_rows-*.parquet"))
    finally:
        spark.unregister("_campaign_rows")


def test_nanosecond_timestamps_keep_their_day_and_microsecond_on_spark(session, tmp_path):
    """pandas writes nanoseconds, which Spark does not read: the engine reads them as
    counts and converts with integer division, so that no time near midnight moves to
    another day (a double would round today's nanosecond counts)."""
    times = pd.to_datetime(["2024-03-01 23:59:59.999999", "2024-03-02 00:00:00.000001",
                            "1969-12-31 23:59:59.999999", "2025-07-01 12:00:00.000000"])
    pd.DataFrame({"t": times, "n": range(4)}).to_parquet(tmp_path / "t.parquet")
    from analysis.engine import SparkEngine

    spark = SparkEngine(session)
    spark.read_parquet("nanos", tmp_path / "t.parquet")
    got = spark.frame("SELECT n, CAST(t AS DATE) AS day, t FROM nanos ORDER BY n")
    expected = duckdb.sql(f"SELECT n, CAST(t AS DATE) AS day, t FROM "
                          f"read_parquet('{tmp_path / 't.parquet'}') ORDER BY n").df()
    assert got["day"].tolist() == expected["day"].tolist()
    assert [str(v) for v in got["t"]] == [str(v) for v in times]


def test_the_boosters_trained_by_xgboost_spark_are_those_trained_here(session):
    """``analysis.engine: spark`` trains XGBoost with its own Spark estimators: with the
    same parameters, one worker on a local master, the trees are the ones
    :func:`xgboost.train` grows here, categories (one missing) and a feature name
    XGBoost refuses included."""
    import numpy as np

    from analysis.models import ChurnModel, ValueModel

    rng = np.random.default_rng(0)
    n = 12_000      # (more rows than one Arrow batch: a batch without validation rows)
    X = pd.DataFrame({"recency": rng.normal(size=n), "spend [eur]": rng.gamma(2.0, size=n),
                      "channel": pd.Categorical(rng.choice(["web", "store", None], n))})
    churned = (X["recency"] + (X["channel"] == "web") + rng.normal(size=n) > 0.5).astype(int)
    spend = X["spend [eur]"].to_numpy() * (rng.random(n) < 0.6)
    fit, stop = slice(0, 10_500), slice(10_500, n)
    for model, y in ((ChurnModel, churned.to_numpy()), (ValueModel, spend)):
        here = model(seed=3).fit(X.iloc[fit], y[fit], X.iloc[stop], y[stop])
        there = model(seed=3, spark=session).fit(X.iloc[fit], y[fit], X.iloc[stop], y[stop])
        assert (here.trained_with_, there.trained_with_) == ("xgboost", "xgboost.spark (1 worker)")
        assert there.best_iteration_ == here.best_iteration_ > 5
        np.testing.assert_allclose(there._margin(X), here._margin(X), rtol=1e-6, atol=1e-6)


def test_the_boosters_train_on_spark_whatever_the_size_of_arrows_batches(session):
    """xgboost.spark fails on an Arrow batch without training or without validation rows;
    the rows reach it validation rows last, and a batch ends at 64 MB by default (the
    million-customer benchmark's training failed so): while it fits, a partition is one
    batch, whatever its size, and the session's settings are put back after."""
    import numpy as np

    from analysis.models import ChurnModel

    rng = np.random.default_rng(0)
    n = 60_000
    X = pd.DataFrame({"recency": rng.normal(size=n), "spend": rng.gamma(2.0, size=n)})
    y = (X["recency"] + rng.normal(size=n) > 0.5).astype(int).to_numpy()
    key = "spark.sql.execution.arrow.maxBytesPerBatch"
    before = session.conf.get(key)
    session.conf.set(key, "200000")          # (batches of about 200 kB, as 64 MB at scale)
    try:
        there = ChurnModel(seed=3, spark=session).fit(X.iloc[:30_000], y[:30_000],
                                                      X.iloc[30_000:], y[30_000:])
        assert session.conf.get(key) == "200000"
    finally:
        session.conf.set(key, before)
    here = ChurnModel(seed=3).fit(X.iloc[:30_000], y[:30_000], X.iloc[30_000:], y[30_000:])
    assert there.best_iteration_ == here.best_iteration_
    np.testing.assert_allclose(there._margin(X), here._margin(X), rtol=1e-6, atol=1e-6)


def test_the_executors_score_and_explain_each_customer_as_the_driver_does(session, tmp_path):
    """:func:`score_on_spark` runs :func:`score_customers` on each partition, the models
    shipped as their JSON: every customer comes back once, in the frame's order, with
    the driver's probability, value and reasons, for each churn method; value reasons
    only where the value model scores."""
    import numpy as np

    from analysis.models import (ChurnModel, LogisticChurn, ModelRun, ValueModel,
                                 score_customers, score_on_spark)

    rng = np.random.default_rng(1)
    n = 15_000      # more than SparkEngine.FRAME_ROWS_IN_MEMORY: reaches Spark as a file
    features = pd.DataFrame({
        "customer_id": [f"C{i:05d}" for i in rng.permutation(n)],
        "recency_days": rng.integers(0, 400, n), "frequency": rng.integers(1, 30, n),
        "monetary_total": rng.gamma(2.0, 50.0, n),
        "top_channel": rng.choice(["web", "store", None], n)})
    churned = (features["recency_days"] / 200 - features["frequency"] / 15
               + rng.normal(size=n) > 0).astype(int).to_numpy()
    spend = features["monetary_total"].to_numpy() * (1 - churned)
    columns = ["recency_days", "frequency", "monetary_total", "top_channel"]
    from analysis.models import categories_of, prepare_matrix

    X = prepare_matrix(features, columns, categories_of(features, columns))
    fit, stop = slice(0, 12_000), slice(12_000, n)
    churn = ChurnModel(seed=2, n_estimators=60).fit(X.iloc[fit], churned[fit],
                                                    X.iloc[stop], churned[stop])
    value = ValueModel(seed=2, n_estimators=60).fit(X.iloc[fit], spend[fit],
                                                    X.iloc[stop], spend[stop])
    logistic = LogisticChurn().fit(X.iloc[fit], churned[fit])
    for churn_chosen, value_chosen in (("model", "model"), ("blend", "rfm"),
                                       ("logistic", "model")):
        run = ModelRun(horizon_days=90, cutoffs={}, churn=churn, value=value, clv_params={},
                       sizes={}, logistic=logistic, churn_chosen=churn_chosen,
                       value_chosen=value_chosen)
        here = score_customers(run, features)
        there = score_on_spark(run, features, session)
        assert there["customer_id"].tolist() == features["customer_id"].tolist()
        np.testing.assert_allclose(there["churn_probability"], here["churn_probability"],
                                   rtol=1e-12)
        np.testing.assert_allclose(there["value_model"], here["value_model"], rtol=1e-12)
        assert there["churn_reasons"].tolist() == here["churn_reasons"].tolist()
        assert there["churn_reasons"].str.len().gt(0).mean() > 0.5
        if value_chosen == "model":
            assert there["value_reasons"].tolist() == here["value_reasons"].tolist()
            assert there["value_reasons"].notna().all()
        else:
            assert there["value_reasons"].isna().all()
    # without reasons, the scores alone
    bare = score_on_spark(run, features, session, reasons=False)
    assert bare[["churn_reasons", "value_reasons"]].isna().all().all()
    np.testing.assert_allclose(bare["churn_probability"], here["churn_probability"],
                               rtol=1e-12)
    # a table the executors read where it lies, returned in the order asked for
    features.to_parquet(tmp_path / "features.parquet")
    lying = score_on_spark(run, session.read.parquet(str(tmp_path / "features.parquet")),
                           session, ids=features["customer_id"])
    assert lying["customer_id"].tolist() == features["customer_id"].tolist()
    np.testing.assert_allclose(lying["churn_probability"], here["churn_probability"],
                               rtol=1e-12)
    assert lying["churn_reasons"].tolist() == here["churn_reasons"].tolist()
    with pytest.raises(RuntimeError, match="every customer once"):
        score_on_spark(run, session.read.parquet(str(tmp_path / "features.parquet")),
                       session, reasons=False, ids=features["customer_id"].iloc[1:])


def test_the_executors_write_the_feature_table_duckdb_builds(session, small_demo, tmp_path):
    """:func:`features.write_features` on Spark: the executors build and write the
    table (the driver never collects it), one file on a local master, rows in id
    order, typed as DuckDB's table is; with the customers and interactions tables."""
    spark, duck = F.connect_spark(small_demo, session=session), F.connect(small_demo)
    cutoff = F.data_end(duck) - dt.timedelta(days=120)
    n = {name: F.write_features(con, tmp_path / f"{name}.parquet", cutoff=cutoff,
                                horizon_days=90, exclude_attributes=("gender",))
         for name, con in (("duck", duck), ("spark", spark))}
    assert (tmp_path / "spark.parquet").is_file()        # and no folder left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duck.parquet", "spark.parquet"]
    written = {name: pd.read_parquet(tmp_path / f"{name}.parquet") for name in n}
    assert n["spark"] == n["duck"] == len(written["duck"]) > 1_000
    assert "gender" not in written["spark"] and "days_since_signup" in written["spark"]
    assert written["spark"]["customer_id"].is_monotonic_increasing
    _same(written["duck"], written["spark"])
    # and the table build_features gives on the driver
    _same(F.build_features(duck, cutoff=cutoff, horizon_days=90,
                           exclude_attributes=("gender",)), written["spark"])
    # to a URL (a cluster's way, e.g. dbfs:/ or s3://): a folder of part files, the rows
    # in id order across them
    folder = tmp_path / "on-a-cluster"
    assert F.write_features(spark, f"file://{folder}", cutoff=cutoff, horizon_days=90,
                            exclude_attributes=("gender",)) == n["duck"]
    assert len(list(folder.glob("part-*.parquet"))) > 1
    _same(written["duck"], pd.read_parquet(folder))


# --------------------------------------------------------------------------- loading


def _quality_on_both(folder: Path, tables: dict, **extra) -> dict[str, object]:
    """The data-quality step of a config over ``tables`` run with ``engine: duckdb``
    and with ``engine: spark``: per engine, its stop (rule and message) or its folder."""
    from analysis import data as D
    from analysis.config import load_config
    from analysis.errors import DataContractError
    from .conftest import write_config

    outcome: dict[str, object] = {}
    for engine in ("duckdb", "spark"):
        config = load_config(write_config(folder, tables, **extra,
                                          analysis={"engine": engine}))
        try:
            D.quality_step(config, folder / engine)
            outcome[engine] = folder / engine
        except DataContractError as exc:
            outcome[engine] = (exc.rule, str(exc))
    return outcome


def _same_outputs(duck: Path, spark: Path) -> None:
    """The same cleaned rows (values and order, the same Parquet types but for times in
    microseconds and text as strings, not large ones: Spark's files carry no pandas
    types, e.g. for flags with gaps), the same quarantine files to the byte and the
    same summary."""
    import pyarrow.parquet as pq

    def values(path: Path) -> pd.DataFrame:
        frame = pd.read_parquet(path)
        return frame.astype(object).where(frame.notna(), None)

    for path in sorted((duck / "clean").glob("*.parquet")):
        kinds = [[str(f.type).replace("[ns]", "[us]").replace("large_", "")
                  for f in pq.read_schema(p)] for p in (path, spark / "clean" / path.name)]
        assert kinds[0] == kinds[1], path.stem
        pd.testing.assert_frame_equal(values(spark / "clean" / path.name), values(path))
        assert (spark / "quarantine" / f"{path.stem}.csv").read_bytes() == \
            (duck / "quarantine" / f"{path.stem}.csv").read_bytes(), path.stem
    summaries = [json.loads((d / "data_quality.json").read_text()) for d in (duck, spark)]
    for summary in summaries:
        for table in summary["tables"]:
            table.pop("file")
    assert summaries[0] == summaries[1]


def test_every_bad_input_is_loaded_on_spark_as_on_the_driver(session, tmp_path):
    """The bad-input suite (but its 1M-row file) through the data step on Spark's
    executors: the same stops with the same messages, or the same cleaned rows,
    quarantine files and summary."""
    from .test_bad_inputs import CASES

    cases = [c for c in CASES if "1M" not in c.name]
    outcomes = set()
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "tx.csv").write_bytes(case.content)
        both = _quality_on_both(folder, {"transactions": {"path": "tx.csv",
                                                          **case.options}})
        if case.exit:
            assert both["spark"] == both["duckdb"], case.name
            assert str(folder / "tx.csv") in both["spark"][1]
        else:
            _same_outputs(both["duckdb"], both["spark"])
        outcomes.add(case.exit)
    assert outcomes == {0, 3}


def test_a_dataset_of_every_table_is_loaded_on_spark_as_on_the_driver(session, tmp_path,
                                                                      monkeypatch):
    """Every kind of table and value the load judges, on Spark: an order log in Parquet
    (times in nanoseconds, ids as floats, columns the contract does not read that make
    two lines differ, copies, rule breaks), customers with a PII column and an id seen
    twice, interactions of unknown types, a campaign, ids pseudonymized."""
    lines = pd.DataFrame({
        "order_id": ["1", "2", "2", "3", "4", "5", "6", "7", "7"],
        "customer_id": [17.0, 18.0, 18.0, 17.0, None, 19.0, 18.0, 17.0, 17.0],
        "order_date": pd.to_datetime(["2024-01-05 10:30", "2024-02-01 00:00", "2024-02-01 00:00",
                                      "2031-01-01 00:00", "2024-03-01 00:00", "2024-03-02 00:00",
                                      "1960-01-01 00:00", "2024-04-01 00:00", "2024-04-01 00:00"]),
        "amount": [10.0, 5.5, 5.5, 3.0, 4.0, float("inf"), 2.0, 8.0, 8.0],
        "sku": ["a", "b", "c", "d", "e", "f", "g", "h", "h"],
    })
    lines.to_parquet(tmp_path / "tx.parquet")
    (tmp_path / "c.csv").write_text("customer_id,signup_date,region,email\n"
                                    "17,2023-05-01,North,a@x.org\n17,2023-06-01,South,"
                                    '"=cmd|x,y"\n18,2023-07-01,,c@x.org\n19,not a date,E,\n')
    (tmp_path / "i.csv").write_text("customer_id,date,type,score,resolved\n"
                                    "17,2024-01-02,Complaint,,no\n18,2024-01-03,NPS,4,\n"
                                    "18,2024-01-04,,3,\n19,2024-01-05,chat,2,yes\n"
                                    "19,2024-01-06,chat,1,yes\n")
    (tmp_path / "m.csv").write_text("customer_id,campaign_date,treated\n17,2024-01-01,yes\n"
                                    "18,2024-01-01,control\n19,2024-01-01,maybe\n")
    monkeypatch.setenv("CSL_PSEUDONYM_KEY", "k1")
    both = _quality_on_both(tmp_path, {"transactions": "tx.parquet", "customers": "c.csv",
                                       "interactions": "i.csv", "campaign": "m.csv"},
                            pii=["email"],
                            output={"processed_dir": "p", "reports_dir": "r",
                                    "pseudonymize_ids": True})
    _same_outputs(both["duckdb"], both["spark"])
    quality = json.loads((both["spark"] / "data_quality.json").read_text())
    rules = {(q["table"], q["rule"]): q["rows"] for q in quality["quarantine"]}
    assert rules == {("transactions", "duplicate_row"): 1,
                     ("transactions", "date_in_future"): 1,
                     ("transactions", "missing_customer_id"): 1,
                     ("transactions", "non_finite_amount"): 1,
                     ("transactions", "date_too_old"): 1,
                     ("customers", "duplicate_customer"): 1,
                     ("customers", "unparseable_date"): 1,
                     ("interactions", "missing_type"): 1,
                     ("campaign", "unparseable_treated"): 1}
    clean = pd.read_parquet(both["spark"] / "clean" / "transactions.parquet")
    assert clean["order_id"].tolist() == ["1", "2", "2", "7"]     # "2": two products
    assert clean["customer_id"].str.match(r"^P[0-9a-f]{16}$").all()


def test_on_spark_a_column_stops_the_load_as_the_file_read_so_far_says(session, tmp_path):
    """The stop for a column that mostly does not parse is judged chunk by chunk in file
    order, as on the driver: a good file with a bad last chunk loads; a file bad from the
    start stops at its first chunk, with its examples; undecodable text beyond the rows
    read first stops, naming its row."""
    from analysis.config import load_config
    from analysis.data import load_table, load_table_on_spark
    from analysis.engine import SparkEngine
    from analysis.errors import DataContractError
    from .conftest import write_config

    engine = SparkEngine(session)
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    spec, today = cfg.tables["transactions"], dt.date(2026, 1, 15)
    good = "".join(f"a,2024-01-{d:02d},5\n" for d in range(1, 11))
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n" + good
                                     + "a,2024-13-01,abc\n")
    table = load_table_on_spark(spec, table="transactions", config=cfg, engine=engine,
                                today=today, chunk_rows=2)
    assert table.n_processed == 10 and table.quarantine["source_row"].tolist() == [11]
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n"
                                     + "a,01/02/2024,5\n" * 3 + good)
    stops = []
    for load in (load_table, load_table_on_spark):
        with pytest.raises(DataContractError, match="2 of 2 dates do not match") as err:
            load(spec, table="transactions", config=cfg, today=today, chunk_rows=2,
                 **({"engine": engine} if load is load_table_on_spark else {}))
        stops.append((err.value.rule, err.value.column, err.value.examples))
    assert stops[0] == stops[1] == ("date_format", "order_date", ["01/02/2024"] * 2)
    (tmp_path / "tx.csv").write_bytes(b"customer_id,order_date,amount\n"
                                      + good.encode() * 3000 + b"b\xe9,2024-01-01,5\n")
    with pytest.raises(DataContractError, match="row 30,001 holds bytes") as err:
        load_table_on_spark(spec, table="transactions", config=cfg, engine=engine,
                            today=today)
    assert err.value.rule == "encoding"
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n" + good * 3000
                                     + "b,2024-01-01,5,6\n")
    for load in (load_table, load_table_on_spark):      # a line of too many fields
        with pytest.raises(DataContractError, match="cannot be read as csv") as err:
            load(spec, table="transactions", config=cfg, today=today,
                 **({"engine": engine} if load is load_table_on_spark else {}))
        assert err.value.rule == "parse_file"
    assert "the header's 3 fields" in str(err.value)     # Spark's: the line, in words
    assert err.value.examples == ["b,2024-01-01,5,6"]


def test_a_table_of_the_spark_catalog_is_loaded_as_its_file_is(session, small_demo, tmp_path):
    """``tables: {transactions: {table: <name>}}``: a table or view of the Spark catalog
    (a Delta table on Databricks) is loaded and validated by the executors as the same
    rows in a Parquet file are on the driver; a missing table stops naming it; a table
    without the Spark engine is a config error naming the key."""
    from analysis import data as D
    from analysis.config import load_config
    from analysis.engine import SparkEngine
    from analysis.errors import ConfigError, DataContractError
    from .conftest import write_config

    lines = pd.read_parquet(small_demo / "transactions.parquet")
    lines = pd.concat([lines, lines.iloc[:3]], ignore_index=True)   # three copies
    lines.loc[5, "amount"] = float("inf")
    lines.to_parquet(tmp_path / "tx.parquet")
    spark = SparkEngine(session)
    spark.read_parquet("_orders_file", tmp_path / "tx.parquet")
    session.table("_orders_file").coalesce(1).createOrReplaceTempView("shop_orders")
    customers = {"path": str(small_demo / "customers.parquet")}
    outputs = []
    for engine, source in (("duckdb", {"path": "tx.parquet"}),
                           ("spark", {"table": "shop_orders"})):
        config = load_config(write_config(tmp_path, {"transactions": source,
                                                     "customers": customers},
                                          analysis={"engine": engine}))
        D.quality_step(config, tmp_path / engine)
        outputs.append(tmp_path / engine)
    _same_outputs(*outputs)
    quality = json.loads((outputs[1] / "data_quality.json").read_text())
    assert quality["tables"][0]["file"] == "shop_orders"
    assert {q["rule"]: q["rows"] for q in quality["quarantine"]} == {
        "duplicate_row": 3, "non_finite_amount": 1}
    config = load_config(write_config(tmp_path, {"transactions": {"table": "no_such"}},
                                      analysis={"engine": "spark"}))
    with pytest.raises(DataContractError, match="no_such: no table or view") as err:
        D.quality_step(config, tmp_path / "none")
    assert err.value.rule == "table_exists"
    with pytest.raises(ConfigError, match="needs 'analysis: {engine: spark}'") as err:
        load_config(write_config(tmp_path, {"transactions": {"table": "shop_orders"}}))
    assert err.value.key == "tables.transactions.table"


def test_running_sums_add_up_in_sorted_order_across_the_ranges(session):
    """SparkEngine.running_sums, which the profile's ranks, value tiers and sample draw
    stand on: over a table sorted into several ranges, each row's running total is that
    of a cumulative sum over the sorted table (whole numbers exactly, doubles to their
    last bits), ties broken by the rest of the order."""
    import numpy as np
    from pyspark.sql import functions as fn

    from analysis.engine import SparkEngine

    rng = np.random.default_rng(7)
    rows = pd.DataFrame({"id": [f"c{i:05d}" for i in range(5_000)],
                         "key": rng.integers(0, 40, 5_000).astype(float),
                         "amount": rng.gamma(2.0, 50.0, 5_000)})
    engine = SparkEngine(session)
    with _ranges(session, 5):
        df = session.createDataFrame(rows).repartition(7)
        assert df.orderBy("key").rdd.getNumPartitions() == 5
        out = engine.collect(engine.running_sums(
            df, [fn.col("key").desc(), fn.col("id")],
            {"place": fn.lit(1), "spent": fn.col("amount")}))
    expected = rows.sort_values(["key", "id"], ascending=[False, True], ignore_index=True)
    out = out.set_index("id").loc[expected["id"]]
    assert out["place"].tolist() == list(range(1, 5_001))
    np.testing.assert_allclose(out["spent"], expected["amount"].cumsum(), rtol=1e-12)


def test_the_executors_profile_the_customers_as_the_driver_does(session, tmp_path):
    """The profile step on Spark (segments.profile_customers with a Spark engine): the
    executors build, segment and write the customer table, and the driver gets the
    summaries. On CDNOW, the same table as on DuckDB (RFM scores and segments, value
    ranks and tiers, lifecycle stages, clusters: exactly; floats to 1e-9) and the same
    segments, tiers, lifecycle, clusters, cohorts and Pareto curve."""
    from analysis import data as D
    from analysis import segments as S
    from analysis.config import load_config

    require_cdnow()
    config = load_config(ROOT / "configs" / "cdnow.yaml")
    D.quality_step(config, tmp_path)
    duck = F.connect(tmp_path / "clean")
    spark = F.connect_spark(tmp_path / "clean", session=session)
    as_of = dt.date(1998, 1, 1)
    kwargs = {"as_of": as_of, "params": config.analysis, "seed": 5, "horizon_days": 120}
    here = S.profile_customers(duck, **kwargs)
    with _ranges(session, 3):        # (a sort in several ranges, as on a cluster)
        there = S.profile_customers(spark, table=tmp_path / "customers.parquet", **kwargs)
    assert there.customers is None and there.n_customers == len(here.customers) == 23_570
    _same(here.customers, pd.read_parquet(tmp_path / "customers.parquet"))
    for name in ("segments", "tiers", "lifecycle", "clusters", "cohorts", "pareto"):
        _same(getattr(here, name), getattr(there, name))
    assert here.customers["segment"].nunique() == len(there.segments) >= 8


@contextlib.contextmanager
def _ranges(session, n: int):
    """Sorts and shuffles into ``n`` partitions while the block runs, as on a cluster
    (Spark would merge a small table's into one)."""
    keys = {"spark.sql.adaptive.coalescePartitions.enabled": "false",
            "spark.sql.shuffle.partitions": str(n)}
    before = {k: session.conf.get(k, None) for k in keys}
    for k, v in keys.items():
        session.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                session.conf.unset(k)
            else:
                session.conf.set(k, v)


def test_on_databricks_a_path_under_dbfs_is_the_same_folder_for_spark(session):
    """pandas and the driver name a DBFS file /dbfs/x, Spark dbfs:/x: where Spark's
    default filesystem is DBFS, the engine gives Spark the second name, so that a run
    folder under /dbfs/ is one folder for both; elsewhere paths are left as they are."""
    from analysis.engine import SparkEngine

    engine = SparkEngine(session)
    conf = session.sparkContext._jsc.hadoopConfiguration()
    before = conf.get("fs.defaultFS")
    assert engine.spark_path("/dbfs/mnt/runs/r1/clean") == "/dbfs/mnt/runs/r1/clean"
    conf.set("fs.defaultFS", "dbfs:///")
    try:
        assert engine.spark_path("/dbfs/mnt/runs/r1/clean") == "dbfs:/mnt/runs/r1/clean"
        assert engine.spark_path(Path("/dbfs/mnt/x.parquet")) == "dbfs:/mnt/x.parquet"
        assert engine.spark_path("/data/runs/x.parquet") == "/data/runs/x.parquet"
        assert engine.spark_path("s3://bucket/x") == "s3://bucket/x"
    finally:
        conf.set("fs.defaultFS", before)


def test_a_log_without_categories_is_profiled_on_spark_as_on_the_driver(session, tmp_path):
    """A small order log (all customers in K-means' sample) whose category is always
    missing and which has no channel or margin: the same summaries on both engines (the
    segments' main categories "" on both, where Spark had none), and the same table."""
    import numpy as np

    from analysis import segments as S
    from analysis.config import AnalysisParams

    rng = np.random.default_rng(1)
    n = 3_000
    tx = pd.DataFrame({
        "customer_id": [f"c{i % 600:04d}" for i in range(n)],
        "order_id": [f"o{i}" for i in range(n)],
        "order_date": pd.Timestamp("2025-01-01")
        + pd.to_timedelta(rng.integers(0, 360, n), unit="D"),
        "amount": rng.gamma(2.0, 30.0, n).round(2), "status": "completed",
        "category": pd.Series([None] * n, dtype=object)})
    params = AnalysisParams(min_customers=100)
    kwargs = {"as_of": dt.date(2026, 1, 1), "params": params, "seed": 1, "horizon_days": 60}
    here = S.profile_customers(F.connect({"transactions": tx}), **kwargs)
    there = S.profile_customers(F.connect_spark({"transactions": tx}, session=session),
                                table=tmp_path / "customers.parquet", **kwargs)
    assert (here.segments["top_categories"].dropna() == "").all()
    for name in ("segments", "tiers", "lifecycle", "clusters", "cohorts", "pareto"):
        _same(getattr(here, name), getattr(there, name))
    written = pd.read_parquet(tmp_path / "customers.parquet")
    # (a column with no value at all: objects in pandas, text in Spark's file)
    _same(here.customers.drop(columns="top_category"), written.drop(columns="top_category"))
    assert written["top_category"].isna().all() and here.customers["top_category"].isna().all()


def _cdnow_on_both(session, tmp_path: Path):
    """CDNOW loaded and cleaned into ``tmp_path``, its views on DuckDB and on Spark:
    (the config, DuckDB's connection, the Spark engine)."""
    from analysis import data as D
    from analysis.config import load_config
    from analysis.engine import SparkEngine

    require_cdnow()
    config = load_config(ROOT / "configs" / "cdnow.yaml")
    D.quality_step(config, tmp_path)
    duck = F.connect(tmp_path / "clean")
    F.connect_spark(tmp_path / "clean", session=session)
    return config, duck, SparkEngine(session)


def test_the_executors_write_the_scores_table_the_driver_computes(session, tmp_path):
    """The models step on Spark with the profile step's table (models.scores_on_spark):
    the customers at the scoring date stay on the executors, which score them, value
    them by each value method, give them their lifetime outlook from BG/NBD + Gamma-Gamma
    fitted on the driver's customers (by place) and write the table; on CDNOW it is the
    table the driver computes for the same models (models._scores_here), reasons in
    words for everyone or for the customers asked for only. The executors' drift counts
    give the driver's PSI (models.drift_on_spark)."""
    import numpy as np

    from analysis import models as M
    from analysis.monitor import drift_bins, feature_drift

    config, duck, eng = _cdnow_on_both(session, tmp_path)
    as_of, horizon = dt.date(1998, 1, 1), 120
    features = F.build_features(duck, cutoff=as_of, horizon_days=horizon, labels=False)
    features.to_parquet(tmp_path / "features.parquet", index=False)
    table = session.read.parquet(str(tmp_path / "features.parquet"))
    # models of a made-up label (what is compared is how they score, not how well)
    rng = np.random.default_rng(4)
    columns = M.feature_columns(features)
    cats = M.categories_of(features, columns)
    X = M.prepare_matrix(features, columns, cats)
    churned = (features["recency_days"] / 90 - features["frequency"] / 4
               + rng.normal(size=len(features)) > 0).astype(int).to_numpy()
    spend = features["monetary_total"].to_numpy() * (1 - churned) / 4
    fit, stop = slice(0, 18_000), slice(18_000, None)
    churn = M.ChurnModel(seed=2, n_estimators=40).fit(X.iloc[fit], churned[fit],
                                                      X.iloc[stop], churned[stop])
    value = M.ValueModel(seed=2, n_estimators=40).fit(X.iloc[fit], spend[fit],
                                                      X.iloc[stop], spend[stop])
    logistic = M.LogisticChurn().fit(X.iloc[fit], churned[fit])
    rfm = M.RfmLookup.fit(features.assign(future_spend=spend), target="future_spend")
    asked = features["customer_id"].sample(500, random_state=1)
    for churn_chosen, value_chosen, explain in (
            ("model", "model", None), ("blend", "bgnbd_gg", asked),
            ("logistic", "rfm", None), ("model", "last_period", asked)):
        models = M.ModelRun(horizon_days=horizon, cutoffs={}, churn=churn, value=value,
                            clv_params={}, sizes={}, logistic=logistic,
                            churn_chosen=churn_chosen, value_chosen=value_chosen)
        scored = M.score_customers(models, features)
        reasons = [np.array(scored[c], dtype=object) for c in ("churn_reasons",
                                                                 "value_reasons")]
        if explain is not None:
            for r in reasons:
                r[~features["customer_id"].isin(explain).to_numpy()] = None
        here = M._scores_here(models, duck, features, as_of=as_of, horizon_days=horizon,
                              rfm=rfm, churn_probability=scored["churn_probability"],
                              model_value=scored["value_model"], reasons=tuple(reasons))
        out = tmp_path / f"scores-{value_chosen}.parquet"
        with _ranges(session, 3):
            written = M.scores_on_spark(models, eng, table, as_of=as_of,
                                        horizon_days=horizon, rfm=rfm, explain=explain,
                                        out=out)
        assert written == len(features) == 23_570
        _same(here, pd.read_parquet(out))
        assert here["expected_next_order"].notna().any() and here["predicted_clv"].gt(0).any()
        assert here["churn_reasons"].notna().sum() == (len(here) if explain is None else 500)
    # written as part files (as on a cluster), split into ranges of ids before the scoring
    M.scores_on_spark(models, eng, table, as_of=as_of, horizon_days=horizon, rfm=rfm,
                      explain=explain, out=f"file://{tmp_path}/parts")
    assert len(list((tmp_path / "parts").glob("part-*.parquet"))) > 1
    _same(here, pd.read_parquet(tmp_path / "parts"))
    # the drift's counts
    train_X = X.sample(5_000, random_state=3)
    bins = drift_bins(train_X, X)
    counted = M.drift_on_spark(eng, table, bins, columns=columns, categories=cats)
    _same(feature_drift(train_X, X), feature_drift(train_X, X, counts=counted))
    assert len(counted) >= 10


def test_bgnbd_on_spark_fits_and_scores_as_on_the_driver(session, tmp_path):
    """models.bgnbd_baseline on Spark keeps every customer's RFM summary on the
    executors: the driver receives the customers the fit uses (evenly spaced in id
    order, as its own) and those it scores, and gives the same fit and scores as on
    DuckDB; on CDNOW, fitted on 5,000 of 23,570 customers and scoring 3,000 (one
    unknown: no summary, no score)."""
    import numpy as np

    from analysis import data as D
    from analysis.config import load_config
    from analysis.models import bgnbd_baseline

    require_cdnow()
    D.quality_step(load_config(ROOT / "configs" / "cdnow.yaml"), tmp_path)
    duck = F.connect(tmp_path / "clean")
    spark = F.connect_spark(tmp_path / "clean", session=session)
    ids = pd.concat([pd.Series(["no such customer"]), duck.execute(
        "SELECT DISTINCT customer_id FROM lines").df()["customer_id"].sample(
        2_999, random_state=2)], ignore_index=True)
    kwargs = {"cutoff": dt.date(1997, 10, 1), "horizon_days": 90, "customers": ids,
              "max_customers": 5_000}
    here, here_params = bgnbd_baseline(duck, **kwargs)
    with _ranges(session, 3):
        there, there_params = bgnbd_baseline(spark, **kwargs)
    _same(here, there)
    assert there["expected_purchases"].isna().tolist() == [True] + [False] * 2_999
    for model in ("bgnbd", "gamma_gamma"):
        for name, value in here_params[model].items():
            assert np.isclose(there_params[model][name], value, rtol=1e-9), (model, name)


def test_the_executors_decide_as_the_driver_does(session, tmp_path):
    """The strategy step on Spark without campaign data (strategy.decide_on_spark): the
    customers stay on the executors, which decide them row by row and write the decision
    table; the driver gets the campaign's depth from the gains' running totals (ties by
    id), the sums, counts and alerts. On CDNOW's profile, with scores of every kind
    (unknown risks among them), protected attributes (a group too small to judge, missing
    values) and a previous run (rising risks), and the sort in 3 ranges as on a cluster:
    the same decisions, actions, retention summary, guardrails, alerts, fairness audit,
    campaign and profit curve (at the depths Spark keeps) as strategy.decide."""
    import numpy as np

    from analysis import segments as S
    from analysis import strategy as T
    from analysis.store import RunStore

    config, duck, eng = _cdnow_on_both(session, tmp_path)
    as_of, horizon = dt.date(1998, 1, 1), 120
    profile = S.profile_customers(duck, as_of=as_of, params=config.analysis, seed=5,
                                  horizon_days=horizon)
    rng = np.random.default_rng(3)
    c = profile.customers
    n = len(c)
    churn = pd.Series(rng.uniform(0, 1, n)).mask(rng.uniform(size=n) < 0.02)
    scores = pd.DataFrame({"customer_id": c["customer_id"], "churn_probability": churn,
                           "predicted_value": c["spend_365d"].clip(lower=0)
                           * rng.uniform(0.1, 3.0, n) + rng.uniform(0, 5, n)})
    runs = {}
    for name, shift in (("now", 0.0), ("before", 0.3)):
        store = RunStore(tmp_path / name)
        store.write_profile_table(c)
        store.write_scores(scores.assign(churn_probability=(
            scores["churn_probability"] - np.where(np.arange(n) % 3 == 0, shift, 0.0))
            .clip(0, 1)))
        runs[name] = store
    attributes = pd.DataFrame({
        "customer_id": c["customer_id"],
        "gender": pd.Series(rng.choice(["f", "m"], n)).mask(rng.uniform(size=n) < 0.05),
        "band": np.where(np.arange(n) < 10, "tiny", rng.choice(["a", "b", "c"], n))})
    attributes.to_parquet(tmp_path / "attributes.parquet", index=False)
    # (cheap orders lose money at this cost per order: a phase-out list to check)
    params = config.strategy.model_copy(update={"cost_per_order": 8.0})
    protected = ("gender", "band")
    store, previous = runs["now"], runs["before"]
    # (the driver's decide on Spark's SQL: a run whose models explained a sample decides
    # so on Spark)
    here = T.decide(eng, store.read_customers(T.DECISION_COLUMNS), as_of=as_of,
                    horizon_days=horizon, params=params, attributes=attributes,
                    protected=protected,
                    previous=previous.read_customers(["customer_id", "churn_probability"]))
    with _ranges(session, 3):
        there, ids = T.decide_on_spark(eng, store, as_of=as_of, horizon_days=horizon,
                                       params=params, attributes=tmp_path / "attributes.parquet",
                                       protected=protected, previous=previous)
    assert there.customers is None and there.alerts is None      # (written to the store)
    def texts(frame: pd.DataFrame) -> pd.DataFrame:
        # (texts as objects: pandas keeps some as its own strings, Spark's as objects)
        return frame.astype({k: object for k, kind in frame.dtypes.items()
                             if kind == object or isinstance(kind, pd.StringDtype)})

    _same(texts(here.customers), texts(pd.read_parquet(store.decisions_table)))
    for name in ("actions", "guardrails", "fairness"):
        _same(texts(getattr(here, name)), texts(getattr(there, name)))
    # the warnings the executors wrote: the driver's, in the rules' order, then by id
    _same(texts(here.alerts), texts(pd.read_parquet(store.alerts_table)))
    assert list(there.retention) == list(here.retention)
    for key, value in here.retention.items():
        assert (np.isclose(there.retention[key], value, rtol=1e-9)
                if isinstance(value, float) else there.retention[key] == value), key
    assert sorted(ids) == sorted(here.customers.loc[here.customers["in_campaign"],
                                                    "customer_id"])
    curve = here.profit_curve.set_index("depth")["cumulative_profit"]
    assert len(there.profit_curve) <= 2 * T.CURVE_POINTS + 1
    shown = there.profit_curve["depth"] <= 3 * here.retention["targeted_by_profit"]
    assert shown.sum() >= min(T.CURVE_POINTS, 3 * here.retention["targeted_by_profit"])
    assert there.profit_curve["depth"].iloc[[0, -1]].tolist() == [1, n]
    assert np.allclose(there.profit_curve["cumulative_profit"],
                       curve.loc[there.profit_curve["depth"]], rtol=1e-9)
    # what the comparison covers: a campaign, a phase-out list, every alert rule that
    # data can fire, a group too small to judge and missing values among the groups
    r = here.retention
    assert 0 < r["targeted_by_profit"] < r["eligible_customers"] < n
    assert r["targeted_by_profit"] in set(there.profit_curve["depth"])
    assert here.customers["phaseout_candidate"].sum() > 0
    assert {"overdue", "high churn risk", "churn risk rising"} <= set(here.alerts["rule"])
    assert {"missing", "tiny"} <= set(here.fairness["group"])
    assert (~here.fairness["judged"]).any() and here.fairness["judged"].any()
