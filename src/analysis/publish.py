"""Where a run's folders live while it runs and how they are published.

A run builds everything in temporary folders (``.tmp-<run_id>-*``) beside its
destinations, each claimed by a lock file the run holds (:func:`claimed`), and moves them
into place only when every stage succeeded (:func:`swap_into_place`), switching
``reports/latest`` last (:func:`point_latest`), under one publish lock
(:func:`publish_lock`). A failed run's report goes to ``reports/failed/<run_id>/``
(:func:`keep_failed`) and the last good report stays; the folders a killed run left behind
are removed by the next run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from analysis.errors import PipelineError

__all__ = [
    "check_run_id",
    "claimed",
    "keep_failed",
    "lock_file",
    "point_latest",
    "previous_run",
    "publish_lock",
    "remove_stale_temporaries",
    "swap_into_place",
]


def keep_failed(tmp_report: Path, tmp_processed: Path, reports_root: Path,
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


def swap_into_place(tmp: Path, final: Path) -> Path:
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest(reports_root: Path, run_id: str) -> None:
    latest = reports_root / "latest"
    tmp = reports_root / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(run_id, tmp)
    if latest.exists() and not latest.is_symlink():
        shutil.rmtree(latest)
    os.replace(tmp, latest)


@contextlib.contextmanager
def claimed(*folders: Path) -> Iterator[None]:
    """Mark ``folders``, a live run's temporary folders, as in use while the block runs.

    Each gets a lock file beside it (``<folder>.lock``) that this run holds locked
    (``flock``) until the block ends, and then removes; the kernel drops the lock when
    the process dies, however it dies, which is how :func:`remove_stale_temporaries`
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
                os.rename(fresh, lock_file(folder))
            except BaseException:
                os.close(fd)
                fresh.unlink(missing_ok=True)
                raise
            held.append((lock_file(folder), fd))
        yield
    finally:
        for lock, fd in held:
            lock.unlink(missing_ok=True)
            os.close(fd)


def remove_stale_temporaries(processed_root: Path, reports_root: Path, *,
                              log: Callable[[str], None] = print) -> list[Path]:
    """Remove the temporary folders (``.tmp-*``) that runs which died (killed, out of
    memory, machine stopped) left in the output folders, with their lock files.

    A folder is stale when no process holds its lock file (:func:`claimed`): a run
    that is still going, in this process or another, holds it, and its folders are left
    alone. Runs under the publish lock, so it never overlaps a run moving its folders
    into place. Logs one line naming what it removed.

    Returns
    -------
    list of Path
        The folders removed.
    """
    removed = []
    with publish_lock(reports_root):
        for root in dict.fromkeys([processed_root, reports_root]):
            if not root.is_dir():
                continue
            names = sorted({p.name.removesuffix(".lock") for p in root.glob(".tmp-*")})
            for name in names:
                folder = root / name
                with _unless_held(lock_file(folder)) as stale:
                    if not stale:
                        continue
                    if folder.is_dir() and not folder.is_symlink():
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(folder)
                    lock_file(folder).unlink(missing_ok=True)
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


def lock_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


@contextlib.contextmanager
def publish_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".publish.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def previous_run(reports_root: Path, processed_root: Path, run_id: str,
                  mode: str = "transactions", name: str | None = None) -> Path | None:
    """The processed folder of the last successful run of the same mode and, given
    ``name``, of the config of that name: what reports/latest points at, or else the
    newest such run in the history. Another dataset whose config shares the output
    folders is no baseline (a snapshot run for an order-log run, nor a shop's run for
    another shop's)."""
    candidates = []
    latest = reports_root / "latest"
    if latest.is_symlink():
        candidates.append(os.readlink(latest))
    history = processed_root / "history.parquet"
    if name is not None and history.is_file():
        runs = pd.read_parquet(history)
        if "config" in runs:
            candidates += runs.loc[runs["config"] == name, "run_id"].astype(str)[::-1].tolist()
    for previous in candidates:
        folder = processed_root / previous
        if previous == run_id or not (folder / "customers.parquet").is_file():
            continue
        metrics = folder / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            if m.get("mode", mode) != mode or (
                    name is not None and m.get("config", {}).get("name", name) != name):
                continue
        return folder
    return None


def check_run_id(run_id: str) -> None:
    if not run_id or not all(c.isalnum() or c in "-_." for c in run_id) or run_id.startswith(
            ".") or run_id in {"latest", "failed"}:
        raise PipelineError(f"run id {run_id!r} must be letters, digits, '-', '_' or '.', "
                            f"not start with '.', and not be 'latest' or 'failed'")
