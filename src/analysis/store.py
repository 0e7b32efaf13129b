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

from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from analysis.data import read_columns, write_atomically, write_csv_frames
from analysis.memory import spill_directory

__all__ = [
    "CUSTOMER_COLUMNS_FIRST",
    "CustomerView",
    "ORDER_COLUMNS",
    "STREAM_ROWS",
    "RunStore",
    "SCAN_ORDER",
    "duck_connection",
    "parquet_scan",
    "sql_name",
    "sql_text",
]

#: Columns shown first in the run's customer table (the DESIGN's contract first).
CUSTOMER_COLUMNS_FIRST = ("customer_id", "segment", "value_tier", "lifecycle_stage",
                          "churn_probability", "predicted_value", "action", "reasons")

#: Customers per frame when a run's table is streamed (:meth:`RunStore.stream`): the
#: export of 987,780 customers' 87 columns peaked at 1,710 MiB in frames of 200,000 and
#: at 896 MiB in frames of 50,000, in 17.6 s and 15.3 s.
STREAM_ROWS = 50_000

#: The columns of :meth:`RunStore.joined_sql` that give the profile's order.
ORDER_COLUMNS = ("_csl_file", "_csl_row")

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
    def alerts_table(self) -> Path:
        """The strategy step's early warnings (a row per warning: customer, rule, detail;
        in the rules' order, then by id)."""
        return self.folder / "strategy" / "alerts.parquet"

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

    def known(self, column: str) -> int:
        """How many customers have a ``column`` (it is not missing), counted in the table
        it is read from without reading it (0 when the run has no such column)."""
        owner = self._owners().get(column)
        if owner is None:
            return 0
        part, stored = owner
        return ds.dataset(part, format="parquet").count_rows(filter=ds.field(stored).is_valid())

    def largest(self, column: str, n: int, columns: list[str] | tuple[str, ...] | None = None
                ) -> pd.DataFrame:
        """The ``n`` customers with the largest ``column`` (the first in the profile's
        order among equals; none without one), largest first, with ``columns`` (all when
        None): a page's list of a large base, found where the table lies (:meth:`stream`)."""
        columns = self.customer_columns() if columns is None else list(columns)
        rows = pd.concat(self.stream([*dict.fromkeys([*columns, column])],
                                     largest_first=(column,), limit=n), ignore_index=True)
        return rows[rows[column].notna()][columns].reset_index(drop=True)

    def head(self, n: int, columns: list[str] | tuple[str, ...] | None = None
             ) -> pd.DataFrame:
        """The first ``n`` customers in the profile's order, with ``columns`` (all when
        None), read where the table lies (:meth:`stream`)."""
        return pd.concat(self.stream(columns, limit=n), ignore_index=True)

    def stream(self, columns: list[str] | tuple[str, ...] | None = None, *,
               grouped_by: str | None = None, largest_first: tuple[str, ...] = (),
               limit: int | None = None, rows: int | None = None,
               memory_limit: str | None = None) -> Iterator[pd.DataFrame]:
        """The joined table, as :meth:`read_customers` reads it (the same columns, values
        and types), in frames of at most ``rows`` customers, for a table too large to
        hold, whatever engine wrote the steps' Parquet files. Where the steps' tables hold
        the profile's customers in its order (as they write them), the whole table is read
        a part of each at a time, side by side; otherwise, or for a part of it, DuckDB
        joins them out of core (within ``memory_limit``, spilling to disk beyond;
        :func:`analysis.memory.spill_directory`).

        Rows come in the profile's order, or by ``largest_first`` (each column largest
        first, missing last, then the profile's order), after ``grouped_by`` when given
        (the customers of each of its values together, the values in order, missing
        last), the first ``limit`` only when given; ``rows``:
        :data:`STREAM_ROWS` when None. At least one frame comes, empty when no customer
        does. Raises as :meth:`joined_sql` does.
        """
        wanted = self.wanted(columns)
        if columns is None:
            wanted = _ordered(wanted)
        types = self._types(wanted)
        categories = self._categories(types)
        rows = rows or STREAM_ROWS
        if grouped_by is None and not largest_first and limit is None:
            sources = self.sources(wanted)
            if _lined_up(sources, rows):
                sent = False
                for table in _side_by_side(sources, wanted, rows):
                    sent = True
                    yield _typed(table, types, categories)
                if sent:
                    return
        keys = [c for c in (*largest_first, *([grouped_by] if grouped_by else []))
                if c not in wanted]
        order = ([f"{sql_name(grouped_by)} ASC NULLS LAST"] if grouped_by else []) + [
            f"{sql_name(c)} DESC NULLS LAST" for c in largest_first]
        query = (f"SELECT * FROM ({self.joined_sql([*wanted, *keys])})"
                 + f" ORDER BY {', '.join([*order, *ORDER_COLUMNS])}"
                 + (f" LIMIT {int(limit)}" if limit is not None else ""))
        con = duck_connection(memory_limit)
        try:
            reader = con.sql(query).to_arrow_reader(rows)
            sent = False
            for batch in reader:
                if batch.num_rows or not sent:
                    sent = True
                    yield _typed(batch, types, categories)
            if not sent:
                yield _typed(pa.RecordBatch.from_arrays(
                    [pa.array([], f.type.value_type if pa.types.is_dictionary(f.type)
                              else f.type) for f in types], names=types.names),
                    types, categories)
        finally:
            con.close()

    def joined_sql(self, columns: list[str] | tuple[str, ...] | None = None) -> str:
        """DuckDB's query of the joined table's ``columns`` (those the run has; all when
        None) over the steps' Parquet files (a file, or a folder of part files, as either
        engine wrote it), with the profile's order as :data:`ORDER_COLUMNS` (unsorted: a
        reader sorts by them where the order matters).

        Raises
        ------
        FileNotFoundError
            When the profile step has not run.
        ValueError
            When a later step's table holds a customer twice (so that the join would
            give a customer two rows).
        """
        sources = self.sources(columns)
        if len(sources) > 1:
            self._check_one_row_each(sources)
        selected, joins = [], []
        for i, (part, names) in enumerate(sources):
            if i == 0:
                joins.append(f"{parquet_scan(part, ordered=True)} AS t0")
                selected.append('t0."customer_id" AS "customer_id"')
            else:
                joins.append(f"LEFT JOIN {parquet_scan(part)} AS t{i} "
                             f'ON t{i}."customer_id" = t0."customer_id"')
            selected += [f"t{i}.{sql_name(stored)} AS {sql_name(shown)}"
                         for stored, shown in names.items()]
        selected += [f"t0.{c} AS {o}" for c, o in zip(SCAN_ORDER, ORDER_COLUMNS, strict=True)]
        return f"SELECT {', '.join(selected)} FROM {' '.join(joins)}"

    def _types(self, columns: list[str]) -> pa.Schema:
        """The joined ``columns``' types as the steps' tables store them, with the pandas
        metadata of :meth:`read_customers`' frame (categories, texts, nullable integers),
        so that a table converted to pandas has its types."""
        owner = self._owners()
        fields = [_schema(owner[c][0]).field(owner[c][1]).with_name(c) for c in columns]
        frame = pa.Schema.from_pandas(self.read_customers(columns, ids=[]),
                                      preserve_index=False)
        return pa.schema(fields, metadata=frame.metadata)

    def _categories(self, types: pa.Schema) -> dict[str, pa.Array]:
        """Each column of categories (a dictionary) among ``types`` -> its categories, in
        their order, as a read of the whole table gives them (only the column's codes
        are read: a byte or two per customer)."""
        owner, out = self._owners(), {}
        for field in types:
            if pa.types.is_dictionary(field.type):
                part, stored = owner[field.name]
                column = ds.dataset(part, format="parquet").to_table(columns=[stored])[0]
                column = column.unify_dictionaries()
                out[field.name] = (column.chunk(0).dictionary if column.num_chunks
                                   else pa.array([], field.type.value_type))
        return out

    def _check_one_row_each(self, sources) -> None:
        """Raise when a later step's table holds a customer twice."""
        con = duck_connection()
        try:
            for part, _ in sources[1:]:
                (twice, example), = con.execute(
                    f"SELECT count(*), min(customer_id) FROM (SELECT customer_id FROM "
                    f"{parquet_scan(part)} GROUP BY customer_id HAVING count(*) > 1)"
                ).fetchall()
                if twice:
                    raise ValueError(f"{part}: {twice:,} customers have more than one row "
                                     f"(for example {example!r}); each step writes one row "
                                     "per customer")
        finally:
            con.close()

    def export_customers(self, *, memory_limit: str | None = None) -> dict[str, Path]:
        """Write the joined customer table as ``customers.parquet`` and ``customers.csv``
        (atomically), once, when every step has run, streamed (:meth:`stream`: a part at
        a time, whatever the number of customers); in the CSV, text a spreadsheet would
        run as a formula is neutralised (:func:`analysis.data.write_csv_frames`)."""
        import pyarrow.parquet as pq

        columns = self.customer_columns()
        types = self._types(columns)

        def both(parquet_tmp: str) -> None:
            with pq.ParquetWriter(parquet_tmp, types) as parquet:
                def frames():
                    for frame in self.stream(columns, memory_limit=memory_limit):
                        parquet.write_table(pa.Table.from_pandas(frame, schema=types,
                                                                 preserve_index=False))
                        yield frame
                write_csv_frames(self.export_csv, frames())

        return {"customers": write_atomically(self.export, both),
                "customers_csv": self.export_csv}

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


class CustomerView:
    """A run's customer table as a DuckDB view, ``customers``, over the steps' Parquet
    files (:meth:`RunStore.joined_sql`: its ``columns``, and the profile's order as
    :data:`ORDER_COLUMNS`), queried where it lies, out of core: a reader receives the
    aggregates and the few rows it asks for, never the table, whatever the number of
    customers and whichever engine wrote it."""

    def __init__(self, store: RunStore, columns: list[str] | tuple[str, ...] | None = None,
                 *, memory_limit: str | None = None):
        self.store = store
        self.columns = store.wanted(columns)
        query = store.joined_sql(self.columns)        # (raises before a connection opens)
        self._con = duck_connection(memory_limit)
        self._con.execute(f"CREATE TEMP VIEW customers AS {query}")

    @classmethod
    def of(cls, frame: pd.DataFrame) -> CustomerView:
        """The view of a customer table already in memory (a small one: a test's)."""
        view = cls.__new__(cls)
        view.store, view.columns = None, list(frame.columns)
        view._con = duck_connection()
        view._con.register("_customers", frame)
        view._con.execute(f"CREATE TEMP VIEW customers AS SELECT *, 1 AS {ORDER_COLUMNS[0]}, "
                          f"row_number() OVER () AS {ORDER_COLUMNS[1]} FROM _customers")
        return view

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    def frame(self, query: str, params: dict | None = None) -> pd.DataFrame:
        """The result of ``query`` (SQL over ``customers``, with ``$name`` parameters)."""
        return self._con.execute(query, params).df()

    def crosstab(self, query: str, params: dict | None = None) -> pd.DataFrame:
        """``query``'s counts (three columns: a row label, a column label, a count) as a
        table, as :func:`pandas.crosstab` of the customers gives it: labels sorted, 0
        where none, the first two columns' names as the axes' names."""
        counts = self.frame(query, params)
        rows, columns, n = counts.columns
        return (counts.pivot(index=rows, columns=columns, values=n).fillna(0).astype("int64")
                .sort_index().sort_index(axis=1))

    def register(self, name: str, frame: pd.DataFrame) -> None:
        """Make ``frame`` a table ``name`` that queries can join (a sample the driver
        already holds)."""
        self._con.register(name, frame)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> CustomerView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sql_text(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


#: The columns :func:`parquet_scan` adds for the rows' order: the file's path, the row's
#: place in its file (a table's own column "filename" keeps its name).
SCAN_ORDER = ("_csl_name", "file_row_number")


def parquet_scan(path: str | Path, *, ordered: bool = False) -> str:
    """DuckDB's scan of a table written as Parquet (a file, or a folder of part files:
    those pyarrow reads, without Spark's ``_SUCCESS`` or checksums), with
    :data:`SCAN_ORDER` when ``ordered``: sorted by them, the rows come in pyarrow's
    order (its files sorted by path)."""
    files = ", ".join(sql_text(f) for f in ds.dataset(path, format="parquet").files)
    return (f"read_parquet([{files}]"
            + (f", filename = '{SCAN_ORDER[0]}', file_row_number = true)" if ordered else ")"))


def duck_connection(memory_limit: str | None = None):
    """A DuckDB connection for reading a run store out of core: within ``memory_limit``
    (DuckDB's own default when None), spilling to :func:`analysis.memory.spill_directory`."""
    import duckdb

    spill = spill_directory()
    spill.mkdir(parents=True, exist_ok=True)
    return duckdb.connect(config={"temp_directory": str(spill),
                                  **({"memory_limit": memory_limit} if memory_limit else {})})


def _parts_of(part: Path, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """A step's table (a file, or a folder of part files), its ``columns``, in its order,
    ``rows`` rows at a time (the last fewer)."""
    import pyarrow.parquet as pq

    held, n = [], 0
    for file in ds.dataset(part, format="parquet").files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=rows, columns=columns):
            held.append(batch)
            n += batch.num_rows
            while n >= rows:
                table = pa.Table.from_batches(held)
                yield table.slice(0, rows)
                rest = table.slice(rows)
                held, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(held)


def _lined_up(sources: list[tuple[Path, dict[str, str]]], rows: int) -> bool:
    """Whether every step's table holds the profile's customers in the profile's order
    (read a part at a time: the ids alone)."""
    if len(sources) == 1:
        return True
    counts = {ds.dataset(part, format="parquet").count_rows() for part, _ in sources}
    if len(counts) > 1:
        return False
    ids = [_parts_of(part, ["customer_id"], rows) for part, _ in sources]
    return all(all(t.column(0).equals(first.column(0)) for t in rest)
               for first, *rest in zip(*ids, strict=True))


def _side_by_side(sources: list[tuple[Path, dict[str, str]]], columns: list[str],
                  rows: int) -> Iterator[pa.Table]:
    """The joined table's ``columns``, ``rows`` customers at a time, from steps' tables
    that hold the same customers in the same order (:func:`_lined_up`)."""
    readers = [_parts_of(part, ["customer_id", *names] if i == 0 else list(names), rows)
               for i, (part, names) in enumerate(sources)]
    for parts in zip(*readers, strict=True):
        found = {"customer_id": parts[0].column("customer_id")}
        for table, (_, names) in zip(parts, sources, strict=True):
            found.update({shown: table.column(stored) for stored, shown in names.items()})
        yield pa.table({c: found[c] for c in columns})


def _typed(batch: pa.RecordBatch | pa.Table, types: pa.Schema,
           categories: dict[str, pa.Array]) -> pd.DataFrame:
    """A batch read (by DuckDB, or from the steps' files), as
    :meth:`RunStore.read_customers` gives its columns (their ``types``; a column of
    categories with the table's ``categories``, all of them in their order)."""
    import pyarrow.compute as pc

    columns = []
    for field in types:
        column = batch.column(field.name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if field.name in categories:
            values = categories[field.name]
            column = pa.DictionaryArray.from_arrays(
                pc.index_in(column, value_set=values).cast(field.type.index_type), values)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=types).to_pandas()


def sql_name(name: str) -> str:
    """``name`` as a SQL identifier (quoted)."""
    return '"' + name.replace('"', '""') + '"'


def _schema(path: Path):
    """The schema of a Parquet file, or of a folder of part files."""
    return ds.dataset(path, format="parquet").schema


def _ordered(columns: list[str]) -> list[str]:
    first = [c for c in CUSTOMER_COLUMNS_FIRST if c in columns]
    return first + [c for c in columns if c not in first]


def _write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))
