"""Where the set-based SQL runs: DuckDB on one machine (the default), or Apache Spark,
where a customer's data outgrows one machine, from one definition of the queries.

The queries are written once, in DuckDB's dialect (:mod:`analysis.features`). An engine
runs them: :class:`DuckDBEngine` as they are, :class:`SparkEngine` after `sqlglot
<https://sqlglot.com>`_ has transpiled each statement to Spark SQL, with the rewrites
sqlglot leaves to its user (:func:`to_spark`). The one expression the two engines cannot
share is the hash that samples customers (:meth:`DuckDBEngine.hash_bucket`): each
engine's own hash, so a sampled snapshot keeps a different (equally random) share of
the customers on each engine; every unsampled snapshot is the same table.

The callers need only this: materialise a query as a named table (:meth:`table`),
name a query (:meth:`view`), drop either (:meth:`drop`), read rows (:meth:`rows`) or a
frame (:meth:`frame`), list the views and a table's columns, and hand a small frame
to the engine (:meth:`register`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from analysis.errors import ConfigError

__all__ = ["DuckDBEngine", "SparkEngine", "as_engine", "require_spark",
           "shared_spark_driver", "spark_session", "to_spark"]


class DuckDBEngine:
    """The project's SQL on a DuckDB connection (what :func:`analysis.features.connect`
    returns), as it is written."""

    name = "duckdb"
    #: a large log is taken in ranges of customers, one after the other, to bound memory
    splits_work = True

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._kinds: dict[str, str] = {}

    def table(self, name: str, query: str) -> None:
        """Materialise ``query`` as the temporary table ``name`` (replacing it)."""
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {query}")
        self._kinds[name] = "TABLE"

    def view(self, name: str, query: str) -> None:
        """Name ``query`` ``name`` (a temporary view, replacing it)."""
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {query}")
        self._kinds[name] = "VIEW"

    def drop(self, *names: str) -> None:
        """Drop the tables and views ``names`` made by :meth:`table` or :meth:`view`
        (a name never made, or dropped already, is ignored)."""
        for name in names:
            kind = self._kinds.pop(name, None)
            if kind is not None:
                self.con.execute(f"DROP {kind} IF EXISTS {name}")

    def rows(self, query: str) -> list[tuple]:
        return self.con.execute(query).fetchall()

    def frame(self, query: str) -> pd.DataFrame:
        """The rows of ``query`` as pandas, typed as DuckDB's ``.df()`` types them,
        through Arrow: 0.2-0.5 s for a range of 200,000 customers' features against
        0.5-0.95 s for ``.df()``."""
        return _pandas_of(self.con.sql(query).to_arrow_table())

    def views(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT view_name FROM duckdb_views()")}

    def has(self, name: str) -> bool:
        """Whether the table or view ``name`` exists."""
        return bool(self.rows("SELECT COUNT(*) FROM duckdb_views() WHERE view_name = "
                              f"'{name}'")[0][0] or self.rows(
            f"SELECT COUNT(*) FROM duckdb_tables() WHERE table_name = '{name}'")[0][0])

    def columns(self, table: str) -> list[str]:
        return [r[0] for r in self.rows(f"DESCRIBE {table}")]

    def register(self, name: str, frame: pd.DataFrame) -> None:
        self.con.register(name, frame)

    def unregister(self, name: str) -> None:
        self.con.unregister(name)

    def hash_bucket(self, expr: str) -> str:
        """SQL for a number in [0, 1,000,000) from a hash of the text ``expr``."""
        return f"hash({expr}) % 1000000"

    @contextlib.contextmanager
    def unordered(self) -> Iterator[None]:
        """Within the block, DuckDB need not keep the working tables' row order (which
        the callers never read: their frames are read with an ORDER BY); the
        connection's setting is put back after."""
        keep = self.rows("SELECT current_setting('preserve_insertion_order')")[0][0]
        self.con.execute("SET preserve_insertion_order = false")
        try:
            yield
        finally:
            self.con.execute(f"SET preserve_insertion_order = {'true' if keep else 'false'}")


class SparkEngine:
    """The project's SQL on a Spark session, each statement transpiled by
    :func:`to_spark`. Tables are cached DataFrames under a temporary view's name
    (materialised when made, so that each query runs once, as in DuckDB); frames
    come back through Arrow."""

    name = "spark"
    #: Spark partitions the work itself (and spills); one pass takes every customer
    splits_work = False

    #: on a local master, frames of more rows than this go to Spark as Parquet files (in
    #: :attr:`scratch`), not through the driver's memory (a cluster's executors could
    #: not read the driver's files: there, every frame goes through the driver)
    FRAME_ROWS_IN_MEMORY = 10_000

    def __init__(self, session: Any) -> None:
        self.session = session
        self._cached: dict[str, Any] = {}
        self._scratch: Path | None = None
        # the data's times carry no zone: read and cut into days as DuckDB does (a
        # session of a cluster, e.g. Databricks', may have another zone)
        session.conf.set("spark.sql.session.timeZone", "UTC")

    def sql(self, query: str) -> Any:
        """The DataFrame of ``query`` (DuckDB's dialect)."""
        return self.session.sql(to_spark(query))

    def table(self, name: str, query: str) -> None:
        from pyspark import StorageLevel

        self.drop(name)
        df = self.sql(query).persist(StorageLevel.MEMORY_AND_DISK)
        df.count()
        df.createOrReplaceTempView(name)
        self._cached[name] = df

    def view(self, name: str, query: str) -> None:
        self.drop(name)
        self.sql(query).createOrReplaceTempView(name)

    def drop(self, *names: str) -> None:
        for name in names:
            df = self._cached.pop(name, None)
            if df is not None:
                df.unpersist()
            self.session.catalog.dropTempView(name)

    def rows(self, query: str) -> list[tuple]:
        return [tuple(r) for r in self.sql(query).collect()]

    def frame(self, query: str) -> pd.DataFrame:
        return _frame_of(self.sql(query))

    def collect(self, df: Any) -> pd.DataFrame:
        """The Spark DataFrame ``df`` on the driver, through Arrow."""
        return _frame_of(df)

    def views(self) -> set[str]:
        return {t.name for t in self.session.catalog.listTables() if t.isTemporary}

    def writes_parts(self, path: str | Path) -> bool:
        """Whether :meth:`write_parquet` writes ``path`` as a folder of part files (on a
        cluster, or to a URL such as ``dbfs:/...`` or ``s3://...``)."""
        import re

        return (not self.session.sparkContext.master.startswith("local")
                or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", str(path)) is not None)

    def write_parquet(self, df: Any, path: str | Path, *, order_by: str,
                      drop_order: bool = False, ranged: bool = False) -> int:
        """``df`` written as Parquet by the executors, its rows in ``order_by``'s order
        (that column left out with ``drop_order``); returns its number of rows. On a
        local master, to a local path, one file ``path`` (written beside it, then moved
        into place); elsewhere (:meth:`writes_parts`) a folder ``path`` of part files,
        sorted across them, as a cluster writes (replacing what was there). ``ranged``:
        ``df``'s partitions are already ranges of ``order_by`` (``repartitionByRange``),
        which the part files then keep: Spark samples a table to split it into ranges,
        and a table that costs much to compute (scored customers) is better split before
        that work than after it, which would do the work twice."""
        import uuid

        if self.writes_parts(path):
            # (a file per range of ``order_by``: per core of the cluster, unless given)
            if not ranged:
                df = df.repartitionByRange(self.session.sparkContext.defaultParallelism,
                                           f"`{order_by}`")
            df = df.sortWithinPartitions(f"`{order_by}`")
            (df.drop(order_by) if drop_order else df).write.mode("overwrite").parquet(
                self.spark_path(path))
            return self.session.read.parquet(self.spark_path(path)).count()
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            df = df.repartition(1).sortWithinPartitions(f"`{order_by}`")
            (df.drop(order_by) if drop_order else df).write.parquet(str(folder))
            parts = sorted(folder.glob("part-*.parquet"))
            if len(parts) != 1:
                raise RuntimeError(f"Spark wrote {len(parts)} files for one partition "
                                   f"in {folder}")
            os.replace(parts[0], path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return pq.ParquetFile(path).metadata.num_rows

    def running_sums(self, df: Any, order: list[Any], sums: Mapping[str, Any]) -> Any:
        """``df`` with a running total of each of ``sums`` (name -> a column expression),
        taken in ``order`` (Spark columns, a total order, e.g. ending with an id): the
        total of the rows up to and including each row, as a cumulative sum over the
        sorted table gives it. Each sorted range is summed where it lies and shifted by
        the totals of the ranges before it (a handful of numbers on the driver), so no
        single task holds the table, as a window over all rows would; whole numbers are
        exact, and sums of doubles differ from a sequential sum only in their last bits
        (the ranges' totals are added in another order). Materialised
        (:meth:`materialise`): :meth:`release` it when done."""
        from pyspark.sql import Window
        from pyspark.sql import functions as fn

        values = {name: f"_value_{i}" for i, name in enumerate(sums)}
        # (materialised: each row's range is then fixed for the two reads below)
        parts = self.materialise(
            df.select("*", *[expr.alias(values[name]) for name, expr in sums.items()])
            .orderBy(*order).withColumn("_range", fn.spark_partition_id()))
        totals = self.collect(parts.groupBy("_range").agg(
            *[fn.sum(v).alias(v) for v in values.values()])).sort_values("_range")
        before = totals[["_range"]].astype("int64")
        for v in values.values():
            kind = "int64" if totals[v].dtype.kind in "iu" else "float64"
            before[f"_before{v}"] = (pd.Series(totals[v].to_numpy(), dtype=kind).cumsum()
                                     .shift(1, fill_value=0).astype(kind).to_numpy())
        window = (Window.partitionBy("_range").orderBy(*order)
                  .rowsBetween(Window.unboundedPreceding, Window.currentRow))
        try:
            return self.materialise(
                parts.join(fn.broadcast(self.session.createDataFrame(before)), on="_range")
                .select(*[fn.col(f"`{c}`") for c in df.columns],
                        *[(fn.col(f"_before{v}") + fn.sum(v).over(window)).alias(name)
                          for name, v in values.items()]))
        finally:
            self.release(parts)

    def rows_at(self, df: Any, order: str, positions: np.ndarray,
                columns: list[str] | None = None) -> pd.DataFrame:
        """The rows of ``df`` at ``positions`` (from 0) in ``order``'s order (a column
        with a value for every row, no two alike: an id), in the order of ``positions``,
        with ``columns`` (all by default): a sample the driver drew by place, as it would
        take it from a frame sorted by ``order`` with ``iloc``, fetched from a table
        that stays on the executors (only those rows come back)."""
        from pyspark.sql import functions as fn

        columns = list(df.columns) if columns is None else list(columns)
        # (only the ids are sorted and placed; the rows are then fetched by id)
        placed = self.running_sums(df.select(fn.col(f"`{order}`")), [fn.col(f"`{order}`")],
                                   {"_place": fn.lit(1)})
        try:
            wanted = self.session.createDataFrame(
                pd.DataFrame({"_place": np.asarray(positions, dtype="int64") + 1}),
                schema="_place long")
            ids = placed.join(fn.broadcast(wanted), on="_place")
            found = self.collect(df.select(*[fn.col(f"`{c}`") for c in
                                             dict.fromkeys([order, *columns])])
                                 .join(fn.broadcast(ids), on=order))
        finally:
            self.release(placed)
        return found.set_index("_place").loc[np.asarray(positions) + 1, columns].reset_index(
            drop=True)

    def materialise(self, df: Any) -> Any:
        """``df`` computed once and kept on the executors (memory, then disk), its plan
        cut there: a chain of steps that each read the table twice (a join of the table
        with its own aggregates) would otherwise grow a plan that doubles with each step
        (the profile's plan took the driver's 2 GB to print). A local checkpoint: an
        executor lost loses it, and the step stops. Free it with :meth:`release` when
        done (``unpersist`` does not)."""
        from pyspark import StorageLevel

        return df.localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)

    def release(self, *dfs: Any) -> None:
        """Free what :meth:`materialise` kept of each of ``dfs`` on the executors (a
        run's stages share one driver: what one stage leaves, the next must work
        around). A frame that is not such a checkpoint is left as it is."""
        from py4j.protocol import Py4JError

        for df in dfs:
            if df is None:
                continue
            try:
                plan = df._jdf.queryExecution().logical()
                if plan.getClass().getSimpleName() == "LogicalRDD":
                    plan.rdd().unpersist(False)
            except Py4JError:         # (Spark's internals moved: left to Spark's cleaner)
                pass

    def spark_path(self, path: str | Path) -> str:
        """How Spark names a path of this machine: as it is, but where Spark's default
        filesystem is Databricks' DBFS, a path under its mount ``/dbfs/`` (the name
        pandas and the driver use) is ``dbfs:/...`` (the name Spark uses for the same
        file): a run folder under ``/dbfs/`` is then one folder for both."""
        text = str(path)
        if not text.startswith("/dbfs/"):
            return text
        from py4j.protocol import Py4JError

        try:
            default = self.session.sparkContext._jsc.hadoopConfiguration().get(
                "fs.defaultFS") or ""
        except (AttributeError, NotImplementedError, Py4JError):   # (Spark Connect)
            return text
        return "dbfs:" + text[len("/dbfs"):] if default.startswith("dbfs:") else text

    def has(self, name: str) -> bool:
        """Whether the table or view ``name`` exists (one lookup, where listing every
        view of the catalog takes over a second)."""
        return self.session.catalog.tableExists(name)

    def columns(self, table: str) -> list[str]:
        return list(self.session.table(table).columns)

    def register(self, name: str, frame: pd.DataFrame) -> None:
        local = self.session.sparkContext.master.startswith("local")
        if len(frame) <= self.FRAME_ROWS_IN_MEMORY or not local:
            self.session.createDataFrame(_arrow_of(frame)).createOrReplaceTempView(name)
            return
        import uuid

        import pyarrow.parquet as pq

        # a new file each time: Spark may keep a listing of a path it has read (and
        # never a name starting with "_" or ".", which Spark skips as hidden: the
        # project's own frames are "_campaign_rows" and the like)
        path = self.scratch / f"frame-{name.lstrip('_.')}-{uuid.uuid4().hex[:8]}.parquet"
        pq.write_table(_arrow_of(frame), path)
        self.read_parquet(name, path)

    @property
    def scratch(self) -> Path:
        """A folder for the frames handed to Spark as files; removed when Python exits."""
        if self._scratch is None:
            import atexit
            import shutil
            import tempfile

            self._scratch = Path(tempfile.mkdtemp(prefix="csl-spark-"))
            atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch

    def unregister(self, name: str) -> None:
        self.session.catalog.dropTempView(name)

    def hash_bucket(self, expr: str) -> str:
        return f"pmod(xxhash64({expr}), 1000000)"

    @contextlib.contextmanager
    def unordered(self) -> Iterator[None]:
        yield

    def read_parquet(self, name: str, path: str | Path) -> None:
        """The Parquet file or folder ``path`` as the view ``name``.

        Spark reads no timestamps in nanoseconds (pandas' unit, in which the project's
        own tables are written): a local file's such columns are read as their count of
        nanoseconds and turned into timestamps of the same wall-clock time.
        """
        nanos = _nanosecond_columns(path)
        if nanos:
            self.session.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
        df = self.session.read.parquet(self.spark_path(path))
        if nanos:
            from pyspark.sql import functions as fn

            # (integer division: a double would round the nanoseconds of today's dates)
            df = df.withColumns({c: fn.expr(f"timestamp_micros(`{c}` DIV 1000)")
                                 for c in nanos})
        df.createOrReplaceTempView(name)


def as_engine(con: duckdb.DuckDBPyConnection | DuckDBEngine | SparkEngine
              ) -> DuckDBEngine | SparkEngine:
    """The engine behind ``con``: a DuckDB connection is wrapped, an engine kept."""
    if isinstance(con, DuckDBEngine | SparkEngine):
        return con
    return DuckDBEngine(con)


# --------------------------------------------------------------------------- Spark


#: Settings every session of the project gets, beneath the config's own: a driver of
#: 2 GB (in local mode it does the work too), dates and times as DuckDB reads them (no
#: time zone), Arrow between Spark and pandas, no web UI.
SPARK_DEFAULTS = {
    "spark.driver.memory": "2g",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
}


#: Set (to "1"), with pyspark's ``PYSPARK_GATEWAY_PORT`` and ``PYSPARK_GATEWAY_SECRET``,
#: in the environment of a run's kernels while they share one Spark driver
#: (:func:`shared_spark_driver`)
SHARED_DRIVER = "CSL_SHARED_SPARK_DRIVER"


def spark_session(master: str | None = None, conf: Mapping[str, object] | None = None,
                  app_name: str = "customer-strategy-lab") -> Any:
    """A Spark session for the project: the active one when there is one (a Databricks
    notebook's), else a new one on ``master`` (default: what ``spark-submit`` says, else
    ``local[*]``) with ``conf`` (beneath :data:`SPARK_DEFAULTS`). On a local master the
    shuffle partitions are twice the cores unless ``conf`` sets them.

    Raises
    ------
    ConfigError
        When pyspark or Java is missing (:func:`require_spark`; ``make spark`` installs
        both): the command line stops with exit 2, naming ``analysis.engine``.
    """
    import warnings

    # pyspark 4.3 warns that it does not yet fully support pandas 3; the frames this
    # project passes through Arrow are checked against DuckDB's (tests/test_spark.py)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas",
                            category=FutureWarning)
    require_spark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    conf = {k: str(v) for k, v in (conf or {}).items()}
    # on this machine, Spark's Python workers (xgboost.spark's training) run this
    # Python, with the project's packages (pyspark reads the variable, not a setting);
    # a cluster's workers have their own
    shared = os.environ.get(SHARED_DRIVER) == "1" and "PYSPARK_GATEWAY_PORT" in os.environ
    local = (master or "").startswith("local") or (
        master is None and "PYSPARK_GATEWAY_PORT" not in os.environ)   # (not spark-submit)
    if local and not shared and not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable
    if local:
        conf = {**_local_warehouse(conf), **conf}
    if shared:
        settings = {**SPARK_DEFAULTS, **conf, "spark.app.name": app_name}
        session = _shared_driver_session({**settings, "spark.master": master}
                                         if master else settings)
    else:
        builder = SparkSession.builder.appName(app_name)
        if master:
            builder = builder.master(master)
        for key, value in {**SPARK_DEFAULTS, **conf}.items():
            builder = builder.config(key, value)
        session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    running_on = session.sparkContext.master
    if running_on.startswith("local") and "spark.sql.shuffle.partitions" not in conf:
        # Spark's 200 shuffle partitions suit a cluster; on one machine each is a task
        # of its own (CDNOW's features command: 93 s with 200, 33 s with 4 on two cores)
        session.conf.set("spark.sql.shuffle.partitions", str(2 * _local_cores(running_on)))
    return session


@contextlib.contextmanager
def shared_spark_driver(master: str | None = None,
                        conf: Mapping[str, object] | None = None,
                        app_name: str = "customer-strategy-lab",
                        log: str | Path | None = None,
                        path: object = None) -> Iterator[int | None]:
    """One Spark driver (a Java process) for all the kernels this process starts while
    the block runs: a run's stages, each a notebook in a kernel of its own, then use it
    (:func:`spark_session`) rather than each starting and warming up a Java process of
    its own. The driver has ``master`` and ``conf`` (beneath :data:`SPARK_DEFAULTS`) and
    is stopped when the block ends; what it prints (Spark's and its Python workers'
    messages) goes to the file ``log``, if given. Yields the Java process's id (the run
    counts its memory with each stage's), or None where this process already has a
    driver (under ``spark-submit``, whose ``--master`` and ``--conf`` then hold): the
    stages share that one.

    Each stage gets a session of its own on the shared driver (its own views and
    settings, the caches of the stage before dropped), as it would in a Java process of
    its own.

    Raises
    ------
    ConfigError
        When the driver does not start (a setting Java refuses, such as a malformed
        ``spark.driver.memory``): naming the config ``path``, the ``spark`` section and
        the driver's last words.
    """
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        with _environment({SHARED_DRIVER: "1"}):
            yield None
        return
    require_spark()
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    conf = {k: str(v) for k, v in (conf or {}).items()}
    settings = {**SPARK_DEFAULTS, **(_local_warehouse(conf) if (master or "local")
                                     .startswith("local") else {}), **conf,
                "spark.app.name": app_name, "spark.master": master or "local[*]"}
    out = None if log is None else open(log, "ab")     # (the driver keeps its own handle)
    try:
        gateway = launch_gateway(SparkConf(loadDefaults=False).setAll(list(settings.items())),
                                 popen_kwargs=None if out is None
                                 else {"stdout": out, "stderr": out})
    except Exception as exc:
        said = Path(log).read_text(errors="replace").strip().splitlines()[-3:] if log else []
        raise ConfigError(f"the Spark driver did not start with these settings ({exc}"
                          + "".join(f"; {line}" for line in said) + ")",
                          path=path, key="spark") from None
    finally:
        if out is not None:
            out.close()
    shared = {"PYSPARK_GATEWAY_PORT": str(gateway.gateway_parameters.port),
              "PYSPARK_GATEWAY_SECRET": gateway.gateway_parameters.auth_token,
              SHARED_DRIVER: "1"}
    # the driver's context starts (with its settings, which spark-submit passed it) while
    # the first stages, which need no Spark, run; a stage's session waits for it
    threading.Thread(target=_start_context, args=(gateway,), daemon=True).start()
    try:
        with _environment(shared):
            yield gateway.proc.pid
    finally:
        with contextlib.suppress(Exception):
            gateway.shutdown()
        # the driver exits when its standard input closes (pyspark's gateway server)
        gateway.proc.stdin.close()
        try:
            gateway.proc.wait(timeout=60)
        except Exception:
            gateway.proc.kill()
            gateway.proc.wait()


def _local_warehouse(conf: Mapping[str, str]) -> dict[str, str]:
    """Spark's warehouse (where ``saveAsTable`` writes, and the folder Spark makes as soon
    as its catalog is listed) for a session on a local master: in the temporary
    directory, not a ``spark-warehouse`` folder in the working directory of every run,
    unless ``conf`` names one."""
    if "spark.sql.warehouse.dir" in conf:
        return {}
    return {"spark.sql.warehouse.dir": str(Path(tempfile.gettempdir())
                                           / "csl-spark-warehouse")}


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (which its kernels inherit) while the
    block runs; what was there before is put back."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_context(gateway: Any) -> None:
    with contextlib.suppress(Exception):       # (the first stage to use it says why not)
        gateway.jvm.org.apache.spark.SparkContext.getOrCreate()


def _shared_driver_session(settings: Mapping[str, str]) -> Any:
    """A new session on the run's shared Spark driver (:func:`shared_spark_driver`),
    whose variables name it: the driver's context (started, with ``settings`` over the
    driver's own, by the first stage that needs it), and a session of this stage's own,
    with the caches of earlier stages (whose kernels have ended) dropped."""
    from pyspark import SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    gateway = launch_gateway()          # (connects to the driver the variables name)
    jvm = gateway.jvm
    jconf = jvm.org.apache.spark.SparkConf()        # (the driver's, as spark-submit set it)
    other = {k: v for k, v in settings.items() if jconf.get(k, None) != v}
    for key, value in other.items():
        jconf.set(key, value)
    # (a context the driver already runs is used as it is; given settings, Spark would
    # warn that they may not take effect)
    jsc = jvm.org.apache.spark.api.java.JavaSparkContext.fromSparkContext(
        jvm.org.apache.spark.SparkContext.getOrCreate(jconf) if other
        else jvm.org.apache.spark.SparkContext.getOrCreate())
    # (on a local master the Python workers run this Python, as in spark_session; a
    # cluster's workers, under spark-submit, have their own)
    if jsc.master().startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable
    context = SparkContext(gateway=gateway, jsc=jsc)
    fresh = SparkSession._get_j_spark_session_class(jvm)(jsc.sc(), {})
    session = SparkSession(context, jsparkSession=fresh)
    session.catalog.clearCache()
    return session


def require_spark(path: object = None) -> None:
    """Stop with a :class:`ConfigError` naming ``analysis.engine`` (and the config
    ``path``) unless pyspark can be imported and a Java runtime found (``JAVA_HOME`` or
    ``java`` on the path): a run on Spark checks this before it writes anything."""
    hint = "run `make spark` (or `pip install 'customer-strategy-lab[spark]'` and Java 17+)"
    if importlib.util.find_spec("pyspark") is None:
        raise ConfigError(f"engine 'spark' needs pyspark, which is not installed: {hint}",
                          path=path, key="analysis.engine")
    home = os.environ.get("JAVA_HOME")
    if not (home and (Path(home) / "bin" / "java").exists()) and shutil.which("java") is None:
        raise ConfigError(f"engine 'spark' needs a Java runtime, and none was found "
                          f"(no JAVA_HOME, no java on the path): {hint}",
                          path=path, key="analysis.engine")


def _local_cores(master: str) -> int:
    """The cores of a ``local``, ``local[N]`` or ``local[*]`` master."""
    import re

    m = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\s*\d+)?\])?", master.strip())
    if m is not None and m.group(1) is None:
        return 1
    if m is None or m.group(1) == "*":
        return len(os.sched_getaffinity(0))
    return int(m.group(1))


@functools.lru_cache(maxsize=512)
def to_spark(query: str) -> str:
    """``query``, in DuckDB's dialect, as Spark SQL.

    sqlglot translates the dialect (``DATE_DIFF``, ``FILTER``, types, ...); the
    constructs it passes through as they are, which Spark does not read, are rewritten
    here with the same meaning:

    - an ordered ``FIRST(x ORDER BY k1 [DESC], k2 ...)``: the ``x`` of the first row in
      that order, ``MIN_BY(x, STRUCT(...))`` over the sort keys, each with its nulls
      last as in DuckDB (a descending key must be a number: it is negated);
    - ``SEMI JOIN``: Spark's ``LEFT SEMI JOIN``;
    - an unnamed ``ROW(a, b)`` (a sort key of several columns): ``STRUCT(a, b)``;
    - ``QUANTILE_CONT(x, q)``: Spark's exact ``PERCENTILE(x, q)`` (both interpolate
      between the two nearest values);
    - ``AVG(x)``: ``AVG(CAST(x AS DOUBLE))``; DuckDB's average is a double whatever
      ``x`` is, Spark's average of a decimal (``AVG(CASE ... THEN 1.0 ...)``) a decimal
      rounded to a few places;
    - ``isinf(x)``: ``(ABS(x) = CAST('Infinity' AS DOUBLE))``;
    - ``WITH x AS [NOT] MATERIALIZED (...)``, a hint to DuckDB's planner: a plain
      ``WITH x AS (...)`` (Spark decides itself what to compute once).
    """
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(query, read="duckdb")

    def rewrite(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.First) and isinstance(node.this, exp.Order):
            keys: list[exp.Expression] = []
            for ordered in node.this.expressions:
                key = ordered.this
                keys.append(exp.Is(this=key.copy(), expression=exp.Null()))
                keys.append(exp.Neg(this=exp.Paren(this=key.copy())) if ordered.args.get("desc")
                            else key.copy())
            return exp.Anonymous(this="MIN_BY", expressions=[
                node.this.this.copy(), exp.Anonymous(this="STRUCT", expressions=keys)])
        if isinstance(node, exp.PercentileCont) and node.expression is not None:
            return exp.Anonymous(this="PERCENTILE", expressions=[node.this.copy(),
                                                                 node.expression.copy()])
        if isinstance(node, exp.IsInf):
            return exp.Paren(this=exp.EQ(
                this=exp.Abs(this=node.this.copy()),
                expression=exp.Cast(this=exp.Literal.string("Infinity"),
                                    to=exp.DataType.build("DOUBLE"))))
        if isinstance(node, exp.Anonymous) and node.name.upper() == "ROW":
            return exp.Anonymous(this="STRUCT", expressions=[e.copy() for e in node.expressions])
        if isinstance(node, exp.Avg) and not (isinstance(node.this, exp.Cast)
                                              and node.this.is_type("double")):
            return exp.Avg(this=exp.Cast(this=node.this.copy(),
                                         to=exp.DataType.build("DOUBLE")))
        if isinstance(node, exp.CTE) and node.args.get("materialized") is not None:
            node = node.copy()
            node.set("materialized", None)
        if isinstance(node, exp.Join) and node.args.get("kind") == "SEMI" \
                and not node.args.get("side"):
            node = node.copy()
            node.set("side", "LEFT")
        return node

    return tree.transform(rewrite).sql(dialect="spark")


def _nanosecond_columns(path: str | Path) -> list[str]:
    """The columns of the local Parquet file (or folder of files) ``path`` that hold
    timestamps in nanoseconds; none for a path this machine cannot read."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        schema = ds.dataset(str(path), format="parquet").schema
    except (OSError, ValueError, pa.ArrowException):
        return []
    return [f.name for f in schema
            if pa.types.is_timestamp(f.type) and f.type.unit == "ns"]


def _arrow_of(frame: pd.DataFrame) -> Any:
    """``frame`` as an Arrow table Spark can take: text columns as strings even when
    empty or all missing (Arrow would type them ``null``), times in microseconds
    (Spark's unit)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_null(kind) or pa.types.is_large_string(kind):
            kind = pa.string()
        elif pa.types.is_timestamp(kind) and kind.unit == "ns":
            kind = pa.timestamp("us", tz=kind.tz)
        if kind != field.type:
            table = table.set_column(i, field.name, table.column(i).cast(kind))
    return table


#: Arrow's integer and boolean columns as pandas' nullable types, as ``.df()`` has them
#: where they hold missing values (numpy's types would turn them into floats or objects)
_NULLABLE = {"int8": pd.Int8Dtype(), "int16": pd.Int16Dtype(), "int32": pd.Int32Dtype(),
             "int64": pd.Int64Dtype(), "uint8": pd.UInt8Dtype(), "uint16": pd.UInt16Dtype(),
             "uint32": pd.UInt32Dtype(), "uint64": pd.UInt64Dtype(),
             "bool": pd.BooleanDtype()}


def _pandas_of(table: Any) -> pd.DataFrame:
    """An Arrow table as pandas with DuckDB's ``.df()`` types: integer and boolean
    columns with missing values nullable (without, numpy's), decimals as floats, dates
    as datetime64[us]."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.float64()))
    nullable = {f.name for f in table.schema if table.column(f.name).null_count
                and str(f.type) in _NULLABLE}
    frame = table.to_pandas(date_as_object=False)
    for field in table.schema:
        if field.name in nullable:
            frame[field.name] = table.column(field.name).to_pandas(
                types_mapper=lambda kind: _NULLABLE.get(str(kind)))
        elif pa.types.is_date(field.type):
            frame[field.name] = frame[field.name].astype("datetime64[us]")
    return frame


def _frame_of(df: Any) -> pd.DataFrame:
    """A Spark DataFrame as pandas, typed as DuckDB's frames are (:func:`_pandas_of`,
    through Arrow); Spark's timestamps, which carry the session's zone (UTC), as the
    zone-less times DuckDB gives."""
    import pyarrow as pa

    table = df.toArrow()
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) and field.type.tz is not None:
            table = table.set_column(i, field.name, table.column(i).cast(
                pa.timestamp(field.type.unit)))
        elif pa.types.is_large_string(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.string()))
    return _pandas_of(table)
