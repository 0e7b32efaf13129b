"""The run store: where a run's customer tables live, and how they are read back.

A run folder (``data/processed/<run_id>/``) is written by the steps in order, and each
step writes its own per-customer table once; no step rewrites an earlier step's table:

- profile, ``segments/customers.parquet``: point-in-time features, segment, tier,
  lifecycle stage, cluster (snapshot mode: also the churn scores it was built with);
- models, ``models/scores.parquet``: ``churn_probability``, ``predicted_value``,
  ``churn_reasons`` (read back as ``reasons``), ``value_reasons``, the lifetime outlook;
- strategy, ``strategy/customers.parquet``: economics, action, reason, campaign,
  incremental profit.

:meth:`RunStore.read_customers` joins them (every profiled customer, in the profile's
order; where two tables carry a column, the later step's value is the one read), reading
only the columns asked for. What people and scheduled jobs read, ``customers.parquet`` and
``customers.csv`` (``../shared/DESIGN.md``), is that join, written once by
:meth:`RunStore.export_customers` when every step has run. A run written before the
store existed has only the export; it is read in its place.

The store also names the run's other files (``profile.json`` with the scoring date,
``models.json`` with the horizon), so that later steps read what the first one resolved.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from analysis.data import read_columns, write_atomically, write_csv

__all__ = [
    "CUSTOMER_COLUMNS_FIRST",
    "RunStore",
]

#: Columns shown first in the run's customer table (the DESIGN's contract first).
CUSTOMER_COLUMNS_FIRST = ("customer_id", "segment", "value_tier", "lifecycle_stage",
                          "churn_probability", "predicted_value", "action", "reasons")

#: Columns a table stores under another name than the joined table shows.
_RENAMED = {"churn_reasons": "reasons"}


class RunStore:
    """One run's folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"RunStore({str(self.folder)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def profile_table(self) -> Path:
        """The profile step's per-customer table."""
        return self.folder / "segments" / "customers.parquet"

    @property
    def scores_table(self) -> Path:
        """The models step's per-customer scores."""
        return self.folder / "models" / "scores.parquet"

    @property
    def decisions_table(self) -> Path:
        """The strategy step's per-customer decisions."""
        return self.folder / "strategy" / "customers.parquet"

    @property
    def export(self) -> Path:
        """The joined customer table people read (``customers.parquet``)."""
        return self.folder / "customers.parquet"

    @property
    def export_csv(self) -> Path:
        """The same, as CSV (``customers.csv``)."""
        return self.folder / "customers.csv"

    def _parts(self) -> list[Path]:
        """The per-step tables written so far, in step order; the export alone for a
        run written before the store existed."""
        # (a table may be a folder of part files: Spark's executors write one on a cluster)
        parts = [p for p in (self.profile_table, self.scores_table, self.decisions_table)
                 if p.exists()]
        if not self.profile_table.exists():
            return [self.export] if self.export.is_file() else []
        return parts

    # ------------------------------------------------------------------ writes

    def write_profile_table(self, customers: pd.DataFrame) -> Path:
        """Write the profile step's table (atomically)."""
        return _write_parquet(self.profile_table, customers)

    def write_scores(self, scores: pd.DataFrame) -> Path:
        """Write the models step's scores (atomically)."""
        return _write_parquet(self.scores_table, scores)

    def write_decisions(self, decisions: pd.DataFrame) -> Path:
        """Write the strategy step's decisions (atomically)."""
        return _write_parquet(self.decisions_table, decisions)

    # ------------------------------------------------------------------ reads

    def customer_columns(self) -> list[str]:
        """The joined table's columns, in the order :meth:`read_customers` returns them."""
        owner = self._owners()
        return _ordered(list(owner))

    def _owners(self) -> dict[str, tuple[Path, str]]:
        """Each joined column -> (the table it is read from, its name there): the last
        step that wrote it."""
        owner: dict[str, tuple[Path, str]] = {}
        for part in self._parts():
            for stored in _schema(part).names:
                shown = _RENAMED.get(stored, stored) if part == self.scores_table else stored
                owner.pop(shown, None)        # the later step's column, at its place
                owner[shown] = (part, stored)
        return owner

    def read_customers(self, columns: list[str] | tuple[str, ...] | None = None, *,
                       ids: list[str] | pd.Series | None = None) -> pd.DataFrame:
        """Every profiled customer (of ``ids`` only, when given) with the ``columns``
        asked for (those the run has; all when None), joined from the steps' tables on
        ``customer_id``, in the profile's order, :data:`CUSTOMER_COLUMNS_FIRST` first
        when all are read.

        Raises
        ------
        FileNotFoundError
            When the profile step has not run.
        """
        wanted = self.wanted(columns)
        out = None
        filters = None if ids is None else [("customer_id", "in", [str(i) for i in ids])]
        for part, names in self.sources(wanted):
            frame = read_columns(part, ["customer_id", *names],
                                 filters=filters).rename(columns=names)
            if out is None:
                out = frame
            elif frame["customer_id"].equals(out["customer_id"]):
                # the steps write the profile's customers in its order: the rows line up
                # (a join of a million ids costs about a second)
                out = pd.concat([out, frame.drop(columns="customer_id")], axis=1)
            else:
                out = out.merge(frame, on="customer_id", how="left", validate="many_to_one")
        return out[_ordered(wanted) if columns is None else wanted]

    def wanted(self, columns: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """Those of ``columns`` the run has (all its columns when None), in the order
        :meth:`read_customers` returns them."""
        owner = self._owners()
        if columns is None:
            return _ordered(list(owner))
        return [c for c in dict.fromkeys(columns) if c in owner]

    def sources(self, columns: list[str] | tuple[str, ...] | None = None
                ) -> list[tuple[Path, dict[str, str]]]:
        """Where the joined table's ``columns`` (all when None) are read from: each step's
        table that holds some of them, in step order (the profile's first, whose
        ``customer_id`` every read starts from), with the columns read there (their
        stored name -> the name read): how :meth:`read_customers` reads them, and how
        another engine can (a Spark run's strategy step joins them where they lie).

        Raises
        ------
        FileNotFoundError
            When the profile step has not run.
        """
        parts = self._parts()
        if not parts:
            raise FileNotFoundError(f"{self.profile_table}: the profile step has not run")
        owner = self._owners()
        wanted = self.wanted(columns)
        found = []
        for part in parts:
            names = {owner[c][1]: c for c in wanted
                     if owner[c][0] == part and c != "customer_id"}
            if found and not names:
                continue
            found.append((part, names))
        return found

    def largest(self, column: str, n: int, columns: list[str] | tuple[str, ...] | None = None
                ) -> pd.DataFrame:
        """The ``n`` customers with the largest ``column`` (the first in the profile's
        order among equals), largest first, with ``columns`` (all when None): only
        ``column`` is read for everyone, the rest for those ``n`` (a page's list of a
        large base)."""
        ranked = self.read_customers(["customer_id", column]).nlargest(n, column,
                                                                       keep="first")
        columns = self.customer_columns() if columns is None else list(columns)
        rows = self.read_customers(list(dict.fromkeys(["customer_id", *columns])),
                                   ids=ranked["customer_id"]).set_index("customer_id",
                                                                        drop=False)
        return rows.loc[ranked["customer_id"].to_numpy(), columns].reset_index(drop=True)

    def export_customers(self) -> dict[str, Path]:
        """Write the joined customer table as ``customers.parquet`` and ``customers.csv``
        (atomically), once, when every step has run; in the CSV, text a spreadsheet would
        run as a formula is neutralised (:func:`analysis.data.write_csv`)."""
        table = self.read_customers()
        return {"customers": _write_parquet(self.export, table),
                "customers_csv": write_csv(self.export_csv, table)}

    def n_customers(self) -> int:
        """How many customers the profile step profiled (from the table's metadata)."""
        parts = self._parts()
        return ds.dataset(parts[0], format="parquet").count_rows() if parts else 0

    def scoring_date(self) -> dt.date | None:
        """The scoring date the profile step resolved and recorded (``profile.json``);
        None before the profile step has run."""
        path = self.folder / "profile.json"
        return (dt.date.fromisoformat(json.loads(path.read_text())["as_of"])
                if path.is_file() else None)

    def horizon_days(self) -> int | None:
        """The horizon the run resolved and recorded: by the profile step of an order-log
        run (``profile.json``), else by the models step (``models.json``); None before."""
        for name in ("profile.json", "models.json"):
            path = self.folder / name
            if path.is_file() and "horizon_days" in (recorded := json.loads(path.read_text())):
                return int(recorded["horizon_days"])
        return None

    def profile_columns(self) -> list[str]:
        """The profile step's table's columns (from its schema)."""
        return list(_schema(self.profile_table).names)

    def read_profile_table(self, columns: list[str] | None = None, *,
                           ids: list[str] | pd.Series | None = None) -> pd.DataFrame:
        """The profile step's table as it wrote it (features at the scoring date and the
        segments): ``columns`` of it (those it has; all when None), of the customers of
        ``ids`` only when given."""
        filters = None if ids is None else [("customer_id", "in", [str(i) for i in ids])]
        return read_columns(self.profile_table, columns, filters=filters)


def _schema(path: Path):
    """The schema of a Parquet file, or of a folder of part files."""
    return ds.dataset(path, format="parquet").schema


def _ordered(columns: list[str]) -> list[str]:
    first = [c for c in CUSTOMER_COLUMNS_FIRST if c in columns]
    return first + [c for c in columns if c not in first]


def _write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))
