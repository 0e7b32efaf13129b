"""Run the notebooks with papermill, render them with nbconvert, publish atomically.

A run builds everything in temporary folders next to its destinations and moves them
into place only when every notebook succeeded; ``reports/latest`` is switched last. A
failed run keeps its notebooks (and their HTML, showing the error) under
``reports/failed/<run_id>/`` and leaves the last good report untouched.

The folders of a run while it runs, and how they are published, are
:mod:`analysis.publish`; the peak memory of each stage's kernel, :mod:`analysis.memory`.
The HTML pieces the notebooks write with (sentences whose numbers and names come from
the data, tables, cards) live in :mod:`analysis.markup`; they are re-exported here for
the notebooks that use them as ``report.paragraph`` and so on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import resource
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from analysis.config import Config, load_config
from analysis.engine import require_spark, shared_spark_driver
from analysis.errors import PipelineError
from analysis.markup import (
    absent_note,
    heading,
    html_table,
    kpi_cards,
    link_list,
    paragraph,
)
from analysis.memory import KernelMemory, peak_rss_mb
from analysis.monitor import append_history, run_kpis
from analysis.narrative import LISTS_DIR, write_lists
from analysis.publish import (
    check_run_id,
    claimed,
    keep_failed,
    point_latest,
    previous_run,
    publish_lock,
    remove_stale_temporaries,
    swap_into_place,
)
from analysis.store import RunStore

__all__ = [
    "NOTEBOOKS",
    "absent_note",
    "RunResult",
    "heading",
    "html_table",
    "kpi_cards",
    "executive_title",
    "library_versions",
    "link_list",
    "paragraph",
    "render_notebook",
    "notebook_title",
    "notebooks_for",
    "run_pipeline",
]

#: Notebooks in run order per mode; the last, the executive report, is rendered without
#: code.
NOTEBOOKS = ("01_data_quality.ipynb", "02_customer_profile.ipynb", "03_churn_model.ipynb",
             "04_value_model.ipynb", "05_strategy.ipynb", "00_executive_report.ipynb")
SNAPSHOT_NOTEBOOKS = ("01_data_quality.ipynb", "snapshot_02_churn_model.ipynb",
                      "snapshot_03_portfolio.ipynb", "snapshot_05_strategy.ipynb",
                      "snapshot_00_executive_report.ipynb")
EXECUTIVE = "00_executive_report.ipynb"
#: What a run's Spark driver prints (analysis.engine: spark), in the run's processed folder
SPARK_LOG = "spark-driver.log"


def notebooks_for(mode: str) -> tuple[str, ...]:
    """The notebooks a run of ``mode`` executes, in order (executive report last)."""
    return SNAPSHOT_NOTEBOOKS if mode == "snapshot" else NOTEBOOKS
_TEMPLATES = Path(__file__).parent / "templates"
_LIBRARIES = ("analysis", "customer-strategy-lab", "pandas", "numpy", "duckdb", "pyarrow",
              "pandera", "scikit-learn", "xgboost-cpu", "xgboost", "matplotlib", "seaborn",
              "papermill", "nbconvert")


@dataclass
class RunResult:
    """What a successful run produced."""

    run_id: str
    processed_dir: Path
    report_dir: Path
    index_html: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)


def default_run_id(now: dt.datetime | None = None) -> str:
    """A sortable run id from the current UTC time, e.g. ``20261123-044512``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%d-%H%M%S")


def run_pipeline(config_path: str | Path, *, run_id: str | None = None,
                 as_of: dt.date | None = None, notebooks_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> RunResult:
    """Execute the notebooks in order for one run and publish the result.

    Parameters
    ----------
    config_path : the run configuration (YAML).
    run_id : folder name of the run (default: UTC timestamp). Re-using an id replaces
        that run atomically.
    as_of : scoring date (default: the config's, else the day after the last order).
    notebooks_dir : where the notebooks are (default: the project's ``notebooks/``).
    log : where progress lines go.

    Returns
    -------
    RunResult

    Raises
    ------
    PipelineError
        Naming the notebook and cell that failed; the failed notebook and its HTML are
        kept under ``reports/failed/<run_id>/``.
    """
    run_id = run_id or default_run_id()
    check_run_id(run_id)
    config = load_config(config_path)
    if _on_spark(config):                       # (before anything is written)
        require_spark(config_path)
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else _project_notebooks()
    processed_root, reports_root = config.output.processed_dir, config.output.reports_dir
    remove_stale_temporaries(processed_root, reports_root,
                              log=lambda line: log(f"run {run_id}: {line}"))
    token = f".tmp-{run_id}-{uuid.uuid4().hex[:8]}"
    tmp_processed, tmp_report = processed_root / token, reports_root / token
    with claimed(tmp_processed, tmp_report):
        tmp_processed.mkdir(parents=True)
        (tmp_report / "notebooks").mkdir(parents=True)
        return _build_and_publish(config, config_path, run_id=run_id, as_of=as_of,
                                  notebooks_dir=notebooks_dir, tmp_processed=tmp_processed,
                                  tmp_report=tmp_report, log=log)


def _build_and_publish(config: Config, config_path: str | Path, *, run_id: str,
                       as_of: dt.date | None, notebooks_dir: Path, tmp_processed: Path,
                       tmp_report: Path, log: Callable[[str], None]) -> RunResult:
    """Run the notebooks into the run's temporary folders, then move them into place."""
    processed_root, reports_root = config.output.processed_dir, config.output.reports_dir
    previous = previous_run(reports_root, processed_root, run_id, config.mode, config.name)
    params = {
        "config_path": str(Path(config_path).resolve()),
        "run_id": run_id,
        "as_of": None if as_of is None else as_of.isoformat(),
        "processed_dir": str(tmp_processed),
        "report_dir": str(tmp_report),
        # link from the published report folder to the published processed folder
        "processed_href": os.path.relpath(processed_root / run_id, reports_root / run_id),
        # the last successful run, for "what changed" ("" on the first run)
        "previous_processed_dir": str(previous) if previous else "",
    }
    stage_seconds: dict[str, float] = {}
    stage_peak_mb: dict[str, float] = {}
    notebooks = notebooks_for(config.mode)
    log(f"run {run_id}: config {config_path}, {len(notebooks)} notebooks")
    # on Spark, the stages share one driver (a Java process), started and warmed up once
    driver = (shared_spark_driver(config.spark.master, config.spark.conf,
                                  log=tmp_processed / SPARK_LOG, path=config_path)
              if _on_spark(config) else contextlib.nullcontext())
    try:
        start = time.perf_counter()
        with driver as driver_pid:
            if driver_pid is not None:
                stage_seconds["spark_driver"] = round(time.perf_counter() - start, 2)
                log(f"run {run_id}: the stages' Spark driver started in "
                    f"{stage_seconds['spark_driver']:.1f} s (its messages: {SPARK_LOG} in "
                    f"the run's processed folder)")
            for i, name in enumerate(notebooks, start=1):
                log(f"run {run_id}: stage {i}/{len(notebooks)} {name} ...")
                if name == notebooks[-1]:
                    # every step has written its table: the customer table people read, once
                    start = time.perf_counter()
                    # (streamed by DuckDB within its share of the stage's memory, so
                    # that no number of customers is held whole, on either engine)
                    limit = config.analysis.duckdb_memory_limit
                    RunStore(tmp_processed).export_customers(memory_limit=limit)
                    # the lists travel with the report, and the executive page links them
                    write_lists(tmp_processed, tmp_report / LISTS_DIR, memory_limit=limit)
                    # (timed as a step of its own: a million customers' files took 55 s,
                    # which no stage's time counted)
                    stage_seconds["export"] = round(time.perf_counter() - start, 2)
                    log(f"run {run_id}: customer table and lists written in "
                        f"{stage_seconds['export']:.1f} s")
                start = time.perf_counter()
                with KernelMemory(shared=driver_pid) as memory:
                    _execute(notebooks_dir / name, tmp_report / "notebooks" / name, params,
                             run_id, tmp_report, processed_root, reports_root)
                stage_seconds[name] = round(time.perf_counter() - start, 2)
                stage_peak_mb[name] = memory.peak_mib
                log(f"run {run_id}: stage {i}/{len(notebooks)} {name} done in "
                    f"{stage_seconds[name]:.1f} s (its kernel peaked at "
                    f"{stage_peak_mb[name]:,.0f} MiB)")
        start = time.perf_counter()
        # the published notebooks name the folders the run is published to, so that
        # they read, and re-run, as they will be found: never the temporary ones
        published = {str(tmp_processed): str(processed_root / run_id),
                     str(tmp_report): str(reports_root / run_id)}
        for name in notebooks:
            executed = tmp_report / "notebooks" / name
            _replace_paths(executed, published)
            if name == notebooks[-1]:
                render_notebook(executed, tmp_report / "index.html", executive=True,
                                title=executive_title(config.name,
                                                      _scoring_date(tmp_processed)))
            else:
                render_notebook(executed, executed.with_suffix(".html"), executive=False)
        stage_seconds["render"] = round(time.perf_counter() - start, 2)
        _write_metrics(tmp_processed, config, run_id=run_id, params=params,
                       stage_seconds=stage_seconds, stage_peak_mb=stage_peak_mb)
    except PipelineError:
        raise
    except BaseException:
        keep_failed(tmp_report, tmp_processed, reports_root, processed_root, run_id)
        raise
    with publish_lock(reports_root):
        processed_dir = swap_into_place(tmp_processed, processed_root / run_id)
        report_dir = swap_into_place(tmp_report, reports_root / run_id)
        point_latest(reports_root, run_id)
        append_history(processed_root / "history.parquet",
                       {"run_id": run_id, "config": config.name,
                        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        **run_kpis(processed_dir)})
    log(f"run {run_id}: done in {sum(stage_seconds.values()):.1f} s; report "
        f"{report_dir / 'index.html'}")
    return RunResult(run_id=run_id, processed_dir=processed_dir, report_dir=report_dir,
                     index_html=report_dir / "index.html", stage_seconds=stage_seconds)


def render_notebook(notebook: str | Path, out_html: str | Path, *, executive: bool,
                    title: str | None = None) -> Path:
    """Render an executed notebook to one self-contained HTML file.

    ``executive=True`` uses the project's executive template: no code, no prompts, no
    stderr, no scripts. Analyst pages keep their code. Either way images are embedded as
    data URIs and described by their output's text form (a chart's title, see
    :func:`analysis.plots.describe_figure`), and nothing is loaded from the network.
    ``title`` is the page's title; by default the notebook's first heading.
    """
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    options = dict(exclude_input=True, exclude_input_prompt=True,
                   exclude_output_prompt=True) if executive else {}
    exporter = HTMLExporter(template_name="executive" if executive else "analyst",
                            extra_template_basedirs=[str(_TEMPLATES)],
                            # so that the executive template can extend 'analyst/...'
                            extra_template_paths=[str(_TEMPLATES)], embed_images=True,
                            **options)
    # the lab template titles the page with the notebook's metadata ``title``, else the
    # resources' name
    name = title or notebook_title(nb) or Path(notebook).stem
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}})
    out_html = Path(out_html)
    out_html.write_text(body, encoding="utf-8")
    return out_html


def executive_title(config_name: str, scoring_date: str) -> str:
    """The executive page's title: ``"Customer strategy report: <name>, <date>"``."""
    return f"Customer strategy report: {config_name}, {scoring_date}".rstrip(", ")


def notebook_title(nb: nbformat.NotebookNode) -> str:
    """The text of a notebook's first level-1 Markdown heading (``""`` if none)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return ""


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# --------------------------------------------------------------------------- helpers


def _on_spark(config: Config) -> bool:
    """Whether a run's stages query Spark: a transactions run with ``analysis.engine:
    spark`` (a snapshot, one row per customer, is never queried by an engine)."""
    return config.analysis.engine == "spark" and config.mode == "transactions"


def _kernel_manager() -> dict:
    """How papermill starts a stage's kernel: over Unix sockets where the system has them
    (and the runtime folder's path fits a socket's name), not TCP on localhost, which
    ipykernel warns on every start is unencrypted."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    if os.name != "posix" or len(jupyter_runtime_dir()) > 80:    # (sockets: 107 bytes)
        return {}

    class SocketKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            # each kernel's sockets under a name of their own (jupyter_client's default,
            # "kernel-ipc" in the working folder, is shared by kernels started together)
            folder = Path(jupyter_runtime_dir())
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder / f"csl-{uuid.uuid4().hex[:12]}")

    return {"kernel_manager_class": SocketKernelManager}


def _execute(source: Path, output: Path, params: dict, run_id: str, tmp_report: Path,
             processed_root: Path, reports_root: Path) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(source), str(output), parameters=params,
                                   kernel_name="python3", progress_bar=False,
                                   log_output=False, cwd=str(source.parent),
                                   **_kernel_manager())
    except PapermillExecutionError as exc:
        with contextlib.suppress(Exception):
            render_notebook(output, output.with_suffix(".html"), executive=False)
        kept = keep_failed(tmp_report, Path(params["processed_dir"]), reports_root,
                            processed_root, run_id)
        cell = exc.cell_index
        raise PipelineError(
            f"notebook {source.name} failed in cell {cell} (execution count "
            f"{exc.exec_count}): {exc.ename}: {exc.evalue}\n"
            f"  the failed notebook and its HTML are kept in {kept}\n"
            f"  the last good report was left untouched",
            notebook=source.name, cell=cell, kept=kept, cause=exc.ename) from None


def _replace_paths(notebook: Path, replacements: dict[str, str]) -> None:
    """Rewrite ``notebook`` with every occurrence of each key of ``replacements`` (a
    folder's path) in its cells, outputs and metadata replaced by its value."""
    order = sorted(replacements, key=len, reverse=True)

    def replaced(node):
        if isinstance(node, str):
            for old in order:
                node = node.replace(old, replacements[old])
            return node
        if isinstance(node, dict):
            return {key: replaced(value) for key, value in node.items()}
        if isinstance(node, list):
            return [replaced(value) for value in node]
        return node

    nb = nbformat.read(str(notebook), as_version=4)
    nbformat.write(nbformat.from_dict(replaced(nb)), str(notebook))


def _scoring_date(processed: Path) -> str:
    """The run's scoring date (ISO), as the profile step recorded it; "" if it did not."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        date = RunStore(processed).scoring_date()
        return date.isoformat() if date else ""
    return ""


def _write_metrics(processed: Path, config: Config, *, run_id: str, params: dict,
                   stage_seconds: dict[str, float],
                   stage_peak_mb: dict[str, float] | None = None) -> None:
    metrics: dict = {"run_id": run_id, "mode": config.mode, "config": config.to_dict(),
                     "parameters": {k: v for k, v in params.items()
                                    if k not in {"processed_dir", "report_dir",
                                                 "processed_href",
                                                 "previous_processed_dir"}},
                     "stage_seconds": stage_seconds,
                     # memory in MiB: the peak of each stage's own kernel (see
                     # KernelMemory), and of the process that ran them
                     "stage_peak_rss_mb": stage_peak_mb or {},
                     "stage_peak_per_kernel": True,
                     "runner_peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
                     "memory_limit": config.analysis.memory_limit,
                     "versions": library_versions()}
    for name in ("data_quality", "profile", "models"):
        path = processed / f"{name}.json"
        if path.is_file():
            metrics[name] = json.loads(path.read_text())
    path = processed / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=str))


def _project_notebooks() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "notebooks" / EXECUTIVE).is_file():
            return parent / "notebooks"
    cwd = Path.cwd() / "notebooks"
    if (cwd / EXECUTIVE).is_file():
        return cwd
    raise PipelineError("cannot find the notebooks folder; pass --notebooks DIR")


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("the pipeline runner needs a POSIX system (fcntl, symlinks)")
