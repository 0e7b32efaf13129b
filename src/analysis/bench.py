"""Benchmarks: speed and memory measured in their own process, written to JSON.

``features`` times the project's DuckDB feature build against an idiomatic pandas
implementation of the same features (whose results must be identical) and against a
floor (reading the columns the features read plus one ``np.bincount`` aggregation), on demo data
of a given number of order lines. The pandas implementation is a reference, not part
of the package: it lives beside the benchmark results in ``bench/reference.py`` of the
source checkout, where the tests import it too.

``cdnow`` trains the project's models with the model step's own functions
(:func:`analysis.models.fit_churn_candidates`, :func:`analysis.models.split_validation`)
on the CDNOW calibration period and judges them, with BG/NBD + Gamma-Gamma, on the
holdout.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.clv import BetaGeoModel, GammaGammaModel, rfm_summary
from analysis.config import load_config, memory_bytes
from analysis.demo import DemoWorld, write_demo
from analysis.engine import spark_session
from analysis.errors import AnalysisError
from analysis.features import (LINE_INPUTS, build_features, build_snapshots, connect,
                               connect_spark)
from analysis.models import (
    ValueModel,
    bgnbd_baseline,
    candidate_probabilities,
    categories_of,
    feature_columns,
    fit_churn_candidates,
    normalized_gini,
    prepare_matrix,
    rfm_lookup,
    split_validation,
)
from analysis.report import run_pipeline
from analysis.segments import ACTIVE_STAGES
from analysis.strategy import RETAIN_PREFIX

__all__ = ["StepProfile", "bench_cdnow", "bench_features", "bench_stages", "bench_strategy",
           "render_results", "in_own_process"]

LINES_PER_CUSTOMER = 17.4  # what the demo world produces on average (measured)
BENCH_CUTOFF = dt.date(2025, 7, 1)
#: The pandas reference of the feature build, in the source checkout (not installed).
REFERENCE = Path(__file__).resolve().parents[2] / "bench" / "reference.py"
#: The notebooks the stage breakdown runs, in the source checkout.
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _load_reference():
    """``bench/reference.py`` of the source checkout, as a module."""
    if not REFERENCE.is_file():
        raise AnalysisError(f"the feature benchmark compares with the pandas reference in "
                            f"{REFERENCE}, which only a source checkout has")
    spec = importlib.util.spec_from_file_location("bench_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_features(*, lines: int, out: str | Path, repeats: int = 3,
                   data_dir: str | Path | None = None, seed: int = 42,
                   memory_limit: str | None = None) -> dict:
    """Benchmark the feature build on demo data of about ``lines`` order lines.

    The project's build and the pandas reference each run in a fresh Python process
    (:func:`_run_in_child`), in turn, ``repeats`` times; only the work is timed, not
    the start of Python or its imports. In one process, the project's build ran in the
    memory the pandas reference (several GB) had just freed: 17-21 s there against
    13.6-16.5 s on its own. The scan floor is read here, warm, as the floor has always
    been measured (in a fresh process it also pays for its first touch of the memory:
    4-8 s instead of 2).

    Writes ``OUT/features.json`` with ``lines``, ``customers``, ``seconds_project``,
    ``seconds_pandas``, ``seconds_scan_bound`` (medians; the floor reads the
    ``floor_columns``; ``seconds_scan_bound_4_columns`` is the floor of the earlier
    results, which read four of them), ``identical``,
    ``peak_rss_mb`` (the largest of the project's processes, VmHWM), the ratios, and
    the machine's facts. ``memory_limit`` caps DuckDB (it spills to disk beyond).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_customers = max(1, round(lines / LINES_PER_CUSTOMER))
    data_dir = Path(data_dir) if data_dir else out / f"data-{lines}"
    tx_path = data_dir / "transactions.parquet"
    if not tx_path.is_file():
        start = time.perf_counter()
        write_demo(data_dir, n_customers=n_customers, seed=seed)
        print(f"generated {n_customers:,} customers in {time.perf_counter() - start:.1f} s",
              flush=True)
        for extra in ("customers", "interactions", "campaign"):
            (data_dir / f"{extra}.parquet").unlink(missing_ok=True)
    _load_reference()            # a clear stop outside a source checkout, before any run
    n_lines = pq.ParquetFile(tx_path).metadata.num_rows
    timings: dict[str, list[float]] = {"project": [], "pandas": [], "scan_bound": [],
                                       "scan_bound_4_columns": []}
    peaks = []
    for _ in range(repeats):
        for name in ("project", "pandas"):
            seconds, peak = _run_in_child(name, data_dir=data_dir, out=out,
                                          memory_limit=memory_limit)
            timings[name].append(seconds)
            if name == "project":
                peaks.append(peak)
        for floor, columns in (("scan_bound", None),
                               ("scan_bound_4_columns", FOUR_COLUMN_FLOOR)):
            start = time.perf_counter()
            _scan_bound(data_dir, columns)
            timings[floor].append(time.perf_counter() - start)
    results = {name: pd.read_parquet(out / f"result-{name}.parquet")
               for name in ("project", "pandas")}
    identical = _load_reference().same_features(results["project"], results["pandas"])
    median = {k: statistics.median(v) for k, v in timings.items()}
    report = {
        "lines": int(n_lines),
        "customers": int(len(results["project"])),
        "cutoff": BENCH_CUTOFF.isoformat(),
        "features": int(results["project"].shape[1] - 1),
        "repeats": repeats,
        "seconds_project": round(median["project"], 3),
        "seconds_pandas": round(median["pandas"], 3),
        "seconds_scan_bound": round(median["scan_bound"], 3),
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
        "identical": identical,
        "speedup_vs_pandas": round(median["pandas"] / median["project"], 2),
        "ratio_to_scan_bound": round(median["project"] / median["scan_bound"], 2),
        "floor_columns": [c for c in LINE_INPUTS
                          if c in pq.ParquetFile(tx_path).schema_arrow.names],
        "seconds_scan_bound_4_columns": round(median["scan_bound_4_columns"], 3),
        "ratio_to_scan_bound_4_columns": round(
            median["project"] / median["scan_bound_4_columns"], 2),
        "memory_limit": memory_limit,
        "peak_rss_mb": round(max(peaks), 1),
        "machine": _machine(),
    }
    for name in results:
        (out / f"result-{name}.parquet").unlink()
    (out / "features.json").write_text(json.dumps(report, indent=2))
    return report


def _project_build(data_dir: Path, memory_limit: str | None) -> pd.DataFrame:
    return build_features(connect(data_dir, memory_limit=memory_limit), cutoff=BENCH_CUTOFF)


def _pandas_build(data_dir: Path) -> pd.DataFrame:
    tx = pd.read_parquet(data_dir / "transactions.parquet")
    return _load_reference().pandas_features(tx, cutoff=BENCH_CUTOFF)


def _scan_bound(data_dir: Path, columns: tuple[str, ...] | None = None) -> np.ndarray:
    """The floor: read the columns the features read (:data:`analysis.features.
    LINE_INPUTS`, those the file has), or only ``columns``, and one aggregation."""
    path = data_dir / "transactions.parquet"
    if columns is None:
        present = set(pq.ParquetFile(path).schema_arrow.names)
        columns = tuple(c for c in LINE_INPUTS if c in present)
    table = pq.read_table(path, columns=list(columns))
    ids = table.column("customer_id").dictionary_encode().combine_chunks()
    keep = (table.column("order_date").to_numpy() < np.datetime64(BENCH_CUTOFF))
    codes = ids.indices.to_numpy()
    return np.bincount(codes[keep], weights=table.column("amount").to_numpy()[keep],
                       minlength=len(ids.dictionary))


#: The floor before session 14, which read four of the columns the features read (not
#: the order id they group by, nor category, channel and margin): measured beside the
#: floor for comparison with the earlier results.
FOUR_COLUMN_FLOOR = ("customer_id", "order_date", "amount", "status")


def in_own_process(script: str | Path, *args: object) -> dict:
    """What a benchmark script measures of one way in a fresh Python process (so that its
    peak memory is its own): ``python SCRIPT --one ARGS``, whose last line printed is a
    JSON object; a clear stop with the tail of its error when it fails."""
    done = subprocess.run([sys.executable, str(script), "--one", *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise AnalysisError(f"{Path(script).name} --one {' '.join(map(str, args))} failed:\n"
                            f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_in_child(name: str, *, data_dir: Path, out: Path, memory_limit: str | None
                  ) -> tuple[float, float]:
    """Seconds of one run of ``name`` (project, pandas) in a fresh Python
    process, and that process's peak resident memory (MiB, VmHWM: ``ru_maxrss`` would
    report the parent's, which Linux carries across fork and exec). The frames of the
    project and of pandas are written to ``OUT/result-<name>.parquet``, untimed."""
    call = {"project": f"_project_build(Path({str(data_dir)!r}), {memory_limit!r})",
            "pandas": f"_pandas_build(Path({str(data_dir)!r}))"}[name]
    keep = f"result.to_parquet({str(out / f'result-{name}.parquet')!r})\n"
    code = (
        "import re, time\n"
        "from pathlib import Path\n"
        "from analysis.bench import _pandas_build, _project_build\n"
        "start = time.perf_counter()\n"
        f"result = {call}\n"
        "seconds = time.perf_counter() - start\n"
        "status = open('/proc/self/status').read()\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
        + keep +
        "print(seconds, peak)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise AnalysisError(f"the {name} run of the feature benchmark failed:\n"
                            f"{done.stderr[-2000:]}")
    seconds, peak = done.stdout.split()[-2:]
    return float(seconds), int(peak) / 1024


def bench_spark(*, lines: int, out: str | Path, data_dir: str | Path | None = None,
                seed: int = 42, master: str = "local[*]", driver_memory: str = "4g",
                memory_limit: str | None = None) -> dict:
    """The features at one cutoff on Spark (local mode) against DuckDB, on the same demo
    log of about ``lines`` order lines (generated when missing, as
    :func:`bench_features` does).

    One run of each (Spark takes minutes at 20M lines on two cores), DuckDB first.
    Writes ``OUT/spark.json``: seconds of each build (Spark's session start apart), the
    ratio, whether the tables are equal (floats to within 1e-9, as in
    ``tests/test_spark.py``) and where not, the peak resident memory of the Spark JVM and the
    machine's facts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir else out / f"data-{lines}"
    if not (data_dir / "transactions.parquet").is_file():
        write_demo(data_dir, n_customers=max(1, round(lines / LINES_PER_CUSTOMER)),
                   seed=seed)
        for extra in ("customers", "interactions", "campaign"):
            (data_dir / f"{extra}.parquet").unlink(missing_ok=True)
    n_lines = pq.ParquetFile(data_dir / "transactions.parquet").metadata.num_rows
    start = time.perf_counter()
    duck = build_features(connect(data_dir, memory_limit=memory_limit), cutoff=BENCH_CUTOFF)
    seconds_duckdb = time.perf_counter() - start
    start = time.perf_counter()
    session = spark_session(master, {"spark.driver.memory": driver_memory})
    seconds_start = time.perf_counter() - start
    start = time.perf_counter()
    spark = build_features(connect_spark(data_dir, session=session), cutoff=BENCH_CUTOFF)
    seconds_spark = time.perf_counter() - start
    jvm_pid = session.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    jvm_peak = _vm_kib_of(int(jvm_pid), "VmHWM") / 1024
    cores = session.sparkContext.defaultParallelism
    version = session.version
    session.stop()
    differences = _differences(duck, spark)
    equal = not differences
    report = {
        "lines": int(n_lines), "customers": int(len(duck)), "cutoff": BENCH_CUTOFF.isoformat(),
        "features": int(duck.shape[1] - 1), "master": master, "spark_cores": int(cores),
        "driver_memory": driver_memory, "duckdb_memory_limit": memory_limit,
        "seconds_duckdb": round(seconds_duckdb, 2),
        "seconds_spark_session": round(seconds_start, 2),
        "seconds_spark": round(seconds_spark, 2),
        "spark_over_duckdb": round(seconds_spark / seconds_duckdb, 1),
        "equal": equal, "differences": differences,
        "spark_jvm_peak_rss_mb": round(jvm_peak, 1),
        "machine": {**_machine(), "spark": version},
    }
    (out / "spark.json").write_text(json.dumps(report, indent=2))
    return report


def _differences(expected: pd.DataFrame, got: pd.DataFrame) -> dict[str, dict]:
    """Per column where two frames of the same rows differ: how many values, the
    largest absolute difference (numbers) and one example row. Floats within 1e-9
    (relative, or absolute near zero) count as equal."""
    if list(expected.columns) != list(got.columns) or len(expected) != len(got):
        return {"shape": {"expected": [len(expected), list(expected.columns)],
                          "got": [len(got), list(got.columns)]}}
    out = {}
    for col in expected.columns:
        a, b = expected[col], got[col]
        if pd.api.types.is_float_dtype(a) and pd.api.types.is_numeric_dtype(b):
            x, y = a.to_numpy(float), b.to_numpy(float)
            bad = ~(np.isclose(x, y, rtol=1e-9, atol=1e-9, equal_nan=True))
        else:
            bad = ~((a == b) | (a.isna() & b.isna())).to_numpy(bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            out[col] = {"values": int(bad.sum()), "example": [
                str(expected.iloc[i].get("customer_id")), str(a.iloc[i]), str(b.iloc[i])]}
    return out


def _vm_kib_of(pid: int, field: str) -> int:
    import re

    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def _machine() -> dict:
    import platform

    import duckdb

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "duckdb": duckdb.__version__, "pandas": pd.__version__,
            "self_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# --------------------------------------------------------------------------- stage breakdown


def _vm_kib(field: str) -> int:
    import re

    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def _reset_peak() -> None:
    """Reset the process's peak resident memory (VmHWM) to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


class StepProfile:
    """Wall time and peak resident memory of named steps, nested, aggregated by path.

    :meth:`wrap` replaces a function (a module attribute or a class's method) by a timed
    copy of itself until the profile closes, so that a step of the package is measured
    where it runs, without the package knowing; :meth:`step` times a block. A step's
    peak memory is read from the kernel (``VmHWM``, reset when the step starts), so it
    misses nothing between samples; a step's peak includes its children's.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self._stack: list[list] = []        # [path, start, peak so far (KiB)]
        self._patches: list[tuple[object, str, object]] = []

    def __enter__(self) -> StepProfile:
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()

    def _enter(self, label: str) -> None:
        if self._stack:
            parent = self._stack[-1]
            parent[2] = max(parent[2], _vm_kib("VmHWM"))
        _reset_peak()
        path = f"{self._stack[-1][0]} > {label}" if self._stack else label
        self.rows.setdefault(path, {"step": path, "calls": 0, "seconds": 0.0,
                                    "peak_rss_mb": 0.0})     # in the order steps start
        self._stack.append([path, time.perf_counter(), 0])

    def _leave(self) -> None:
        path, start, peak = self._stack.pop()
        seconds = time.perf_counter() - start
        peak = max(peak, _vm_kib("VmHWM"))
        if self._stack:
            self._stack[-1][2] = max(self._stack[-1][2], peak)
        row = self.rows[path]
        row["calls"] += 1
        row["seconds"] += seconds
        row["peak_rss_mb"] = max(row["peak_rss_mb"], round(peak / 1024, 1))

    def step(self, label: str):
        """A context manager timing the block as ``label``."""
        import contextlib

        @contextlib.contextmanager
        def block():
            self._enter(label)
            try:
                yield
            finally:
                self._leave()
        return block()

    def wrap(self, owner: object, name: str, label: str | None = None) -> None:
        """Time every call of ``owner.name`` (a generator: each item it yields) as
        ``label`` (default: ``name``) until the profile closes."""
        import functools
        import inspect

        original = inspect.getattr_static(owner, name)
        function = getattr(owner, name)
        label = label or name
        if inspect.isgeneratorfunction(function):
            @functools.wraps(function)
            def timed(*args, **kwargs):
                items = function(*args, **kwargs)
                while True:
                    self._enter(label)
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    finally:
                        self._leave()
                    yield item
        else:
            @functools.wraps(function)
            def timed(*args, **kwargs):
                self._enter(label)
                try:
                    return function(*args, **kwargs)
                finally:
                    self._leave()
        if isinstance(original, staticmethod):
            timed = staticmethod(timed)
        self._patches.append((owner, name, original))
        setattr(owner, name, timed)

    def table(self) -> list[dict]:
        """The steps in the order they first started, times rounded."""
        return [{**r, "seconds": round(r["seconds"], 2)} for r in self.rows.values()]


#: What the stage breakdown times inside each stage: (module, attribute, label); a
#: class's method is ``Class.method``. Steps nest where they call each other; a step
#: the code measured does not have (older or newer code) is left out.
_STAGE_STEPS = {
    "01_data_quality": [
        ("analysis.data", "load_table", None), ("analysis.data", "_read_chunks", "read chunk"),
        ("analysis.data", "_map_columns", None), ("analysis.data", "_parse", None),
        ("analysis.data", "_validate", None), ("analysis.data", "_duplicates", None),
        ("analysis.data", "_judge_rows", None), ("analysis.data", "_set_aside_again", None),
        ("analysis.data", "_quarantine_frame", None),
        ("analysis.data", "write_processed", None),
        ("analysis.data", "write_atomically", None),
        ("analysis.data", "quality_summary", None),
        ("analysis.data", "_transaction_measures", None),
        ("analysis.data", "_monthly", None),
    ],
    "02_customer_profile": [
        ("analysis.segments", "build_features", "build_features (scoring date)"),
        ("analysis.segments", "assign_lifecycle", None),
        ("analysis.segments", "cluster_customers", None),
        ("analysis.segments", "write_profile", None),
    ],
    "03_churn_model": [
        ("analysis.models", "resolve_horizon_days", None),
        ("analysis.models", "fit_and_evaluate", None),
        ("analysis.models", "build_snapshots", None),
        ("analysis.models", "snapshots_by_cutoff", "snapshots_by_cutoff (every cutoff)"),
        ("analysis.features", "build_features", "build_features (one cutoff)"),
        ("analysis.models", "build_features", "build_features (scoring date)"),
        ("analysis.models", "prepare_matrix", None),
        ("analysis.models", "assign_lifecycle", None),
        ("analysis.models", "fit_churn_candidates", None),
        ("analysis.models", "_Booster._train", "XGBoost training"),
        ("analysis.models", "ChurnModel.fit", "ChurnModel.fit"),
        ("analysis.models", "choose_calibration", "calibration"),
        ("analysis.models", "LogisticChurn.fit", None),
        ("analysis.models", "ValueModel.fit", None),
        ("analysis.models", "bgnbd_baseline", None),
        ("analysis.models", "rfm_summary", None),
        ("analysis.models", "_Booster._margin", "XGBoost prediction"),
        ("analysis.models", "rfm_lookup", None),
        ("analysis.models", "churn_metrics_table", "evaluation metrics"),
        ("analysis.models", "feature_drift", None),
        ("analysis.models", "_Booster.contributions", "SHAP (TreeSHAP)"),
        ("analysis.models", "LogisticChurn.contributions", "SHAP (logistic)"),
        ("analysis.models", "reason_codes", None),
        ("analysis.models", "_scores_here", "scores table (driver)"),
        ("analysis.models", "scores_on_spark", "scores table (executors)"),
        ("analysis.models", "drift_on_spark", None),
        ("analysis.models", "global_drivers", None),
        ("analysis.models", "write_model_run", "writing"),
        ("analysis.models", "data_fingerprint", None),
    ],
    "05_strategy": [
        ("analysis.strategy", "strategy_step", None),
        ("analysis.strategy", "decide", None),
        ("analysis.strategy", "customer_economics", None),
        ("analysis.strategy", "snapshots_by_cutoff", "snapshots_by_cutoff (campaign dates)"),
        ("analysis.strategy", "build_features", None),
        ("analysis.strategy", "estimate_retention_effect", None),
        ("analysis.strategy", "estimate_margin_uplift", None),
        ("analysis.strategy", "_campaign_margins", None),
        ("analysis.strategy", "_hazard_contact_value", "hazard contact value"),
        ("analysis.strategy", "hazard_effect_rows", None),
        ("analysis.uplift", "rfm_summaries", "rfm_summaries (campaign dates)"),
        ("analysis.uplift", "fit_bgnbd", "fit_bgnbd (campaign dates)"),
        ("analysis.strategy", "estimate_hazard_effect", None),
        ("analysis.strategy", "rfm_summary", "rfm_summary (scoring date)"),
        ("analysis.strategy", "fit_bgnbd", "fit_bgnbd (scoring date)"),
        ("analysis.strategy", "_learned_uplift", "learned uplift"),
        ("analysis.strategy", "learn_uplift", None),
        ("analysis.uplift", "campaign_outcomes", None),
        ("analysis.uplift", "snapshots_by_cutoff", "snapshots_by_cutoff (uplift campaigns)"),
        ("analysis.uplift", "UpliftLearner.fit", None),
        ("analysis.uplift", "compare_rankings", None),
        ("analysis.strategy", "retention_targeting", None),
        ("analysis.strategy", "period_profits", None),
        ("analysis.strategy", "order_profits", None),
        ("analysis.strategy", "phaseout_review", None),
        ("analysis.strategy", "_assemble", None),
        ("analysis.strategy", "early_warnings", None),
        ("analysis.strategy", "fairness_audit", None),
        ("analysis.strategy", "_explain_listed", "reasons for the listed"),
        ("analysis.strategy", "explain_customers", None),
        ("analysis.models", "_Booster.contributions", "SHAP (TreeSHAP)"),
        ("analysis.models", "reason_codes", None),
        ("analysis.strategy", "write_strategy", None),
    ],
}


def _run_stage(stage: str, config_path: str, processed_dir: str, out_json: str) -> None:
    """Run one stage's notebook (its code cells, with a run's parameters) under a
    :class:`StepProfile`, in this (fresh) process; write its steps to ``out_json``.

    Each code cell is a step (named by its first line); the package's steps of
    :data:`_STAGE_STEPS` are timed inside them. Displays go to standard output."""
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    notebook = json.loads((NOTEBOOKS / f"{stage}.ipynb").read_text())
    run = Path(processed_dir)
    params = {"config_path": str(config_path), "run_id": run.name, "as_of": None,
              "processed_dir": str(run), "report_dir": str(run.parent / "report"),
              "processed_href": str(run), "previous_processed_dir": ""}
    profile = StepProfile()
    with profile, profile.step(stage):
        for module, attr, label in _STAGE_STEPS[stage]:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and hasattr(owner, name):
                profile.wrap(owner, name, label or attr)
        namespace: dict = {}
        cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        for i, cell in enumerate(cells, start=1):
            source = "".join(cell["source"])
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                exec(compile(source, f"{stage} cell {i}", "exec"), namespace)  # noqa: S102
                namespace.update(params)
                continue
            first = next((line for line in source.splitlines()
                          if line.strip() and not line.startswith("#")), "")
            with profile.step(f"cell {i}: {first.strip()[:48]}"):
                exec(compile(source, f"{stage} cell {i}", "exec"), namespace)  # noqa: S102
            matplotlib.pyplot.close("all")
    Path(out_json).write_text(json.dumps(profile.table(), indent=2))


def bench_stages(*, lines: int, out: str | Path, data_dir: str | Path | None = None,
                 seed: int = 42, memory_limit: str = "6GB",
                 stages: tuple[str, ...] = tuple(_STAGE_STEPS), label: str = "") -> dict:
    """Where the time and memory of a run's stages go, step by step.

    Generates (or reuses) the demo world with about ``lines`` order lines and all its
    tables, then runs the data-quality, profile, churn-model and strategy stages as their
    notebooks do, each in a fresh process (as each notebook has its own kernel), with the
    steps of :data:`_STAGE_STEPS` timed where they run (:class:`StepProfile`): seconds, calls and
    peak resident memory per step, nested. ``label`` names the code measured (a branch,
    a commit) in the results. Writes ``OUT/stages.json``.
    """
    import yaml

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve() if data_dir else out / f"data-{lines}"
    if not (data_dir / "transactions.parquet").is_file():
        write_demo(data_dir, n_customers=max(1, round(lines / LINES_PER_CUSTOMER)), seed=seed)
    config = out / "stages-config.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"bench-stages-{lines}", "seed": seed,
        "tables": {name: {"path": str(data_dir / f"{name}.parquet")}
                   for name in ("transactions", "customers", "interactions", "campaign")},
        "protected": ["gender", "age_band"],
        "analysis": {"memory_limit": memory_limit},
        "output": {"processed_dir": str(out / "processed"), "reports_dir": str(out / "reports")},
    }))
    processed = out / "processed" / "stages"
    processed.mkdir(parents=True, exist_ok=True)
    ids = pq.read_table(data_dir / "transactions.parquet", columns=["customer_id"])
    report = {"lines": int(ids.num_rows),
              "customers": int(len(ids.column("customer_id").unique())),
              "label": label, "memory_limit": memory_limit, "stages": {}}
    del ids
    for stage in stages:
        steps_file = out / f"steps-{stage}.json"
        code = (f"from analysis.bench import _run_stage; _run_stage({stage!r}, "
                f"{str(config)!r}, {str(processed)!r}, {str(steps_file)!r})")
        load = os.getloadavg()[0]
        with open(out / f"steps-{stage}.log", "w") as log:      # DuckDB's progress bars
            done = subprocess.run([sys.executable, "-c", code], stdout=log, stderr=log)
        if done.returncode:
            raise AnalysisError(f"stage {stage} failed: see {out / f'steps-{stage}.log'}")
        steps = json.loads(steps_file.read_text())
        whole = next(s for s in steps if s["step"] == stage)
        report["stages"][stage] = {"seconds": whole["seconds"],
                                   "peak_rss_mb": whole["peak_rss_mb"],
                                   "load_average_before": round(load, 2),
                                   "load_average_after": round(os.getloadavg()[0], 2),
                                   "steps": steps}
        print(f"{stage}: {whole['seconds']:.1f} s, peak {whole['peak_rss_mb']:,.0f} MiB",
              flush=True)
    report["machine"] = _machine()
    (out / "stages.json").write_text(json.dumps(report, indent=2))
    return report


def _stages_markdown(results: list[dict]) -> list[str]:
    """The measurements of :func:`bench_stages`, one table per stage and size: each
    step's seconds and peak memory under each label (the code measured) side by side,
    nested steps indented under the step that calls them; a step one version does not
    have is blank in its columns. Notebook cells are steps too: a step is named by its
    path below the cell, so that the same package step lines up across versions."""
    lines = ["## Where the time goes inside the stages", "",
             "`python -m analysis bench stages`: the data-quality, profile, churn-model and strategy "
             "notebooks run cell by cell, each stage in a fresh process, with the "
             "package's steps timed where they run (seconds summed over calls; a step's "
             "time includes the steps indented under it; `cell N` rows are the notebook's "
             "cells, package steps and all). Peak memory is the process's (VmHWM, reset "
             "when the step starts). The machine is shared by other work: the load "
             "average (runnable processes on its 2 cores) before and after each stage is "
             "given, and seconds measured under a higher load are longer.", ""]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        for stage in r["stages"]:
            groups.setdefault((r["lines"], stage), []).append(r)
    for (n_lines, stage), runs in sorted(groups.items()):
        labels = [r.get("label") or f"run {i + 1}" for i, r in enumerate(runs)]
        steps: dict[str, dict[str, dict]] = {}
        order: list[str] = []
        for label, r in zip(labels, runs, strict=True):
            after = -1                   # a step new to this run goes after its predecessor
            for step in r["stages"][stage]["steps"]:
                key = _step_key(step["step"])
                if key not in steps:
                    order.insert(after + 1, key)
                after = order.index(key)
                steps.setdefault(key, {})[label] = step
        steps = {key: steps[key] for key in order}
        lines += [f"### {stage}: {n_lines:,} lines, {runs[0]['customers']:,} customers", ""]
        if n_lines < 10_000_000:
            lines += [f"Measured at {n_lines / 1e6:.1f}M lines. For 20M lines, the steps that "
                      "grow with the lines (the feature builds, the data's reading, parsing "
                      "and rules) or with the customers scored (SHAP, predictions, reason "
                      f"codes, BG/NBD) take about {20e6 / n_lines:.1f} times as long; the "
                      "XGBoost training does not grow as much (its rows are capped at "
                      "300,000 snapshots).", ""]
        for label, r in zip(labels, runs, strict=True):
            found = r["stages"][stage]
            lines.append(f"- {label}: {found['seconds']:.1f} s, peak "
                         f"{found['peak_rss_mb']:,.0f} MiB; load average "
                         f"{found.get('load_average_before', 0):.1f} before, "
                         f"{found.get('load_average_after', 0):.1f} after; budget "
                         f"`{r.get('memory_limit')}`")
        lines += ["", "| step | " + " | ".join(f"{lb}: calls | s | peak MiB"
                                                 for lb in labels) + " |",
                  "|---|" + "---:|---:|---:|" * len(labels)]
        for key, by_label in steps.items():
            depth = key.count(" > ")
            name = ("&nbsp;&nbsp;" * 2 * depth + key.split(" > ")[-1]) if key else "**stage**"
            cells = [f"{by_label[lb]['calls']} | {by_label[lb]['seconds']:.2f} | "
                     f"{by_label[lb]['peak_rss_mb']:,.0f}" if lb in by_label else " |  | "
                     for lb in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines + ["Reproduce: `python -m analysis bench stages --lines N --label L --out "
                    "bench/out/stages-N` (`--data` to reuse a demo world, `--stage` for one "
                    "stage; the later stages read the earlier ones' output), then copy "
                    "`stages.json` to `bench/results/stages-<size>-<label>.json`; the "
                    "\"before\" runs put the package of that commit first on `PYTHONPATH`.",
                    ""]


def _step_key(path: str) -> str:
    """A step's path without the stage and without the notebook cell it ran in (the cell
    itself keeps its name)."""
    parts = path.split(" > ")[1:]
    if len(parts) > 1 and parts[0].startswith("cell "):
        parts = parts[1:]
    return " > ".join(parts)


#: The rows of the strategy table: (label, key or function of a result, format).
_STRATEGY_ROWS = (
    ("campaign size (the Retain actions)", "campaign_size", "{:,.0f}"),
    ("campaign file = the Retain actions", "campaign_matches_actions", "{}"),
    ("how a contact is valued", "retention_method", "{}"),
    ("measured share of the dropout hazard a contact takes off",
     lambda r: (r.get("hazard_effect") or {}).get("effect"), "{:.1%}"),
    ("... its standard error", lambda r: (r.get("hazard_effect") or {}).get("se"), "{:.1%}"),
    ("profit capture vs the oracle of probabilities, at the depth the run chose",
     "profit_capture_vs_oracle", "{:.1%}"),
    ("... same size, ranked by one effect for everyone (expected margin)",
     "profit_capture_pooled_ranking", "{:.1%}"),
    ("... same size, ranked by churn probability", "profit_capture_churn_ranking", "{:.1%}"),
    ("... the run's ranking at its best depth (known only with the ground truth)",
     "profit_capture_at_best_depth", "{:.1%}"),
    ("latest campaigns: AUUC of the learned ranking (margin per contact above random)",
     lambda r: (r.get("qini_auuc") or {}).get("model"), "{:.2f}"),
    ("... of the pooled-effect ranking", lambda r: (r.get("qini_auuc") or {}).get("pooled"),
     "{:.2f}"),
    ("... of the churn ranking", lambda r: (r.get("qini_auuc") or {}).get("churn"), "{:.2f}"),
    ("phase-out list", "phaseout_count", "{:,.0f}"),
    ("... of whom in the top half by true future profit", "phaseout_true_value_top_half",
     "{:,.0f}"),
    ("fairness flags", lambda r: len(r.get("fairness_flags", [])), "{:,.0f}"),
    ("pipeline seconds", "seconds_pipeline", "{:,.0f}"),
)


def _strategy_markdown(results: list[dict]) -> list[str]:
    """One table for the strategy benchmark at one size: a column per seed and, for the
    numeric rows, their mean."""
    def value(r, key):
        return key(r) if callable(key) else r.get(key)

    seeds = [r["seed"] for r in results]
    lines = [f"## Strategy on the demo world ({results[0]['customers']:,} customers, seeds "
             f"{', '.join(map(str, seeds))})", "",
             "Retention targeting valued on realised outcomes from the ground truth (a contact "
             "stretches a live customer's remaining lifetime by 1 / (1 - true effect); value = "
             "margin of the extra days alive within a year, minus the contact and offer cost). "
             "The AUUCs are the run's own out-of-time judgement on the latest campaigns "
             "(averaged over the two latest since the judgement holds out two).", "",
             "| measure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for label, key, fmt in _STRATEGY_ROWS:
        values = [value(r, key) for r in results]
        cells = ["" if v is None else fmt.format(v) for v in values]
        numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        mean_fmt = "{:,.1f}" if fmt == "{:,.0f}" else fmt     # a mean count has a decimal
        mean = mean_fmt.format(statistics.fmean(numeric)) if len(numeric) == len(values) \
            else ""
        if isinstance(values[0], bool):
            mean = "all" if all(values) else f"{sum(map(bool, values))} of {len(values)}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return lines + ["", "Reproduce: `python -m analysis bench strategy --customers "
                    f"{results[0]['customers']} --seed S --out bench/out/strategy-S` and copy "
                    "each `strategy.json` to `bench/results/strategy-"
                    f"{round(results[0]['customers'] / 1000)}k-seedS.json`.", ""]


def _four(result: dict, key: str, fmt: str, unit: str = "") -> str:
    """`` (x)``: ``key``'s figure against the four-column floor, when the result has it."""
    value = result.get(f"{key}_4_columns")
    return "" if value is None else f" ({value:{fmt}}{unit})"


def render_results(results_dir: str | Path) -> str:
    """``bench/RESULTS.md`` from the JSON result files in ``results_dir``."""
    results_dir = Path(results_dir)
    lines = ["# Benchmark results", "",
             "Generated by `python -m analysis bench results` from the JSON files in "
             "`bench/results/`; do not edit by hand.", ""]
    feats = sorted((json.loads(p.read_text()) for p in results_dir.glob("features-*.json")),
                   key=lambda r: (r["lines"], r.get("memory_limit") or ""))
    if feats:
        lines += [
            "## Feature build (one cutoff)", "",
            "The project's DuckDB SQL over Parquet against an idiomatic pandas implementation "
            "of the same features (results compared value by value) and against a floor: "
            "reading the columns the features read plus one `np.bincount` aggregation. "
            "Until session 14 the floor read four of the eight (customer, date, amount, "
            "status: not the order id the features group by, nor category, channel and "
            "margin); rows measured since give both, the four-column floor in brackets. "
            "Medians of "
            "the runs (repeats per row): the project's build and pandas each in a fresh "
            "process that times only the work (in one process, the project's build ran in "
            "the memory pandas had just freed: 17-21 s there against 13.6-16.5 s on its "
            "own), the floor warm in the benchmark's own process; peak memory of the "
            "project's build (VmHWM). With a DuckDB memory limit "
            "(`--memory-limit`; in a run, half of `analysis.memory_limit`) DuckDB spills "
            "to disk; the peak "
            "also holds the result frame and Python, outside that limit.", "",
            "| lines | customers | features | DuckDB limit | repeats | project s | pandas s | "
            "floor columns | scan floor s | pandas / project | project / floor | peak MiB | "
            "identical |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for r in feats:
            lines.append(
                f"| {r['lines']:,} | {r['customers']:,} | {r['features']} | "
                f"{r.get('memory_limit') or 'none'} | {r['repeats']} | "
                f"{r['seconds_project']:.2f} | {r['seconds_pandas']:.2f} | "
                f"{len(r.get('floor_columns', FOUR_COLUMN_FLOOR))} | "
                f"{r['seconds_scan_bound']:.2f}{_four(r, 'seconds_scan_bound', '.2f')} | "
                f"{r['speedup_vs_pandas']:.1f}x | "
                f"{r['ratio_to_scan_bound']:.1f}x{_four(r, 'ratio_to_scan_bound', '.1f', 'x')} | "
                f"{r['peak_rss_mb']:,.0f} | {'yes' if r['identical'] else 'NO'} |")
        m = feats[-1]["machine"]
        lines += ["", f"Machine: {m['cpus']} cores, Python {m['python']}, DuckDB "
                      f"{m['duckdb']}, pandas {m['pandas']}.", "",
                  "Reproduce:", "", "```",
                  *[f"python -m analysis bench features --lines {round(r['lines'], -6):.0f} "
                    + (f"--memory-limit {r['memory_limit']} --repeats {r['repeats']} "
                       if r.get("memory_limit") else "")
                    + f"--out bench/out/features-{round(r['lines'] / 1e6)}m"
                    + (f"-{r['memory_limit'].lower()}" if r.get("memory_limit") else "")
                    for r in feats],
                  "cp bench/out/features-*/features.json bench/results/  # renamed "
                  "features-<N>m.json",
                  "python -m analysis bench results", "```", ""]
    for extra in sorted(results_dir.glob("*.md")):
        lines += [extra.read_text().rstrip(), ""]
    sparks = sorted((json.loads(p.read_text()) for p in results_dir.glob("spark-*.json")),
                    key=lambda r: r["lines"])
    if sparks:
        lines += _spark_markdown(sparks)
    stages = sorted((json.loads(p.read_text()) for p in results_dir.glob("stages-*.json")),
                    key=lambda r: (r["lines"], r.get("label", "")))
    if stages:
        lines += _stages_markdown(stages)
    strategies = [json.loads(p.read_text()) for p in sorted(results_dir.glob("strategy*.json"))]
    for size in sorted({r["customers"] for r in strategies}):
        lines += _strategy_markdown(sorted((r for r in strategies if r["customers"] == size),
                                           key=lambda r: r["seed"]))
    for path in sorted(results_dir.glob("e2e-*.json")):
        m = json.loads(path.read_text())
        stages = m["stage_seconds"]
        customers = m.get("profile", {}).get("customers")
        peaks = m.get("stage_peak_rss_mb") or {}
        n_lines = next((t["rows_read"] for t in m.get("data_quality", {}).get("tables", [])
                        if t.get("table") == "transactions"), None)
        limit = m.get("memory_limit") or (m.get("config", {}).get("analysis") or {}).get(
            "memory_limit")
        intro = (f"`python -m analysis run` on the demo world with {customers:,} customers "
                 f"with a purchase" + (f" ({n_lines:,} order lines)" if n_lines else "")
                 + (f", memory limit `{limit}` in the config" if limit else "")
                 + "; seconds per stage from the run's `metrics.json` (copied here as the "
                 "JSON file)")
        if peaks:
            # each stage's own kernel; runs before stage_peak_per_kernel existed recorded
            # the largest kernel up to each stage
            own = bool(m.get("stage_peak_per_kernel"))
            budget = memory_bytes(limit) / 2**20 if limit else None
            within = ((f"; the budget of `{limit}` is {budget:,.0f} MiB per stage, and "
                       + ("every stage stayed within it" if max(peaks.values()) <= budget
                          else "**stages marked over went past it**"))
                      if budget and own else "")
            what = ("of each stage's notebook kernel" if own else
                    "of the largest notebook kernel up to that stage")
            lines += [f"## End to end: `{path.stem}`", "",
                      intro + f", and the peak resident memory {what} (each stage runs in "
                      "its own kernel)" + within + ":", "",
                      f"| stage | seconds | {'kernel peak' if own else 'largest kernel so far'}"
                      ", MiB |", "|---|---:|---:|",
                      *[f"| {k} | {v:.1f} | {peaks[k]:,.0f}"
                        + (" (over)" if budget and own and peaks[k] > budget else "") + " |"
                        if k in peaks else f"| {k} | {v:.1f} | |" for k, v in stages.items()],
                      f"| **total / largest** | **{sum(stages.values()):.1f}** | "
                      f"**{max(peaks.values()):,.0f}** |", "",
                      f"The process running the stages (and rendering the HTML) peaked at "
                      f"{m.get('runner_peak_rss_mb', 0):,.0f} MiB.", ""]
        else:
            lines += [f"## End to end: `{path.stem}`", "", intro + ":", "",
                      "| stage | seconds |", "|---|---:|",
                      *[f"| {k} | {v:.1f} |" for k, v in stages.items()],
                      f"| **total** | **{sum(stages.values()):.1f}** |", ""]
        lines += [f"Reproduce: the commands at the top of `bench/{path.stem}.yaml`.", ""]
    return "\n".join(lines)


def _spark_markdown(results: list[dict]) -> list[str]:
    m = results[-1]["machine"]
    return [
        "## Spark, local mode (features at one cutoff)", "",
        "The same feature SQL on Spark (transpiled by sqlglot, `docs/spark.md`) and on "
        "DuckDB, one run each on the same Parquet log, DuckDB first; Spark's session "
        "start counted apart. On one machine Spark pays for a JVM, tasks and shuffles "
        "that DuckDB does not need: this is the price of an engine that scales out, "
        "not a speed to compare with.", "",
        "| lines | customers | Spark cores | DuckDB s | Spark s | Spark / DuckDB | "
        "session start s | Spark JVM peak MiB | equal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        *[f"| {r['lines']:,} | {r['customers']:,} | {r['spark_cores']} | "
          f"{r['seconds_duckdb']:.1f} | {r['seconds_spark']:.1f} | "
          f"{r['spark_over_duckdb']:.1f}x | {r['seconds_spark_session']:.1f} | "
          f"{r['spark_jvm_peak_rss_mb']:,.0f} | {'yes' if r['equal'] else 'NO'} |"
          for r in results],
        "", f"Machine: {m['cpus']} cores, Spark {m['spark']}, DuckDB {m['duckdb']}.", "",
        "Reproduce:", "", "```",
        *[f"python -m analysis bench spark --lines {r['lines']} "
          f"--out bench/out/spark-{round(r['lines'] / 1e6)}m" for r in results],
        "cp bench/out/spark-*/spark.json bench/results/  # renamed spark-<N>m.json",
        "python -m analysis bench results", "```", ""]


CDNOW_CALIBRATION_END = dt.date(1997, 10, 1)
CDNOW_HOLDOUT_DAYS = 273          # 39 weeks: 1997-10-01 .. 1998-06-30
CDNOW_INNER_HORIZON_DAYS = 91     # inner cutoffs' labels must end by 1997-10-01
CDNOW_INNER_STEP_DAYS = 14


def bench_cdnow(*, data_dir: str | Path, out: str | Path, seed: int = 42) -> dict:
    """The CDNOW benchmark of the literature, with the project's models beside BG/NBD.

    Calibration 1997-01-01..1997-09-30, holdout 1997-10-01..1998-06-30, same-day
    purchases merged. BG/NBD and Gamma-Gamma are fitted on the calibration period (and
    on the 1/10 sample, to compare with the published parameters). The project's models
    may use only calibration data: they are trained on a 91-day horizon at inner cutoffs
    every 14 days from mid-February (the latest, 1997-07-02, whose labels end on
    1997-10-01, is the validation cutoff: as in the model step, half of its customers
    stop the models early and calibrate the churn model), and their spend and transaction
    predictions are scaled by 273/91 for the 39-week holdout (rankings are unaffected
    by the scale). A 91-day horizon with ten snapshots beat 120-, 150- and 182-day
    horizons with fewer snapshots in a comparison on these data.

    Writes ``OUT/cdnow.json`` and ``OUT/cdnow.md``.
    """
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = pd.read_csv(data_dir / "CDNOW_sample.txt", sep=r"\s+", header=None,
                         names=["original_id", "customer_id", "date", "cds", "amount"],
                         dtype={"customer_id": str, "date": str})
    sample["order_date"] = pd.to_datetime(sample["date"], format="%Y%m%d")
    s = rfm_summary(sample, calibration_end=CDNOW_CALIBRATION_END)
    bg_s = BetaGeoModel().fit(s["frequency"], s["recency"], s["T"])
    gg_s = GammaGammaModel().fit(s["frequency"], s["monetary_value"])

    master = pd.read_csv(data_dir / "CDNOW_master.txt", sep=r"\s+",
                         dtype={"customer_id": str, "date": str})
    lines = pd.DataFrame({"customer_id": master["customer_id"],
                          "order_date": pd.to_datetime(master["date"], format="%Y%m%d"),
                          "amount": master["dollar_value"].astype(float),
                          "status": "completed"})
    con = connect({"transactions": lines})
    start = time.perf_counter()
    at_cal = build_features(con, cutoff=CDNOW_CALIBRATION_END,
                            horizon_days=CDNOW_HOLDOUT_DAYS)
    actual_tx = at_cal["future_orders"].to_numpy(dtype=float)
    actual_spend = at_cal["future_spend"].to_numpy(dtype=float)
    churned = at_cal["churned"].to_numpy()

    calibration = lines[lines["order_date"] < pd.Timestamp(CDNOW_CALIBRATION_END)]
    bg, params = bgnbd_baseline(calibration, cutoff=CDNOW_CALIBRATION_END,
                                horizon_days=CDNOW_HOLDOUT_DAYS,
                                customers=at_cal["customer_id"])
    methods = {"bgnbd_gg": {"transactions": bg["expected_purchases"].to_numpy(),
                            "spend": bg["expected_spend"].to_numpy(),
                            "churn": -bg["expected_purchases"].to_numpy()}}

    last_inner = CDNOW_CALIBRATION_END - dt.timedelta(days=CDNOW_INNER_HORIZON_DAYS)
    inner = sorted(c for c in (last_inner - dt.timedelta(days=k * CDNOW_INNER_STEP_DAYS)
                               for k in range(20)) if c >= dt.date(1997, 2, 15))
    snaps = build_snapshots(con, cutoffs=inner, horizon_days=CDNOW_INNER_HORIZON_DAYS)
    train = snaps[snaps["cutoff"] < pd.Timestamp(inner[-1])].reset_index(drop=True)
    valid = snaps[snaps["cutoff"] == pd.Timestamp(inner[-1])].reset_index(drop=True)
    score = build_features(con, cutoff=CDNOW_CALIBRATION_END,
                           horizon_days=CDNOW_INNER_HORIZON_DAYS, labels=False)
    cols = feature_columns(train)
    cats = categories_of(train, cols)
    xt, xv, xs = (prepare_matrix(f, cols, cats) for f in (train, valid, score))
    scale = CDNOW_HOLDOUT_DAYS / CDNOW_INNER_HORIZON_DAYS
    # trained as the model step trains them (analysis.models.fit_and_evaluate): the churn
    # candidates by its own function, the value models stopped early on the same half of
    # the validation cutoff's customers
    churn, logistic, _ = fit_churn_candidates(xt, train["churned"], xv, valid["churned"],
                                              seed=seed)
    tune, _ = split_validation(valid["churned"], seed=seed)
    spend, count = (ValueModel(seed=seed).fit(xt, train[target], xv.iloc[tune],
                                              valid[target].iloc[tune])
                    for target in ("future_spend", "future_orders"))
    probabilities = candidate_probabilities(churn, logistic, xs)
    methods["model"] = {"transactions": count.predict(xs) * scale,
                        "spend": spend.predict(xs) * scale,
                        "churn": probabilities["model"]}
    methods["logistic"] = {"churn": probabilities["logistic"]}
    methods["rfm"] = {"transactions": rfm_lookup(train, score, target="future_orders") * scale,
                      "spend": rfm_lookup(train, score, target="future_spend") * scale,
                      "churn": rfm_lookup(train, score, target="churned")}
    last = score["spend_last_horizon"].clip(lower=0).to_numpy() * scale
    methods["last_period"] = {"spend": last,
                              "transactions": score["orders_90d"].to_numpy() * scale,
                              "churn": -last}
    seconds = time.perf_counter() - start

    from sklearn.metrics import roc_auc_score

    holdout: dict = {"actual": {"customers": int(len(at_cal)),
                                "transactions": int(actual_tx.sum()),
                                "spend": round(float(actual_spend.sum()), 2),
                                "share_no_purchase": round(float(churned.mean()), 4)}}
    for name, pred in methods.items():
        row = {}
        if "transactions" in pred:
            p = np.asarray(pred["transactions"], dtype=float)
            row.update(transactions_mae=float(np.mean(np.abs(p - actual_tx))),
                       transactions_rmse=float(np.sqrt(np.mean((p - actual_tx) ** 2))),
                       transactions_corr=float(np.corrcoef(p, actual_tx)[0, 1]),
                       transactions_total=float(p.sum()))
        if "spend" in pred:
            p = np.asarray(pred["spend"], dtype=float)
            top = np.argsort(-p, kind="stable")[: round(0.1 * len(p))]
            row.update(spend_mae=float(np.mean(np.abs(p - actual_spend))),
                       spend_rmse=float(np.sqrt(np.mean((p - actual_spend) ** 2))),
                       spend_spearman=float(stats_spearman(p, actual_spend)),
                       spend_gini=normalized_gini(actual_spend, p),
                       spend_top_decile_capture=float(actual_spend[top].sum()
                                                      / actual_spend.sum()),
                       spend_total=float(p.sum()))
        row["churn_auc"] = float(roc_auc_score(churned, pred["churn"]))
        holdout[name] = {k: round(v, 4) for k, v in row.items()}
    report = {
        "sample": {"customers": int(len(s)),
                   "bgnbd": {**{k: round(v, 4) for k, v in bg_s.params_.items()},
                             "loglik": round(bg_s.loglik_, 2)},
                   "gamma_gamma": {k: round(v, 4) for k, v in gg_s.params_.items()}},
        "full_calibration_params": params,
        "holdout": holdout,
        "seconds_models": round(seconds, 1),
    }
    (out / "cdnow.json").write_text(json.dumps(report, indent=2))
    (out / "cdnow.md").write_text(_cdnow_markdown(report))
    return report


def stats_spearman(a, b) -> float:
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


def _cdnow_markdown(r: dict) -> str:
    s = r["sample"]
    rows = ["## CDNOW (real data, published reference figures)", "",
            f"BG/NBD on the 2,357-customer sample: r = {s['bgnbd']['r']:.3f}, alpha = "
            f"{s['bgnbd']['alpha']:.3f}, a = {s['bgnbd']['a']:.3f}, b = {s['bgnbd']['b']:.3f}, "
            f"log-likelihood {s['bgnbd']['loglik']:,.1f} (published: 0.243, 4.414, 0.793, "
            f"2.426, -9,582.4). Gamma-Gamma: p = {s['gamma_gamma']['p']:.2f}, q = "
            f"{s['gamma_gamma']['q']:.2f}, gamma = {s['gamma_gamma']['gamma']:.2f} "
            f"(published: 6.25, 3.74, 15.44).", "",
            "Holdout 1997-10-01..1998-06-30, full log; the project's models trained on "
            "calibration data only:", "",
            "| method | tx MAE | tx corr | spend MAE | spend Spearman | spend Gini | "
            "top-decile capture | churn AUC |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["holdout"].items():
        if name == "actual":
            continue
        cell = (lambda k, f=".3f": format(m[k], f) if k in m else "")
        rows.append(f"| {name} | {cell('transactions_mae')} | {cell('transactions_corr')} | "
                    f"{cell('spend_mae', '.1f')} | {cell('spend_spearman')} | "
                    f"{cell('spend_gini')} | {cell('spend_top_decile_capture')} | "
                    f"{cell('churn_auc')} |")
    a = r["holdout"]["actual"]
    rows += ["", f"Actual: {a['transactions']:,} repeat transactions, {a['spend']:,.0f} spent, "
                 f"{a['share_no_purchase']:.1%} of customers bought nothing. Reference "
                 "figures (standard tools): BG/NBD+GG tx MAE 0.819, corr 0.669, spend MAE "
                 "32.7, Gini 0.672, top decile 0.516, churn AUC 0.763; plain XGBoost on "
                 "RFM features: corr 0.695, spend MAE 31.0, Gini 0.671, top decile 0.525, "
                 "churn AUC 0.770.",
             "", "Reproduce: `python -m analysis bench cdnow --data ../shared/datasets/cdnow "
                 "--out bench/out/cdnow && cp bench/out/cdnow/cdnow.json bench/out/cdnow/cdnow.md "
                 "bench/results/ && python -m analysis bench results`"]
    return "\n".join(rows)


def evaluate_strategy(processed_dir: Path, data: Path, params, world) -> dict:
    """Judge a run's retention targeting and phase-out list with the ground truth.

    The true value of contacting a customer: in the demo, a contact stretches a live
    customer's remaining lifetime by 1 / (1 - treatment effect), so it is worth the
    margin of the extra days alive within the next year (true purchase rate x true mean
    order value x margin rate per day), minus the contact and offer cost. The oracle
    of probabilities contacts every customer whose *expected* true value is positive
    (it knows who is alive, their true dropout hazard at the end of the data, raised by
    a complaint and lowered by the past campaign, and their true effect, not when they
    will drop); the
    perfect-foresight oracle contacts everyone whose realised value is positive. Both
    target sets are valued on realised outcomes. Phase-out is judged on true future
    profit (next year's margin minus the cost to serve its orders; customers who tie,
    mostly those who buy nothing, share their average rank) and on true expected profit
    (from the true rates and hazard).
    """
    processed_dir, data = Path(processed_dir), Path(data)
    decided = pd.read_parquet(processed_dir / "strategy" / "customers.parquet")
    scored = pd.read_parquet(processed_dir / "customers.parquet")
    truth = pd.read_parquet(data / "ground_truth" / "customers.parquet")
    future = pd.read_parquet(data / "ground_truth" / "future_orders.parquet")
    in_campaign = (decided["in_campaign"] if "in_campaign" in decided
                   else decided["targeted"]).astype(bool)
    campaign_file = processed_dir / "strategy" / "campaign.csv"
    campaign_ids = (set(pd.read_csv(campaign_file, dtype={"customer_id": str})["customer_id"])
                    if campaign_file.is_file() else None)
    retain_ids = set(decided.loc[decided["action"].str.startswith(RETAIN_PREFIX),
                                 "customer_id"].astype(str))
    decided = decided.assign(targeted=in_campaign)
    d = (decided[["customer_id", "targeted", "phaseout_candidate", "margin_rate_used",
                  "retention_gain", "value_if_retained"]]
         .merge(scored[["customer_id", "churn_probability", "lifecycle_stage"]],
                on="customer_id")
         .merge(truth, on="customer_id", how="left"))
    as_of = pd.Timestamp(world.as_of)
    remaining = (d["dropout_date"] - as_of).dt.days.to_numpy(dtype=float)
    effect = d["treatment_effect"].to_numpy()
    alive = remaining >= 0
    stretched = np.where(alive, remaining / (1 - effect), 0.0)
    extra_days = np.clip(np.minimum(stretched, 365) - np.clip(remaining, 0, 365), 0, None)
    daily_margin = (d["purchase_rate_per_day"] * d["mean_order_value"]
                    * d["margin_rate_used"]).to_numpy()
    cost = params.contact_cost + params.offer_cost
    true_gain = np.where(alive, extra_days * daily_margin, 0.0) - cost
    oracle = float(np.clip(true_gain, 0, None).sum())
    # the oracle of probabilities: knows who is alive, their true hazard and effect (not
    # when they will drop): expected extra days alive within the year, from the
    # expected alive time (1 - e^{-mT}) / m with and without the lowered hazard
    mu = d["dropout_hazard_now_per_day"].to_numpy()
    alive_now = (d["dropout_date"] >= as_of).to_numpy()
    untreated = (1 - np.exp(-mu * 365)) / mu
    lowered = mu * (1 - effect)
    treated = (1 - np.exp(-lowered * 365)) / lowered
    expected_gain = np.where(alive_now, (treated - untreated) * daily_margin, 0.0) - cost
    oracle_p = float(true_gain[expected_gain > 0].sum())
    targeted = d["targeted"].to_numpy(dtype=bool)
    ours = float(true_gain[targeted].sum())
    active = d["lifecycle_stage"].isin(ACTIVE_STAGES).to_numpy()
    n = int(targeted.sum())
    by_churn = np.argsort(-np.where(active, d["churn_probability"].to_numpy(), -1.0),
                          kind="stable")[:n]
    churn_ranking = float(true_gain[by_churn].sum()) if n else 0.0
    # one effect for everyone: the pooled rate x each customer's expected margin ranks by
    # expected margin alone
    by_margin = np.argsort(-np.where(active, d["value_if_retained"].fillna(-1.0).to_numpy(),
                                     -1.0), kind="stable")[:n]
    pooled_ranking = float(true_gain[by_margin].sum()) if n else 0.0
    # the run's own ranking at the depth that would have been best (known only with the
    # ground truth): separates what the ranking loses from what the chosen depth loses
    gain = d["retention_gain"].to_numpy(dtype=float)
    along = np.cumsum(true_gain[np.argsort(-np.where(np.isnan(gain), -np.inf, gain),
                                           kind="stable")][: int(np.isfinite(gain).sum())])
    best_depth = int(np.argmax(along) + 1) if len(along) else 0
    done = future[future["status"] == "completed"]
    per_order = done.groupby(["customer_id", "order_id"]).agg(
        margin=("margin", "sum"), channel=("channel", "first"))
    per_order["profit"] = per_order["margin"] - per_order["channel"].map(
        params.cost_per_order_by_channel).astype(float).fillna(params.cost_per_order)
    true_profit = (per_order.groupby(level="customer_id")["profit"].sum()
                   .reindex(d["customer_id"], fill_value=0.0).to_numpy()
                   - params.cost_per_account_year)
    # top half by rank, ties sharing their average rank: most customers buy nothing next
    # year and tie at minus the account cost, so none of them counts as top half
    top_half = pd.Series(true_profit).rank(ascending=False, method="average").to_numpy() \
        <= len(d) / 2
    # the same on expected rather than realised profit (true rates, hazard, channel)
    channel_cost = d["preferred_channel"].map(params.cost_per_order_by_channel).astype(
        float).fillna(params.cost_per_order).to_numpy()
    expected_profit = np.where(alive_now, untreated, 0.0) * d["purchase_rate_per_day"].to_numpy() \
        * (d["mean_order_value"].to_numpy() * d["margin_rate_used"].to_numpy() - channel_cost) \
        - params.cost_per_account_year
    top_half_expected = pd.Series(expected_profit).rank(
        ascending=False, method="average").to_numpy() <= len(d) / 2
    listed = d["phaseout_candidate"].to_numpy(dtype=bool)
    fairness = pd.read_parquet(processed_dir / "strategy" / "fairness.parquet")
    flags = fairness[fairness["flag"]] if len(fairness) else fairness
    retention = json.loads((processed_dir / "strategy" / "retention.json").read_text())
    uplift_path = processed_dir / "strategy" / "margin_uplift.parquet"
    uplift = pd.read_parquet(uplift_path) if uplift_path.is_file() else pd.DataFrame()
    overall = (uplift.set_index("group").loc["all"] if len(uplift) and "all" in set(uplift["group"])
               else None)
    # the uplift learner's out-of-time judgement on the latest campaigns (observed outcomes)
    judged = (retention.get("uplift_model") or {}).get("evaluation") or {}
    hazard = retention.get("hazard_effect") or {}
    return {
        "campaign_size": n,
        "retention_method": retention.get("method"),
        "uplift_rate_used": retention.get("uplift_rate_used"),
        "uplift_ci": ([round(float(overall["ci_low"]), 4), round(float(overall["ci_high"]), 4)]
                      if overall is not None else None),
        "value_window_days": retention.get("value_window_days"),
        "hazard_effect": ({k: hazard[k] for k in ("effect", "se", "ci_low", "ci_high",
                                                  "n_campaigns")} if hazard else None),
        "profit_oracle": round(oracle, 2),
        "profit_targeted": round(ours, 2),
        "profit_churn_ranking": round(churn_ranking, 2),
        "profit_capture_vs_oracle": round(ours / oracle_p, 4) if oracle_p else None,
        "profit_capture_churn_ranking": round(churn_ranking / oracle_p, 4) if oracle_p
        else None,
        "profit_capture_pooled_ranking": round(pooled_ranking / oracle_p, 4) if oracle_p
        else None,
        "campaign_matches_actions": campaign_ids == retain_ids,
        "oracle_campaign_size": int((expected_gain > 0).sum()),
        "best_depth_for_ranking": best_depth,
        "profit_capture_at_best_depth": round(float(along.max()) / oracle_p, 4)
        if len(along) and oracle_p else None,
        "profit_oracle_of_probabilities": round(oracle_p, 2),
        "profit_capture_vs_perfect_foresight": round(ours / oracle, 4) if oracle else None,
        "perfect_foresight_campaign_size": int((true_gain > 0).sum()),
        "phaseout_count": int(listed.sum()),
        "phaseout_true_value_top_half": int((listed & top_half).sum()),
        "phaseout_expected_value_top_half": int((listed & top_half_expected).sum()),
        "phaseout_true_buyers": int((listed & (true_profit + params.cost_per_account_year
                                               != 0)).sum()),
        "fairness_flags": [f"{r.attribute}={r.group}: {r.action} (ratio {r.ratio:.2f})"
                           for r in flags.itertuples()],
        "qini_auuc": ({k: judged["auuc"].get(k) for k in ("model", "pooled", "churn")}
                      if judged.get("auuc") else None),
        "uplift_ranking_winner": judged.get("winner"),
    }


def bench_strategy(*, customers: int, seed: int, out: str | Path,
                   horizon_days: int = 90) -> dict:
    """The strategy step judged against the demo world's ground truth.

    Runs the whole pipeline (:func:`analysis.report.run_pipeline`) on a generated world
    and judges it with :func:`evaluate_strategy`. ``profit_capture_vs_oracle`` is the
    true value of the customers the pipeline targeted over that of the oracle;
    ``profit_capture_churn_ranking`` the same for the same number of active customers
    ranked by churn probability alone. Writes ``OUT/strategy.json``.
    """
    import yaml

    out = Path(out).resolve()   # the generated config names absolute paths
    data = out / f"data-{customers}-{seed}"
    if not (data / "transactions.parquet").is_file():
        write_demo(data, n_customers=customers, seed=seed)
    config = out / "strategy-config.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"bench-strategy-{customers}-{seed}", "seed": seed,
        "tables": {name: {"path": str(data / f"{name}.parquet")}
                   for name in ("transactions", "customers", "interactions", "campaign")},
        "protected": ["gender", "age_band"],
        "analysis": {"horizon_days": horizon_days},
        "output": {"processed_dir": str(out / "processed"), "reports_dir": str(out / "reports")},
    }))
    start = time.perf_counter()
    result = run_pipeline(config, run_id="bench", log=lambda line: None)
    seconds = time.perf_counter() - start
    report = evaluate_strategy(result.processed_dir, data, load_config(config).strategy,
                               DemoWorld(n_customers=customers, seed=seed))
    report.update(customers=customers, seed=seed, horizon_days=horizon_days,
                  seconds_pipeline=round(seconds, 1))
    (out / "strategy.json").write_text(json.dumps(report, indent=2))
    return report
