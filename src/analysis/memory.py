"""Peak memory of a run's processes, as Linux keeps it: of this process, and of each
notebook kernel a stage starts (:class:`KernelMemory`), recorded in ``metrics.json``."""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import threading
from pathlib import Path

__all__ = ["KernelMemory", "peak_rss_mb", "rss_bytes", "spill_directory"]


def peak_rss_mb(who: int) -> float:
    """Peak resident memory in MiB: of this process (``resource.RUSAGE_SELF``) or of the
    largest of its finished children, the notebook kernels (``RUSAGE_CHILDREN``)."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)      # Linux: kilobytes


def spill_directory() -> Path:
    """Where DuckDB writes what does not fit its memory limit (the system's temporary
    folder)."""
    return Path(tempfile.gettempdir()) / "csl-duckdb-spill"


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (Linux ``/proc``; 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class KernelMemory:
    """The peak resident memory (MiB) of the processes this process starts while the
    block runs: a notebook stage's kernel, with the processes the kernel starts in turn
    (the Java process of a local Spark session, ``analysis.engine: spark``).

    The largest of each child's ``VmHWM`` (its own high-water mark, kept by Linux) and
    of the resident memory of the child and all its descendants together, read every
    ``interval`` seconds while they run, which misses at most what a process added in
    its last ``interval``. Only for a process too short to be read does it fall back to
    the rise of ``ru_maxrss`` over this process's children, which is less faithful: a
    child's ``ru_maxrss`` starts from its parent's resident size at the fork, so a large
    parent (a test process running the pipeline in-process) makes it read high.

    ``shared`` is the id of a process that serves the kernels and outlives each (a run's
    shared Spark driver, :func:`analysis.engine.shared_spark_driver`): its resident
    memory, with its descendants', is added to the kernel's, read at the same moment.
    """

    def __init__(self, interval: float = 0.2, *, shared: int | None = None):
        self.interval = interval
        self.shared = None if shared is None else str(shared)
        self._sampled = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> KernelMemory:
        self._before = peak_rss_mb(resource.RUSAGE_CHILDREN)
        # (a process started before the block, e.g. a Java process a test session keeps,
        # is not the block's)
        self._earlier = set(_children(str(os.getpid())))
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        after = peak_rss_mb(resource.RUSAGE_CHILDREN)
        self.peak_mib = (round(self._sampled, 1) if self._sampled
                         else after if after > self._before else 0.0)

    def _watch(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(self.interval):
            beside = (sum(_resident_mib(p) for p in _tree(self.shared)) if self.shared
                      else 0.0)
            for pid in _children(me):
                if pid != self.shared and pid not in self._earlier:
                    self._sampled = max(self._sampled, _high_water_mib(pid),
                                        sum(_resident_mib(p) for p in _tree(pid)) + beside)


def _children(ppid: str) -> list[str]:
    """Ids of the running processes whose parent is ``ppid`` (Linux ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            # the command name (field 2) is in parentheses and may hold spaces
            if stat.read_text().rpartition(")")[2].split()[1] == ppid:
                out.append(stat.parent.name)
    return out


def _tree(pid: str) -> list[str]:
    """``pid`` and the ids of all its running descendants."""
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(_children(out[-1]))
    return out


def _high_water_mib(pid: str) -> float:
    """A process's peak resident memory so far (``VmHWM``), in MiB; 0 when gone."""
    return _status_mib(pid, "VmHWM:")


def _resident_mib(pid: str) -> float:
    """A process's resident memory now (``VmRSS``), in MiB; 0 when gone."""
    return _status_mib(pid, "VmRSS:")


def _status_mib(pid: str, field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0
