"""Run the notebooks with papermill, render them with nbconvert, publish atomically.

A run builds everything in temporary folders next to its destinations and moves them
into place only when every notebook succeeded; ``reports/latest`` is switched last. A
failed run keeps its notebooks (and their HTML, showing the error) under
``reports/failed/<run_id>/`` and leaves the last good report untouched.

The HTML pieces the notebooks write with (sentences whose numbers and names come from
the data, tables, cards) live in :mod:`analysis.markup`; they are re-exported here for
the notebooks that use them as ``report.paragraph`` and so on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import html
import importlib.metadata
import json
import os
import resource
import platform
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from analysis.config import Config, load_config
from analysis.errors import PipelineError
from analysis.markup import (
    absent_note,
    heading,
    html_table,
    kpi_cards,
    link_list,
    paragraph,
)
from analysis.monitor import append_history, run_kpis
from analysis.narrative import LISTS_DIR, write_lists
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
    _check_run_id(run_id)
    config = load_config(config_path)
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else _project_notebooks()
    processed_root, reports_root = config.output.processed_dir, config.output.reports_dir
    _remove_stale_temporaries(processed_root, reports_root,
                              log=lambda line: log(f"run {run_id}: {line}"))
    token = f".tmp-{run_id}-{uuid.uuid4().hex[:8]}"
    tmp_processed, tmp_report = processed_root / token, reports_root / token
    with _claimed(tmp_processed, tmp_report):
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
    previous = _previous_run(reports_root, processed_root, run_id, config.mode)
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
    try:
        for i, name in enumerate(notebooks, start=1):
            log(f"run {run_id}: stage {i}/{len(notebooks)} {name} ...")
            if name == notebooks[-1]:
                # every step has written its table: the customer table people read, once
                RunStore(tmp_processed).export_customers()
                # the lists travel with the report, and the executive page links them
                write_lists(tmp_processed, tmp_report / LISTS_DIR)
            start = time.perf_counter()
            with KernelMemory() as memory:
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
        _keep_failed(tmp_report, tmp_processed, reports_root, processed_root, run_id)
        raise
    with _lock(reports_root):
        processed_dir = _swap_into_place(tmp_processed, processed_root / run_id)
        report_dir = _swap_into_place(tmp_report, reports_root / run_id)
        _point_latest(reports_root, run_id)
        append_history(processed_root / "history.parquet",
                       {"run_id": run_id, "finished_at": dt.datetime.now(dt.UTC).isoformat(
                           timespec="seconds"), **run_kpis(processed_dir)})
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


def _execute(source: Path, output: Path, params: dict, run_id: str, tmp_report: Path,
             processed_root: Path, reports_root: Path) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(source), str(output), parameters=params,
                                   kernel_name="python3", progress_bar=False,
                                   log_output=False, cwd=str(source.parent))
    except PapermillExecutionError as exc:
        with contextlib.suppress(Exception):
            render_notebook(output, output.with_suffix(".html"), executive=False)
        kept = _keep_failed(tmp_report, Path(params["processed_dir"]), reports_root,
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


def _keep_failed(tmp_report: Path, tmp_processed: Path, reports_root: Path,
                 processed_root: Path, run_id: str) -> Path:
    failed = reports_root / "failed" / run_id
    failed.parent.mkdir(parents=True, exist_ok=True)
    if failed.exists():
        shutil.rmtree(failed)
    if tmp_report.exists():
        tmp_report.rename(failed)
    if tmp_processed.exists():
        shutil.rmtree(tmp_processed, ignore_errors=True)
    return failed


def _peak_rss_mb(who: int) -> float:
    """Peak resident memory in MiB: of this process (``resource.RUSAGE_SELF``) or of the
    largest of its finished children, the notebook kernels (``RUSAGE_CHILDREN``)."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)      # Linux: kilobytes


class KernelMemory:
    """The peak resident memory (MiB) of the processes this process starts while the
    block runs: a notebook stage's kernel.

    The largest ``VmHWM`` (each process's own high-water mark, kept by Linux) read every
    ``interval`` seconds while they run, which misses at most what a process added in
    its last ``interval``. Only for a process too short to be read does it fall back to
    the rise of ``ru_maxrss`` over this process's children, which is less faithful: a
    child's ``ru_maxrss`` starts from its parent's resident size at the fork, so a large
    parent (a test process running the pipeline in-process) makes it read high.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._sampled = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> KernelMemory:
        self._before = _peak_rss_mb(resource.RUSAGE_CHILDREN)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        after = _peak_rss_mb(resource.RUSAGE_CHILDREN)
        self.peak_mib = (round(self._sampled, 1) if self._sampled
                         else after if after > self._before else 0.0)

    def _watch(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(self.interval):
            for pid in _children(me):
                self._sampled = max(self._sampled, _high_water_mib(pid))


def _children(ppid: str) -> list[str]:
    """Ids of the running processes whose parent is ``ppid`` (Linux ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            # the command name (field 2) is in parentheses and may hold spaces
            if stat.read_text().rpartition(")")[2].split()[1] == ppid:
                out.append(stat.parent.name)
    return out


def _high_water_mib(pid: str) -> float:
    """A process's peak resident memory so far (``VmHWM``), in MiB; 0 when gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


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
                     "runner_peak_rss_mb": _peak_rss_mb(resource.RUSAGE_SELF),
                     "memory_limit": config.analysis.memory_limit,
                     "versions": library_versions()}
    for name in ("data_quality", "profile", "models"):
        path = processed / f"{name}.json"
        if path.is_file():
            metrics[name] = json.loads(path.read_text())
    path = processed / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=str))


def _swap_into_place(tmp: Path, final: Path) -> Path:
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(reports_root: Path, run_id: str) -> None:
    latest = reports_root / "latest"
    tmp = reports_root / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(run_id, tmp)
    if latest.exists() and not latest.is_symlink():
        shutil.rmtree(latest)
    os.replace(tmp, latest)


@contextlib.contextmanager
def _claimed(*folders: Path) -> Iterator[None]:
    """Mark ``folders``, a live run's temporary folders, as in use while the block runs.

    Each gets a lock file beside it (``<folder>.lock``) that this run holds locked
    (``flock``) until the block ends, and then removes; the kernel drops the lock when
    the process dies, however it dies, which is how :func:`_remove_stale_temporaries`
    tells a dead run's folders from a live one's. The lock is taken before the file gets
    its name, so no cleaner ever finds a live run's lock file unlocked.
    """
    held: list[tuple[Path, int]] = []
    try:
        for folder in folders:
            folder.parent.mkdir(parents=True, exist_ok=True)
            fresh = folder.with_name(f".claim-{uuid.uuid4().hex}")
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(fresh, _lock_file(folder))
            except BaseException:
                os.close(fd)
                fresh.unlink(missing_ok=True)
                raise
            held.append((_lock_file(folder), fd))
        yield
    finally:
        for lock, fd in held:
            lock.unlink(missing_ok=True)
            os.close(fd)


def _remove_stale_temporaries(processed_root: Path, reports_root: Path, *,
                              log: Callable[[str], None] = print) -> list[Path]:
    """Remove the temporary folders (``.tmp-*``) that runs which died (killed, out of
    memory, machine stopped) left in the output folders, with their lock files.

    A folder is stale when no process holds its lock file (:func:`_claimed`): a run
    that is still going, in this process or another, holds it, and its folders are left
    alone. Runs under the publish lock, so it never overlaps a run moving its folders
    into place. Logs one line naming what it removed.

    Returns
    -------
    list of Path
        The folders removed.
    """
    removed = []
    with _lock(reports_root):
        for root in dict.fromkeys([processed_root, reports_root]):
            if not root.is_dir():
                continue
            names = sorted({p.name.removesuffix(".lock") for p in root.glob(".tmp-*")})
            for name in names:
                folder = root / name
                with _unless_held(_lock_file(folder)) as stale:
                    if not stale:
                        continue
                    if folder.is_dir() and not folder.is_symlink():
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(folder)
                    _lock_file(folder).unlink(missing_ok=True)
    if removed:
        log(f"removed {len(removed)} temporary folder(s) of runs that did not finish: "
            + ", ".join(str(p) for p in removed))
    return removed


@contextlib.contextmanager
def _unless_held(lock: Path) -> Iterator[bool]:
    """True (and the lock held for the block) when no process holds ``lock``, or it is
    missing; False when a live run holds it."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _lock_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".publish.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _previous_run(reports_root: Path, processed_root: Path, run_id: str,
                  mode: str = "transactions") -> Path | None:
    """The processed folder of the last successful run (what reports/latest points at),
    when it was a run of the same mode (a snapshot run is no baseline for an order-log
    run sharing the output folders, nor the reverse)."""
    latest = reports_root / "latest"
    if not latest.is_symlink():
        return None
    previous = os.readlink(latest)
    folder = processed_root / previous
    if previous == run_id or not (folder / "customers.parquet").is_file():
        return None
    metrics = folder / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("mode", mode) != mode:
        return None
    return folder


def _check_run_id(run_id: str) -> None:
    if not run_id or not all(c.isalnum() or c in "-_." for c in run_id) or run_id.startswith(
            ".") or run_id in {"latest", "failed"}:
        raise PipelineError(f"run id {run_id!r} must be letters, digits, '-', '_' or '.', "
                            f"not start with '.', and not be 'latest' or 'failed'")


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
