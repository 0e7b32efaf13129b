"""Load the input tables, map them onto the contract, validate, clean and quarantine.

Flow per table: read the file as the config says (values kept as text where the format
allows, so nothing is lost to a guess) → map the user's columns onto the contract's names
→ parse (ids, dates, amounts, statuses), chunk by chunk → judge the parsed rows against
the row rules and find repeated rows, in set-based DuckDB queries over the whole file
(:data:`ROW_RULES`) → split into processed rows and quarantined rows, each quarantined
row with the rule it broke. Every row read ends up in exactly one of the two.

A problem that makes a whole file unusable (missing file, empty file, missing required
column, a column that cannot be parsed at all) raises :class:`DataContractError`.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.config import TABLE_CONTRACTS, Config, TableSpec
from analysis.engine import DuckDBEngine, SparkEngine, _arrow_of, spark_session
from analysis.errors import DataContractError
from analysis.memory import rss_bytes, spill_directory

__all__ = [
    "OPTIONAL_INPUTS",
    "STATUS_SYNONYMS",
    "absent_input_sentence",
    "available_inputs",
    "CleanTable",
    "Dataset",
    "FORMULA_PREFIXES",
    "load_dataset",
    "load_table",
    "neutralise_csv_cells",
    "quality_step",
    "quality_summary",
    "read_columns",
    "write_atomically",
    "write_csv",
    "write_csv_frames",
    "write_processed",
]

#: Accepted spellings of an order status, mapped onto the contract's three values.
STATUS_SYNONYMS: dict[str, str] = {
    **dict.fromkeys(["completed", "complete", "paid", "ok", "delivered", "shipped",
                     "closed", "done", "success", "fulfilled"], "completed"),
    **dict.fromkeys(["cancelled", "canceled", "cancel", "void", "voided"], "cancelled"),
    **dict.fromkeys(["returned", "return", "refunded", "refund"], "returned"),
}

#: Interaction types understood by the features; other values are kept as given.
INTERACTION_TYPES = {"complaint": "complaint", "complaints": "complaint",
                     "ticket": "ticket", "support": "ticket", "survey": "survey",
                     "nps": "survey", "csat": "survey"}

#: Words that name an interaction type inside a longer label ("Complaint - billing",
#: "Support ticket", "NPS survey response"), tried in this order.
INTERACTION_WORDS = (("complain", "complaint"), ("survey", "survey"), ("nps", "survey"),
                     ("csat", "survey"), ("ticket", "ticket"), ("support", "ticket"))


def _interaction_type(label: str) -> str:
    """The type the features use (complaint, ticket, survey) of an interaction's label
    (cleaned, casefolded): an exact name, else the first word of
    :data:`INTERACTION_WORDS` it contains, else the label as given (a type the features
    do not use; the data-quality summary counts them)."""
    if label in INTERACTION_TYPES:
        return INTERACTION_TYPES[label]
    return next((kind for word, kind in INTERACTION_WORDS if word in label), label)


# A column whose values fail to parse for more than this share is a mapping problem
# (wrong date format, wrong decimal separator), not a few bad rows: the run stops.
_MAX_UNPARSEABLE_SHARE = 0.5
#: Rows read, parsed and validated at a time (bounds the memory a load needs).
CHUNK_ROWS = 250_000
#: How a campaign table marks the contacted customers and the control group, besides
#: true/false (any case; the words campaign tools and analysts write).
TREATED_WORDS = {"treated", "treatment", "contacted", "test", "target", "targeted", "mailed",
                 "sent", "exposed"}
CONTROL_WORDS = {"control", "holdout", "hold-out", "hold out", "not contacted", "untreated",
                 "not treated", "no contact", "unexposed"}
_TRUE = {"true", "yes", "y", "1", "t", "resolved", "closed"}
_FALSE = {"false", "no", "n", "0", "f", "open", "unresolved", "pending"}


@dataclass(frozen=True)
class CleanTable:
    """One input table after cleaning.

    Attributes
    ----------
    name : contract table name (``transactions``, ``customers``, ``interactions``).
    file : the source file (or catalog table, on Spark).
    data : processed rows, contract column names, typed.
    quarantine : set-aside rows: ``source_row`` (1-based data row in the file),
        ``rule``, ``detail`` and the row's original values.
    n_read : rows read from the file.
    notes : remarks for the data-quality report (e.g. columns matched ignoring case).
    given : the contract's columns the file supplied (``data`` may hold more: a missing
        ``status`` is filled as ``completed``, ``margin`` derived from ``cost``).
    """

    name: str
    file: Path | str
    data: pd.DataFrame
    quarantine: pd.DataFrame
    n_read: int
    notes: tuple[str, ...] = ()
    given: tuple[str, ...] = ()

    @property
    def n_processed(self) -> int:
        return len(self.data)

    @property
    def n_quarantined(self) -> int:
        return len(self.quarantine)


@dataclass(frozen=True)
class Dataset:
    """All input tables of a run, cleaned."""

    tables: dict[str, CleanTable] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name].data

    def get(self, name: str) -> pd.DataFrame | None:
        table = self.tables.get(name)
        return None if table is None else table.data


# --------------------------------------------------------------------------- public API


def load_dataset(config: Config, *, today: dt.date | None = None) -> Dataset:
    """Load, validate and clean every table named in the config.

    Parameters
    ----------
    config : the run configuration.
    today : the date after which records count as "in the future" (default: today).

    Returns
    -------
    Dataset
        One :class:`CleanTable` per configured table.
    """
    today = today or dt.date.today()
    tables = {}
    for name, spec in config.tables.items():
        tables[name] = load_table(spec, table=name, config=config, today=today)
    return Dataset(tables)


def load_table(spec: TableSpec, *, table: str, config: Config,
               today: dt.date | None = None, chunk_rows: int = CHUNK_ROWS) -> CleanTable:
    """Read one table, map it onto the contract, validate and clean it.

    The file is read ``chunk_rows`` rows at a time and each chunk is mapped and parsed
    on its own (rows that do not parse are set aside with their values), so the memory
    a load needs is bounded by one chunk plus the parsed rows kept. The parsed rows of
    the whole file are then judged at once, by DuckDB: the row rules of
    :data:`ROW_RULES` and the copies of earlier rows (:func:`_judge_rows`); the few
    rows set aside there get their original values from a second read of the chunks
    that hold them.

    Returns
    -------
    CleanTable
        ``data`` has the contract's columns for that table (optional ones when present)
        plus, for ``customers``, the descriptive attributes; PII columns are dropped.
    """
    today = today or dt.date.today()
    parts, quarantines, notes = [], [], []
    n_read, columns, given, others = 0, [], (), []
    tally: dict[str, list[int]] = {}      # unparseable and read rows per column, so far
    for raw in _read_chunks(spec, chunk_rows):
        columns = list(raw.columns)
        if raw.empty:
            continue
        raw.index = pd.RangeIndex(n_read, n_read + len(raw))    # file row - 1
        n_read += len(raw)
        mapped, chunk_notes, unread = _map_columns(raw, spec, table=table, pii=config.pii,
                                                   row_ids=_row_ids(config, table))
        if config.mode == "snapshot" and table == "customers" and "churn" not in mapped:
            raise DataContractError(
                file=spec.source, rule="required_column", column="churn",
                message="snapshot mode needs a churn label column: map it with "
                        "'columns: {churn: <your column>}' and set snapshot.churn_positive",
                examples=columns)
        notes = notes or chunk_notes
        given = tuple(mapped.columns)
        parsed, rules = _parse(mapped, spec, table=table, config=config, tally=tally)
        bad = rules.notna()
        quarantines.append(_set_aside(raw, mapped, rules, bad, config=config))
        parts.append(parsed.loc[~bad.to_numpy()])
        if table != "customers" and unread and _repeat_key(list(given), table=table,
                                                           config=config):
            # a copy is a copy of the whole line: the columns the contract does not read
            # (a product code, a description) must match too, compared by a hash of
            # their values (a customer table's copies are those of an id)
            others.append(pd.util.hash_pandas_object(
                raw.loc[~bad.to_numpy(), unread], index=False).to_numpy())
        del raw, mapped, parsed, rules
    if n_read == 0:
        raise DataContractError(file=spec.source, rule="no_rows",
                                message="the file has a header but no data rows",
                                examples=columns)
    judged = _judge_rows(parts, table=table, config=config, today=today,
                         others=others or None)
    del others
    if len(judged):
        quarantines.extend(_set_aside_again(spec, judged, table=table, config=config,
                                            chunk_rows=chunk_rows))
        for i, part in enumerate(parts):       # one chunk copied at a time, if at all
            hit = part.index.intersection(judged.index)
            if len(hit):
                parts[i] = part.drop(index=hit)
    data = parts[0] if len(parts) == 1 else pd.concat(parts)
    del parts
    if config.output.pseudonymize_ids:
        key = os.environ[config.output.pseudonym_key_env]
        data = data.assign(customer_id=pseudonymize(data["customer_id"], key=key))
        notes.append("customer ids are pseudonymized (output.pseudonymize_ids)")
    quarantine = quarantines[0] if len(quarantines) == 1 else pd.concat(
        [q for q in quarantines if len(q)] or quarantines[:1], ignore_index=True)
    if len(judged):       # rows set aside after parsing join those set aside while parsing
        quarantine = quarantine.sort_values("source_row", kind="stable", ignore_index=True)
    return CleanTable(name=table, file=spec.source, data=data.reset_index(drop=True),
                      quarantine=quarantine, n_read=n_read, notes=tuple(notes),
                      given=given)


def _set_aside(raw: pd.DataFrame, mapped: pd.DataFrame, rules: pd.Series, bad: pd.Series,
               *, config: Config) -> pd.DataFrame:
    """The quarantine rows of one chunk: the rows ``bad`` marks, with their rule, detail
    and original values (never a PII column's; the id column pseudonymized when the
    config says so)."""
    pii = {_normalise_name(p) for p in config.pii}
    quarantine = _quarantine_frame(raw, mapped, rules, bad)
    quarantine = quarantine.drop(columns=[f"raw:{c}" for c in raw.columns
                                          if _normalise_name(c) in pii])  # PII never kept
    if config.output.pseudonymize_ids:
        key = os.environ[config.output.pseudonym_key_env]
        # the quarantine keeps the raw values: pseudonymize the id column among them
        source = next((c for c in raw.columns if "customer_id" in mapped
                       and raw[c].equals(mapped["customer_id"])), None)
        if source is not None and f"raw:{source}" in quarantine:
            quarantine[f"raw:{source}"] = pseudonymize(
                quarantine[f"raw:{source}"].astype("string").str.strip(), key=key)
    return quarantine


def _set_aside_again(spec: TableSpec, judged: pd.Series, *, table: str, config: Config,
                     chunk_rows: int) -> list[pd.DataFrame]:
    """The quarantine rows of the rows :func:`_judge_rows` set aside, with their original
    values: the file is read again, in the same chunks, for the rows set aside."""
    wanted = np.sort(judged.index.to_numpy())
    out = []
    for raw in _rows_of_chunks(spec, chunk_rows, wanted):
        mapped, _, _ = _map_columns(raw, spec, table=table, pii=config.pii,
                                    row_ids=_row_ids(config, table))
        rules = pd.Series(judged.loc[raw.index].to_numpy(), index=raw.index, dtype="object")
        out.append(_set_aside(raw, mapped, rules, rules.notna(), config=config))
    return out


def _rows_of_chunks(spec: TableSpec, chunk_rows: int, rows: np.ndarray
                    ) -> Iterator[pd.DataFrame]:
    """``rows`` (0-based file rows, sorted) as :func:`_read_chunks` reads them (the same
    values), one frame per chunk that holds any, indexed by file row - 1. Of a Parquet
    file only those rows are converted; the reading stops after the last row asked
    for."""
    if not len(rows):
        return
    if spec.resolved_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        chunks = ((len(b), lambda at, b=b: pa.Table.from_batches([b]).take(at).to_pandas())
                  for b in pq.ParquetFile(spec.path).iter_batches(batch_size=chunk_rows))
    else:
        chunks = ((len(f), lambda at, f=f: f.iloc[at])
                  for f in _read_chunks(spec, chunk_rows))
    start = 0
    for n, frame in chunks:
        end = start + n
        held = rows[(rows >= start) & (rows < end)]
        if len(held):
            raw = frame(held - start)
            raw.index = pd.Index(held)
            yield raw
        if end > rows[-1]:
            return
        start = end


def pseudonymize(ids: pd.Series, *, key: str) -> pd.Series:
    """Keyed pseudonyms of customer ids: ``P`` + 16 hex digits of HMAC-SHA256(key, id).

    The same id and key always give the same pseudonym (runs stay comparable); without
    the key the ids cannot be recovered or guessed from a list of candidates. Missing
    ids stay missing.
    """
    secret = key.encode()
    codes = {v: "P" + hmac.new(secret, str(v).encode(), hashlib.sha256).hexdigest()[:16]
             for v in pd.unique(ids.dropna())}
    return ids.map(codes).astype(ids.dtype if ids.dtype != object else "object")


def quality_summary(dataset: Dataset) -> dict[str, pd.DataFrame]:
    """The data-quality summary of a loaded dataset, as frames: :func:`summarise` by
    DuckDB over the cleaned tables (handed over as they are, within 1 GB).

    Returns
    -------
    dict of DataFrame
        ``tables``: table, file, rows_read, rows_processed, rows_quarantined,
        customers, date_min, date_max, columns_given, customers_in_order_log (of the
        customers of a table beside an order log, those who have a line in it: ids
        written differently in two files, "00123" and "123", match nobody).
        ``quarantine``: table, rule, rows, examples (a few source rows).
        ``missing``: table, column, n_missing, share_missing (processed rows).
        ``transactions``: measure, value — statuses, refunds, zero amounts, outliers.
        ``notes``: table, note.
        ``monthly``: month, orders, customers, revenue (completed lines).
    """
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET memory_limit = '1GB'")
        con.execute("SET allocator_flush_threshold = '32MB'")   # give memory back after
        engine = DuckDBEngine(con)
        for name, table in dataset.tables.items():
            engine.register(_clean_view(name), table.data)
        return summarise(engine, dataset.tables)
    finally:
        con.close()


def _clean_view(table: str) -> str:
    """The view :func:`summarise` reads a cleaned table from."""
    return f"clean_{table}"


def summarise(engine: DuckDBEngine | SparkEngine,
              tables: dict[str, CleanTable | SparkCleanTable]) -> dict[str, pd.DataFrame]:
    """:func:`quality_summary` of ``tables`` (their counts, notes and quarantines), whose
    cleaned rows ``engine`` (DuckDB or Spark: :mod:`analysis.engine`) holds as the views
    ``clean_<table>``: only the summary's figures come back from the engine."""
    rows, quarantine, missing, notes = [], [], [], []
    has_log = "transactions" in tables
    for name, table in tables.items():
        view = _clean_view(name)
        columns = engine.columns(view)
        date_col = DATE_COLUMNS[name][0]
        dates = date_col if date_col in columns else "CAST(NULL AS TIMESTAMP)"
        n_missing = ", ".join(f"COUNT(*) - COUNT({_ident(c)})" for c in columns)
        counted = engine.rows(
            f"SELECT COUNT(DISTINCT customer_id), MIN({dates}), MAX({dates}), "
            f"{n_missing} FROM {view}")[0]
        n_customers, first, last, *absent = counted
        in_order_log = (None if not has_log or name == "transactions" else engine.rows(
            f"SELECT COUNT(DISTINCT t.customer_id) FROM {view} t SEMI JOIN "
            f"{_clean_view('transactions')} o ON t.customer_id = o.customer_id")[0][0])
        rows.append({
            "table": name, "file": str(table.file), "rows_read": table.n_read,
            "rows_processed": table.n_processed, "rows_quarantined": table.n_quarantined,
            "customers": int(n_customers),
            "date_min": None if first is None else first.date().isoformat(),
            "date_max": None if last is None else last.date().isoformat(),
            "columns_given": ", ".join(table.given or columns),
            "customers_in_order_log": None if in_order_log is None else int(in_order_log),
        })
        if table.n_quarantined:
            for rule, group in table.quarantine.groupby("rule", sort=True):
                quarantine.append({"table": name, "rule": rule, "rows": len(group),
                                   "examples": ", ".join(
                                       f"row {r}: {d}" for r, d in
                                       zip(group["source_row"].head(3),
                                           group["detail"].head(3), strict=True))})
        for col, n in zip(columns, absent, strict=True):
            missing.append({"table": name, "column": col, "n_missing": int(n),
                            "share_missing": int(n) / max(table.n_processed, 1)})
        notes.extend({"table": name, "note": n} for n in table.notes)
        if name == "interactions" and table.n_processed:
            known = ", ".join(f"'{t}'" for t in sorted(set(INTERACTION_TYPES.values())))
            counts = engine.rows(
                f"SELECT type, COUNT(*) AS n FROM {view} WHERE type NOT IN ({known}) "
                "GROUP BY type ORDER BY n DESC, type")
            if counts:
                notes.append({"table": name, "note": (
                    f"{sum(n for _, n in counts):,} interactions of types the features do "
                    "not use (complaints, tickets and surveys are): " + ", ".join(
                        f"{k!r} {v:,}" for k, v in counts[:5])
                    + (f" and {len(counts) - 5:,} more types" if len(counts) > 5 else ""))})
    log = tables.get("transactions")
    return {
        "tables": pd.DataFrame(rows),
        "quarantine": pd.DataFrame(quarantine, columns=["table", "rule", "rows", "examples"]),
        "missing": pd.DataFrame(missing),
        "transactions": _transaction_measures(engine, log),
        "notes": pd.DataFrame(notes, columns=["table", "note"]),
        "monthly": _monthly(engine, log),
    }


def write_processed(dataset: Dataset | dict[str, CleanTable | SparkCleanTable],
                    out_dir: str | Path, *, summary: dict[str, pd.DataFrame] | None = None,
                    engine: SparkEngine | None = None) -> dict[str, Path]:
    """Write cleaned tables (``clean/<table>.parquet``), quarantine files
    (``quarantine/<table>.csv``, with :func:`write_csv`: text a spreadsheet would run as
    a formula is neutralised) and the quality summary (``data_quality.json``):
    ``summary``, the :func:`quality_summary` of ``dataset`` when the caller has it
    (computed here otherwise). ``dataset``: the tables of :func:`load_dataset`, or of
    :func:`load_dataset_on_spark`, whose cleaned rows ``engine`` (Spark) writes.

    Every file is written to a temporary name and moved into place, so a reader never
    sees a half-written file.

    Returns
    -------
    dict of Path
        Paths written, by name (``transactions``, ``quarantine_transactions``, ...,
        ``data_quality``).
    """
    out_dir = Path(out_dir)
    (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    (out_dir / "clean").mkdir(parents=True, exist_ok=True)
    tables = dataset.tables if isinstance(dataset, Dataset) else dataset
    written: dict[str, Path] = {}
    for name, table in tables.items():
        path = out_dir / "clean" / f"{name}.parquet"
        if isinstance(table, SparkCleanTable):       # (the executors write it)
            engine.write_parquet(table.data, path, order_by=FILE_ROW, drop_order=True)
        else:
            write_atomically(path, lambda tmp, d=table.data: d.to_parquet(tmp, index=False))
        written[name] = path
        qpath = out_dir / "quarantine" / f"{name}.csv"
        write_csv(qpath, table.quarantine)
        written[f"quarantine_{name}"] = qpath
    if summary is None:
        summary = quality_summary(dataset if isinstance(dataset, Dataset) else Dataset(tables))
    qpath = out_dir / "data_quality.json"
    payload = {k: json.loads(v.to_json(orient="records")) for k, v in summary.items()}
    write_atomically(qpath, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    written["data_quality"] = qpath
    return written


def read_columns(path: str | Path, columns: list[str] | tuple[str, ...] | None = None,
                 *, filters: list[tuple] | None = None) -> pd.DataFrame:
    """A Parquet file's ``columns`` (those of them it has; all when None): memory on
    large bases, where a reader needs a few of many columns. ``filters``: only the rows
    that pass them (pyarrow's ``(column, op, value)`` triples), in the file's order."""
    import pyarrow.parquet as pq

    schema = pq.ParquetDataset(path).schema                 # (a file, or a folder of parts)
    names = (list(schema.names) if columns is None
             else [c for c in dict.fromkeys(columns) if c in set(schema.names)])
    if any(op == "in" and not len(values) for _, op, values in filters or ()):
        # (no row passes a test against an empty list, which pyarrow cannot type)
        return schema.empty_table().select(names).to_pandas()
    return pd.read_parquet(path, columns=None if columns is None else names, filters=filters)


#: The optional inputs of an order log, and a snapshot's revenue (an order log's amounts
#: are its revenue: :func:`available_inputs` leaves it out there): name -> (table,
#: column, or None for the whole table; the plain sentence a report shows where a section
#: needs it and it is absent).
OPTIONAL_INPUTS: dict[str, tuple[str, str | None, str]] = {
    "order_id": ("transactions", "order_id",
                 "The data has no order numbers, so a customer's lines on one day count as "
                 "one order, and identical lines are kept as separate purchases."),
    "quantity": ("transactions", "quantity",
                 "The data has no quantities, so nothing here counts items."),
    "status": ("transactions", "status",
               "The data has no order status, so every line counts as a completed order: "
               "cancellations and returns cannot be seen (negative amounts still count as "
               "refunds)."),
    "category": ("transactions", "category",
                 "The data has no product categories, so segments are not described by "
                 "what they buy."),
    "channel": ("transactions", "channel",
                "The data has no sales channel, so segments are not described by how they "
                "buy, and every order is given the same cost to serve."),
    "margin": ("transactions", "margin",
               "The data has no margin or cost, so profit uses an assumed margin of "
               "{margin_rate:.0%} of revenue."),
    "revenue": ("customers", "recurring_revenue",
                "The export has no revenue column (recurring_revenue, or total_revenue with "
                "tenure), so what a customer is worth is unknown: customers are not ranked "
                "by value, a retention contact is costed but not valued, and no profit is "
                "computed."),
    "customers": ("customers", None,
                  "There is no customer table, so sign-up dates and customer attributes "
                  "are unknown, and actions cannot be audited for fairness by group."),
    "interactions": ("interactions", None,
                     "There is no complaints or service-contact table, so complaints and "
                     "satisfaction play no part in churn risk, early warnings or the "
                     "phase-out guardrails."),
    "campaign": ("campaign", None,
                 "There is no past randomized campaign, so what a retention contact is "
                 "worth is assumed ({retention_rate:.0%} of would-be churners kept) rather "
                 "than measured."),
}


def available_inputs(processed_dir: str | Path) -> dict[str, bool]:
    """Which of :data:`OPTIONAL_INPUTS` the run's input files supplied (from the
    ``columns_given`` of ``data_quality.json``: a ``status`` the load filled in does not
    count). ``margin`` counts as supplied when the file gave ``cost``, a snapshot's
    ``revenue`` when it gave ``total_revenue`` and ``tenure``."""
    tables = json.loads((Path(processed_dir) / "data_quality.json").read_text())["tables"]
    columns = {t["table"]: set(t["columns_given"].split(", ")) for t in tables}
    for given in columns.values():
        if "cost" in given:
            given.add("margin")
        if "total_revenue" in given and "tenure" in given:    # revenue per month from them
            given.add("recurring_revenue")
    found = {name: table in columns and (column is None or column in columns[table])
             for name, (table, column, _) in OPTIONAL_INPUTS.items()}
    if "transactions" in columns:        # an order log's amounts are its revenue
        del found["revenue"]
    return found


def quality_step(config: Config, processed_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The data-quality step (both modes): load, validate and clean every input the
    config names (:func:`load_dataset`; with ``analysis.engine: spark``, an order log's
    run on Spark's executors, :func:`load_dataset_on_spark`), write the cleaned tables,
    the quarantine files and ``data_quality.json`` into the run folder
    (:func:`write_processed`), and return the summary (:func:`quality_summary`)."""
    if config.analysis.engine == "spark" and config.mode == "transactions":
        engine = SparkEngine(spark_session(config.spark.master, config.spark.conf))
        tables = load_dataset_on_spark(config, engine)
        try:
            for name, table in tables.items():
                if isinstance(table, SparkCleanTable):
                    table.data.drop(FILE_ROW).createOrReplaceTempView(_clean_view(name))
                else:
                    engine.register(_clean_view(name), table.data)
            summary = summarise(engine, tables)
            write_processed(tables, processed_dir, summary=summary, engine=engine)
        finally:
            engine.drop(*(_clean_view(name) for name in tables))
            for table in tables.values():
                if isinstance(table, SparkCleanTable):
                    table.data.unpersist()
        return summary
    dataset = load_dataset(config)
    summary = quality_summary(dataset)          # once: write_processed records it too
    write_processed(dataset, processed_dir, summary=summary)
    return summary


def absent_input_sentence(name: str, **values: object) -> str:
    """The plain sentence a report shows instead of a section that needs the optional
    input ``name`` (:data:`OPTIONAL_INPUTS`), with ``values`` filled in."""
    return OPTIONAL_INPUTS[name][2].format(**values)


# --------------------------------------------------------------------------- reading


def _read_chunks(spec: TableSpec, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The file's rows, ``chunk_rows`` at a time (at least one frame, maybe empty, so
    the columns are known); read errors become :class:`DataContractError`."""
    if spec.table is not None:
        raise DataContractError(file=spec.table, rule="table_needs_spark",
                                message="a table of the Spark catalog is read by Spark: "
                                        "run with analysis.engine spark")
    path = spec.path
    if not path.is_file():
        raise DataContractError(file=path, rule="file_exists",
                                message="input file not found (paths in a config are "
                                        "relative to the config file)")
    if path.stat().st_size == 0:
        raise DataContractError(file=path, rule="empty_file", message="the file is empty")
    fmt = spec.resolved_format
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            source = pq.ParquetFile(path)
            if source.metadata.num_rows == 0:
                yield source.schema_arrow.empty_table().to_pandas()
            for batch in source.iter_batches(batch_size=chunk_rows):
                yield pa.Table.from_batches([batch]).to_pandas()   # as _rows_of_chunks
        elif fmt == "excel":
            frame = pd.read_excel(path, sheet_name=spec.sheet or 0, dtype=str,
                                  header=0 if spec.header else None,
                                  names=list(spec.names) if spec.names else None)
            yield from (frame.iloc[i:i + chunk_rows] for i in
                        range(0, max(len(frame), 1), chunk_rows))
        else:
            yield from _read_csv(spec, chunk_rows)
    except DataContractError:
        raise
    except UnicodeDecodeError as exc:
        raise DataContractError(
            file=path, rule="encoding",
            message=f"cannot be decoded as {spec.encoding} ({exc.reason} at byte "
                    f"{exc.start}); set 'encoding' in the config (e.g. latin-1, utf-16)",
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataContractError(file=path, rule="empty_file",
                                message="the file holds no columns") from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataContractError(file=path, rule="parse_file",
                                message=f"cannot be read as {fmt}: {exc}") from exc


def _read_csv(spec: TableSpec, chunk_rows: int) -> Iterator[pd.DataFrame]:
    whitespace = spec.sep.lower() in {"whitespace", r"\s+", " "}
    encoding = "utf-8-sig" if spec.encoding.lower().replace("_", "-") in {"utf-8", "utf8"} \
        else spec.encoding
    with open(spec.path, "rb") as fh:
        head = fh.read(4)
    if encoding == "utf-8-sig" and head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        # a UTF-16 byte-order mark is unambiguous: read it as such (the default
        # encoding is only a default; an explicit other encoding is respected)
        encoding = "utf-16"
    kwargs = dict(
        dtype=str, keep_default_na=False, na_values=[""], encoding=encoding,
        header=0 if spec.header else None,
        names=list(spec.names) if spec.names else None,
        skipinitialspace=True,
    )
    if whitespace:
        kwargs["sep"] = r"\s+"
    else:
        kwargs.update(sep=spec.sep, quoting=csv.QUOTE_MINIMAL)
    with pd.read_csv(spec.path, engine="c", chunksize=chunk_rows, **kwargs) as reader:
        any_rows = False
        for df in reader:
            df.columns = [str(c) for c in df.columns]
            any_rows = True
            yield df
    if not any_rows:                         # a header and no rows: yield the columns
        df = pd.read_csv(spec.path, engine="c", nrows=0, **kwargs)
        df.columns = [str(c) for c in df.columns]
        yield df


# --------------------------------------------------------------------------- mapping


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(name).strip().casefold())


def _row_ids(config: Config, table: str) -> bool:
    """Whether the table's rows may be named by their row in the file when it has no
    id column: a snapshot's customer table (many published churn exports have no id),
    never an order log, whose lines must be tied to their customer."""
    return config.mode == "snapshot" and table == "customers"


def _map_columns(raw: pd.DataFrame, spec: TableSpec, *, table: str,
                 pii: Iterable[str], row_ids: bool = False
                 ) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The contract's columns of ``raw`` under their contract names (and, for a
    customer table, its other columns but PII), the notes on how they were found, and
    the columns of ``raw`` that were not kept. With ``row_ids``, a table with no id
    column (and none named in the config) gets its rows' numbers in the file as ids
    (``raw``'s index + 1, the quarantine's ``source_row``)."""
    required, optional = TABLE_CONTRACTS[table]
    notes: list[str] = []
    by_norm: dict[str, list[str]] = {}
    for col in raw.columns:
        by_norm.setdefault(_normalise_name(col), []).append(col)
    rename: dict[str, str] = {}
    missing = []
    for contract_col in (*required, *optional):
        source = spec.columns.get(contract_col, contract_col)
        if source in raw.columns:
            rename[source] = contract_col
            continue
        candidates = by_norm.get(_normalise_name(source), [])
        if len(candidates) == 1:
            rename[candidates[0]] = contract_col
            notes.append(f"column {candidates[0]!r} used as {contract_col!r} "
                         f"(matched {source!r} ignoring case and spaces)")
            continue
        if contract_col in required:
            missing.append(contract_col)
    numbered = (row_ids and "customer_id" in missing
                and "customer_id" not in spec.columns)
    if numbered:
        missing.remove("customer_id")
        notes.append("the file has no customer id column: each customer is named by its "
                     "row in the file (1 = the first row after the header)")
    if missing == ["amount"] and {"quantity", "unit_price"} <= set(rename.values()):
        # an export of lines with a unit price and no line total (a common shape)
        missing = []
        notes.append("amount computed as quantity × unit_price (the file has no amount)")
    if missing:                                   # the first one the file lacks
        source = spec.columns.get(missing[0], missing[0])
        hint = (" (or map quantity and unit_price: amount = quantity × unit price)"
                if missing[0] == "amount" else "")
        if len(raw.columns) == 1 and re.search(r"[;,\t|]", raw.columns[0]):
            sep = re.search(r"[;,\t|]", raw.columns[0]).group(0)
            hint = (f"; the file seems to use {sep!r} as separator but the config "
                    f"says {spec.sep!r}")
        raise DataContractError(
            file=spec.source, rule="required_column", column=source,
            message=f"required column {source!r} (contract: {missing[0]}) is "
                    f"missing{hint}; columns found are listed as examples",
            examples=list(raw.columns)[:5],
        )
    pii_norm = {_normalise_name(p) for p in pii}
    dropped = [c for c in raw.columns if c not in rename and _normalise_name(c) in pii_norm]
    if dropped:
        notes.append(f"PII column(s) dropped at load: {', '.join(dropped)}")
    keep = [c for c in raw.columns if c in rename or
            (table == "customers" and c not in dropped)]
    mapped = raw[keep].rename(columns=rename)
    if numbered:
        mapped.insert(0, "customer_id", (raw.index + 1).astype(str))
    return mapped, notes, [c for c in raw.columns if c not in keep]


# --------------------------------------------------------------------------- parsing


def _parse(df: pd.DataFrame, spec: TableSpec, *, table: str,
           config: Config | None = None, tally: dict[str, list[int]] | None = None,
           marks: dict[str, pd.Series] | None = None) -> tuple[pd.DataFrame, pd.Series]:
    """Turn text columns into typed ones; return the typed frame and per-row rule hits.
    ``tally``: the unparseable and read rows of each column in the chunks before this
    one (updated), so that a column stops the run when most of the file read so far does
    not parse, not when a small chunk happens to be mostly bad. ``marks``: instead,
    record each checked column's unparseable rows there (by column), and stop for
    none: the caller judges the whole file (:func:`_stop_on_spark`)."""
    rules = pd.Series(pd.NA, index=df.index, dtype="object")
    out = {}
    ids = _as_text(df["customer_id"]).str.strip()
    # an integer id written as a float ("17850.0": a spreadsheet's or pandas' export of a
    # column with blanks) is that integer's id, as a float column of a typed file is, so
    # that tables exported each their own way still name the same customer alike
    dotted = ids.str.endswith(".0").fillna(False).astype(bool)
    if dotted.any():
        ids = ids.where(~dotted, ids[dotted].str.replace(_FLOAT_ID, r"\1", regex=True))
    rules = _flag(rules, ids.isna() | (ids == ""), "missing_customer_id",
                  "customer_id is empty")
    out["customer_id"] = ids
    for col in DATE_COLUMNS[table]:
        if col not in df:
            continue
        parsed, unparseable, missing = _parse_dates(df[col], spec.date_format)
        if marks is None:
            _stop_if_mostly_bad(unparseable, df[col], spec, col, tally)
        else:
            marks[col] = unparseable
        required = col in TABLE_CONTRACTS[table][0]
        rules = _flag(rules, unparseable, "unparseable_date",
                      _describe(df[col], col + "={v!r} is not a date"))
        if required:
            rules = _flag(rules, missing, "missing_date", f"{col} is empty")
        out[col] = parsed
    for col in NUMBER_COLUMNS:
        if col not in df:
            continue
        values, unparseable = _parse_numbers(df[col], decimal=spec.decimal,
                                             thousands=spec.thousands)
        if marks is None:
            _stop_if_mostly_bad(unparseable, df[col], spec, col, tally)
        else:
            marks[col] = unparseable
        rules = _flag(rules, unparseable, f"unparseable_{col}",
                      _describe(df[col], col + "={v!r} is not a number"))
        if col == "amount":
            rules = _flag(rules, values.isna() & ~unparseable, "missing_amount",
                          "amount is empty")
        out[col] = values
    if table == "transactions":
        if "order_id" in df:
            out["order_id"] = _as_text(df["order_id"]).str.strip()
        if "status" in df:
            # an empty status means completed; a value no synonym names is unknown
            status = _by_value(_as_text(df["status"]), lambda v: v.str.strip().str.casefold()
                               .map(lambda t: "completed" if t == "" else
                                    STATUS_SYNONYMS.get(t, pd.NA)))
            status = status.where(df["status"].notna(), "completed")
            unknown = status.isna()
            rules = _flag(rules, unknown, "unknown_status",
                          _describe(df["status"], "status={v!r} is not one of "
                                                  "completed/cancelled/returned"))
            out["status"] = status.fillna("unknown").astype("str")
        else:
            out["status"] = pd.Series("completed", index=df.index, dtype="str")
        for col in ("category", "channel"):
            if col in df:
                text = _by_value(_as_text(df[col]), lambda v: v.str.strip())
                out[col] = text.where(text.notna() & (text != ""), "unknown")
        if "amount" not in out:          # a line's total from its quantity and unit price
            out["amount"] = out["quantity"] * out["unit_price"]
            rules = _flag(rules, out["amount"].isna(), "missing_amount",
                          "amount = quantity × unit_price: quantity or unit_price is empty")
        out.pop("unit_price", None)
        if "margin" not in out and "cost" in out and "amount" in out:
            out["margin"] = out["amount"] - out["cost"]
        out.pop("cost", None)
    elif table == "interactions":
        kind = _by_value(_as_text(df["type"]), lambda v: v.str.strip().str.casefold())
        out["type"] = _by_value(kind, lambda v: v.map(_interaction_type))
        rules = _flag(rules, kind.isna() | (kind == ""), "missing_type", "type is empty")
        if "resolved" in df:
            text = _as_text(df["resolved"]).str.strip().str.casefold()
            resolved = pd.Series(pd.NA, index=df.index, dtype="boolean")
            resolved[text.isin(_TRUE)] = True
            resolved[text.isin(_FALSE)] = False
            out["resolved"] = resolved
    elif table == "campaign":
        text = _as_text(df["treated"]).str.strip().str.casefold()
        treated = pd.Series(pd.NA, index=df.index, dtype="boolean")
        treated[text.isin(_TRUE | TREATED_WORDS)] = True
        treated[text.isin(_FALSE | CONTROL_WORDS)] = False
        rules = _flag(rules, treated.isna(), "unparseable_treated",
                      _describe(df["treated"], "treated={v!r} is not true/false"))
        out["treated"] = treated
    elif table == "customers":
        if "churn" in df:
            positive = (config.snapshot.churn_positive if config is not None else "yes")
            out["churn"], rules = _parse_churn(df["churn"], positive, spec, rules)
        for col in df.columns:
            if col not in out:
                text = _as_text(df[col]).str.strip()
                out[col] = text.where(text != "", pd.NA)
    typed = pd.DataFrame(out, index=df.index)
    return typed, rules


_TRUE_LIKE = {"yes", "y", "true", "t", "1", "1.0"}


def _parse_churn(s: pd.Series, positive: str, spec: TableSpec,
                 rules: pd.Series) -> tuple[pd.Series, pd.Series]:
    """A two-valued churn label as booleans: ``positive`` (any of yes/true/1 when it is
    one of them) means churned, the other value stayed; empty labels are quarantined; a
    column with more than two values, or without the positive one next to another,
    stops the run."""
    text = _as_text(s).str.strip().str.casefold()
    missing = text.isna() | (text == "")
    wanted = str(positive).strip().casefold()
    positives = _TRUE_LIKE if wanted in _TRUE_LIKE else {wanted}
    values = sorted(set(text[~missing]))
    if len(values) > 2:
        raise DataContractError(
            file=spec.source, rule="churn_label", column="churn",
            message=f"the churn label must have two values; found {len(values)}",
            examples=values[:5])
    if len(values) == 2 and not positives & set(values):
        raise DataContractError(
            file=spec.source, rule="churn_label", column="churn",
            message=f"snapshot.churn_positive is {positive!r}, which is not one of the "
                    f"labels found; set it to the value that means 'left'",
            examples=values)
    rules = _flag(rules, missing, "missing_churn", "churn label is empty")
    churned = text.isin(positives).astype("boolean").where(~missing, pd.NA)
    return churned, rules


def _by_value(s: pd.Series, transform) -> pd.Series:
    """``transform`` (of a series of texts) applied once to each distinct value of ``s``
    and spread back to its rows; missing values stay missing. The text rules of a column
    with few distinct values (a status, a category: a handful in millions of rows) cost
    the distinct values' work, not the rows'."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    done = transform(pd.Series(uniques, dtype=s.dtype))
    return pd.Series(done.array.take(codes, allow_fill=True), index=s.index)


def _as_text(s: pd.Series) -> pd.Series:
    if pd.api.types.is_string_dtype(s) and not pd.api.types.is_object_dtype(s):
        return s
    if pd.api.types.is_float_dtype(s):
        # ids stored as floats in Parquet/Excel: 17.0 -> "17"
        whole = s.dropna()
        if len(whole) and (whole == np.floor(whole)).all():
            return s.astype("Int64").astype("str").where(s.notna(), pd.NA).astype("str")
    return s.astype("str").where(s.notna(), pd.NA)


#: An integer written as a float: ``17850.0``.
_FLOAT_ID = re.compile(r"^(\d+)\.0+$")

#: A time of day's offset from UTC (``Z``, ``+02:00``, ``-0500``), after the time.
_UTC_OFFSET = re.compile(r"(\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?:Z|UTC|[+-]\d{2}(?::?\d{2})?)$")


def _parse_dates(s: pd.Series, fmt: str | None) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Dates of the text or typed column ``s`` (``fmt``: a strftime format, default ISO
    8601), normalised to the day; a time with an offset from UTC counts on the day of
    its own clock (``2024-01-01T23:30-05:00`` is 1 January), whether every row has the same
    offset or not. Returns the dates, the unparseable rows and the missing ones."""
    if pd.api.types.is_datetime64_any_dtype(s):
        parsed = s.dt.tz_localize(None) if getattr(s.dt, "tz", None) else s
        parsed = parsed.astype("datetime64[ns]").dt.normalize()
        missing = parsed.isna()
        return parsed, pd.Series(False, index=s.index), missing
    text = _as_text(s).str.strip()
    missing = text.isna() | (text == "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            parsed = pd.to_datetime(text.where(~missing), format=fmt or "ISO8601",
                                    errors="coerce")
        except ValueError:      # times with offsets that differ from row to row
            parsed = pd.to_datetime(text.where(~missing).str.replace(
                _UTC_OFFSET, r"\1", regex=True), format=fmt or "ISO8601", errors="coerce")
    if getattr(parsed.dt, "tz", None) is not None:
        # the day on the clock where it happened, as for a typed column with a zone
        parsed = parsed.dt.tz_localize(None)
    parsed = parsed.astype("datetime64[ns]").dt.normalize()
    unparseable = parsed.isna() & ~missing
    return parsed, unparseable, missing


_CURRENCY = re.compile(r"[\s$€£¥₹]|(?i:usd|eur|gbp|chf)")


#: A negative amount as accounting and ERP exports write it: ``(12.50)`` or ``12.50-``.
_ACCOUNTING_NEGATIVE = re.compile(r"^\(([^()-]+)\)$|^([^()-]+)-$")


def _parse_numbers(s: pd.Series, *, decimal: str, thousands: str | None) -> tuple[pd.Series, pd.Series]:
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return s.astype("float64"), pd.Series(False, index=s.index)
    text = _as_text(s).str.strip()
    missing = text.isna() | (text == "")
    cleaned = text.str.replace(_CURRENCY, "", regex=True)
    if thousands:
        cleaned = cleaned.str.replace(thousands, "", regex=False)
    if decimal != ".":
        cleaned = cleaned.str.replace(decimal, ".", regex=False)
    values = pd.to_numeric(cleaned.where(~missing), errors="coerce").astype("float64")
    unparseable = values.isna() & ~missing
    if unparseable.any():
        # accounting negatives: "(12.50)", and the trailing minus of ERP exports "12.50-"
        signed = cleaned[unparseable].str.extract(_ACCOUNTING_NEGATIVE)
        magnitude = pd.to_numeric(signed[0].fillna(signed[1]), errors="coerce")
        found = magnitude.notna().to_numpy()
        if found.any():
            values = values.copy()
            values.loc[magnitude.index[found]] = -magnitude[found].abs().to_numpy()
            unparseable = values.isna() & ~missing
    return values, unparseable


#: The columns whose values are parsed as dates, per table (the others parsed as numbers
#: are :data:`NUMBER_COLUMNS`).
DATE_COLUMNS = {"transactions": ["order_date"], "customers": ["signup_date"],
                "interactions": ["date"], "campaign": ["campaign_date"]}
NUMBER_COLUMNS = ("amount", "quantity", "unit_price", "margin", "cost", "score", "tenure",
                  "recurring_revenue", "total_revenue")


def _stop_if_mostly_bad(bad: pd.Series, raw: pd.Series, spec: TableSpec, column: str,
                        tally: dict[str, list[int]] | None) -> None:
    """Stop when more than half of the column's rows read so far (``tally``: the
    chunks before; None: this one alone) do not parse."""
    counts = (tally if tally is not None else {}).setdefault(column, [0, 0])
    counts[0] += int(bad.sum())
    counts[1] += len(bad)
    n_bad, n_rows = counts
    if bad.any() and n_bad > _MAX_UNPARSEABLE_SHARE * n_rows:
        raise _mostly_bad(spec, column, n_bad, n_rows,
                          raw[bad].astype("object").head(5).tolist())


def _mostly_bad(spec: TableSpec, column: str, n_bad: int, n_rows: int,
                examples: list) -> DataContractError:
    """The stop of a column most of whose rows read so far do not parse."""
    if column in {c for cols in DATE_COLUMNS.values() for c in cols}:
        rule = "date_format"
        message = (f"dates do not match the date format "
                   f"{spec.date_format or 'ISO 8601 (YYYY-MM-DD)'}; set 'date_format' in "
                   f"the config")
    else:
        rule = "number_format"
        message = "values are not numbers; check 'decimal' and 'thousands' in the config"
    return DataContractError(file=spec.source, rule=rule, column=column, n_rows=n_bad,
                             message=f"{n_bad:,} of {n_rows:,} {message}", examples=examples)


def _flag(rules: pd.Series, mask: pd.Series, rule: str, detail: object) -> pd.Series:
    """Record ``rule`` for rows in ``mask`` that have no earlier rule.

    ``detail`` is a text, a series aligned with ``rules``, or a function of the raw
    values of the flagged rows (called only for them) returning their texts.
    """
    mask = mask.fillna(False).astype(bool) & rules.isna()
    if not mask.any():
        return rules
    if callable(detail):
        text = pd.Series(list(detail(mask)), index=rules.index[mask.to_numpy()], dtype="object")
    elif isinstance(detail, pd.Series):
        text = detail[mask].astype(str)
    else:
        text = pd.Series(str(detail), index=rules.index[mask.to_numpy()], dtype="object")
    rules = rules.copy()
    rules[mask] = (rule + "\t" + text.astype(str)).to_numpy()
    return rules


def _describe(values: pd.Series, template: str):
    """A lazy detail: ``template`` formatted with each flagged raw value."""
    return lambda mask: [template.format(v=v) for v in values[mask].astype("object")]


# --------------------------------------------------------------------------- row rules

#: The row rules a parsed row is judged by, per table, in the order they apply (a row
#: that breaks several is set aside for the first): (rule, column, the SQL condition
#: under which the row breaks it). A rule on a column the table lacks does not apply.
#: A value missing in a column that may be empty passes; ``missing_value`` (a required
#: value missing) cannot happen after parsing, which sets such rows aside as
#: ``missing_date``, ``missing_amount`` and so on, and is kept as the contract's
#: statement. ``{today}``, ``{min_date}`` and ``{max_abs_amount}`` come from the run.
ROW_RULES: dict[str, list[tuple[str, str, str]]] = {
    "transactions": [
        ("missing_value", "customer_id", "customer_id IS NULL"),
        ("missing_customer_id", "customer_id", "length(customer_id) = 0"),
        ("missing_value", "order_date", "order_date IS NULL"),
        ("date_in_future", "order_date", "order_date > {today}"),
        ("date_too_old", "order_date", "order_date < {min_date}"),
        ("missing_value", "amount", "amount IS NULL"),
        ("non_finite_amount", "amount", "isinf(amount)"),
        ("amount_out_of_range", "amount", "abs(amount) > {max_abs_amount}"),
        ("negative_quantity", "quantity", "quantity < 0"),
        ("non_finite_margin", "margin", "isinf(margin)"),
        ("unknown_status", "status", "status NOT IN ('completed', 'cancelled', 'returned')"),
    ],
    "campaign": [
        ("missing_value", "customer_id", "customer_id IS NULL"),
        ("missing_customer_id", "customer_id", "length(customer_id) = 0"),
        ("missing_value", "campaign_date", "campaign_date IS NULL"),
        ("date_in_future", "campaign_date", "campaign_date > {today}"),
        ("date_too_old", "campaign_date", "campaign_date < {min_date}"),
    ],
    "customers": [
        ("missing_value", "customer_id", "customer_id IS NULL"),
        ("missing_customer_id", "customer_id", "length(customer_id) = 0"),
        ("date_in_future", "signup_date", "signup_date > {today}"),
        ("date_too_old", "signup_date", "signup_date < {min_date}"),
    ],
    "interactions": [
        ("missing_value", "customer_id", "customer_id IS NULL"),
        ("missing_customer_id", "customer_id", "length(customer_id) = 0"),
        ("missing_value", "date", "date IS NULL"),
        ("date_in_future", "date", "date > {today}"),
        ("date_too_old", "date", "date < {min_date}"),
        ("non_finite_score", "score", "isinf(score)"),
    ],
}

#: Judges every parsed row of a table at once: the first row rule it breaks (an index
#: into the table's rules), for the rows that break one.
BROKEN_RULES = """
SELECT file_row, broken
FROM (SELECT file_row, {first_broken} AS broken FROM parsed)
WHERE broken IS NOT NULL
"""

#: The rows that repeat an earlier row (by file order) among the rows that break no
#: rule: copies of every parsed value (``key``; a missing value equals a missing value,
#: -0.0 equals 0.0), or, in a customer table, of the id. Rows sharing a hash of the key
#: are the candidates, compared in full.
REPEATED_ROWS = """
WITH shared AS (
    SELECT hash({key}) AS h FROM parsed WHERE ({first_broken}) IS NULL
    GROUP BY h HAVING COUNT(*) > 1
)
SELECT file_row FROM parsed
WHERE ({first_broken}) IS NULL AND hash({key}) IN (SELECT h FROM shared)
QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY file_row) > 1
"""


def _judge_rows(parts: list[pd.DataFrame], *, table: str, config: Config,
                today: dt.date, others: list[np.ndarray] | None = None) -> pd.Series:
    """The parsed rows (``parts``: the parsed rows of the whole file, chunk by chunk,
    indexed by file row - 1) set aside after parsing: those breaking a rule of
    :data:`ROW_RULES` and those repeating an earlier row (``duplicate_customer``: an id
    seen before, in a customer table; elsewhere ``duplicate_row``, an exact copy, where
    ``cleaning.dedupe`` removes them), judged by DuckDB over all rows at once. The parts
    are handed to DuckDB as they are (Arrow, no copy of the file's values). ``others``:
    per part, a hash of each row's values in the file's columns the contract does not
    read; a copy must match there too.

    Returns
    -------
    Series
        ``rule<TAB>detail`` per row set aside, indexed by file row - 1, in file order.
    """
    import duckdb
    import pyarrow as pa

    rules, broken_sql, repeated_sql = _judging_sql(
        list(parts[0].columns), table=table, config=config, today=today,
        others=others is not None)
    if others is not None and len(others) != len(parts):
        raise ValueError("one hash of the other columns per part is needed")
    # a missing number is NULL here, as pandas' NaN is missing to the parse
    parsed = pa.concat_tables(
        [pa.Table.from_pandas(p.assign(file_row=p.index.to_numpy(), **(
            {_OTHER_COLUMNS: others[i]} if others is not None else {})),
            preserve_index=False) for i, p in enumerate(parts)],
        promote_options="default")
    con = duckdb.connect()
    try:
        con.execute("SET allocator_flush_threshold = '32MB'")   # give memory back after
        # the parsed file is held by Python meanwhile: DuckDB gets what the budget leaves
        if limit := config.analysis.duckdb_memory_left(rss_bytes()):
            con.execute(f"SET memory_limit = '{limit}'")
            spill = str(spill_directory()).replace("'", "''")
            con.execute(f"SET temp_directory = '{spill}'")
        con.register("parsed", parsed)
        broken = con.execute(broken_sql).fetchnumpy()
        repeated = (con.execute(repeated_sql).fetchnumpy()["file_row"] if repeated_sql
                    else np.empty(0, dtype=np.int64))
    finally:
        con.close()
    del parsed
    flagged = np.concatenate([broken["file_row"], repeated])
    judged = pd.concat([p.loc[p.index.intersection(flagged)] for p in parts])
    return _judged_text(rules, broken["file_row"], broken["broken"], repeated, judged,
                        table=table)


def _judging_sql(columns: list[str], *, table: str, config: Config, today: dt.date,
                 others: bool) -> tuple[list[tuple[str, str, str]], str, str | None]:
    """The row rules that apply to a table of ``columns`` and the two queries that judge
    its parsed rows (the view ``parsed``, with ``file_row``, and with
    :data:`_OTHER_COLUMNS` when ``others``): :data:`BROKEN_RULES` and
    :data:`REPEATED_ROWS` (None where no copies are removed), in DuckDB's dialect."""
    rules = [r for r in ROW_RULES[table] if r[1] in columns]
    c = config.cleaning
    values = {"today": f"TIMESTAMP '{pd.Timestamp(today)}'",
              "min_date": f"TIMESTAMP '{pd.Timestamp(c.min_date)}'",
              "max_abs_amount": f"CAST('{float(c.max_abs_amount)!r}' AS DOUBLE)"}
    first_broken = ("CASE " + " ".join(f"WHEN {cond.format(**values)} THEN {i}"
                                       for i, (_, _, cond) in enumerate(rules)) + " END")
    key = _repeat_key(columns, table=table, config=config)
    if others:
        key = [*key, _OTHER_COLUMNS] if key else key
    repeated = (REPEATED_ROWS.format(first_broken=first_broken,
                                     key=", ".join(_ident(col) for col in key))
                if key else None)
    return rules, BROKEN_RULES.format(first_broken=first_broken), repeated


def _judged_text(rules: list[tuple[str, str, str]], broken_rows: np.ndarray,
                 broken: np.ndarray, repeated: np.ndarray, judged: pd.DataFrame, *,
                 table: str) -> pd.Series:
    """``rule<TAB>detail`` of each row set aside by the queries of :func:`_judging_sql`
    (``broken_rows`` breaking rule number ``broken``; ``repeated``), from their parsed
    values (``judged``, indexed by file row - 1), in file order."""
    out = []
    for i, (rule, column, _) in enumerate(rules):
        rows = broken_rows[broken == i]
        if len(rows):
            out.append(pd.Series([f"{rule}\t{column}={_case_text(v)}"
                                  for v in judged.loc[rows, column].astype("object")],
                                 index=rows, dtype="object"))
    if len(repeated):
        if table == "customers":
            text = [f"duplicate_customer\tcustomer_id={v!r} seen before"
                    for v in judged.loc[repeated, "customer_id"].astype("object")]
        else:
            text = "duplicate_row\texact copy of an earlier row"
        out.append(pd.Series(text, index=repeated, dtype="object"))
    if not out:
        return pd.Series(dtype="object", index=pd.Index([], dtype="int64"))
    return pd.concat(out).sort_index()


#: The column of :func:`_judge_rows` holding a hash of a row's other columns.
_OTHER_COLUMNS = "_other_columns"


def _repeat_key(columns: list[str], *, table: str, config: Config) -> list[str]:
    """The columns two rows must share to be duplicates (none: no duplicates removed)."""
    if table == "customers":
        return ["customer_id"]
    policy = config.cleaning.dedupe
    if policy == "never" or (policy == "auto" and "order_id" not in columns):
        return []
    return list(columns)


def _case_text(value) -> str:
    """A failing value as text; dates without a time of day as YYYY-MM-DD."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.strftime("%Y-%m-%d")
    return str(value)


def _ident(name: str) -> str:
    return '"' + str(name).replace('"', '""') + '"'


# --------------------------------------------------------------------------- outputs


def _quarantine_frame(raw: pd.DataFrame, mapped: pd.DataFrame, rules: pd.Series,
                      bad: pd.Series) -> pd.DataFrame:
    hits = rules[bad].astype(str).tolist()
    parts = [h.split("\t", 1) + [""] for h in hits]
    q = pd.DataFrame({
        "source_row": (rules.index[bad.to_numpy()].to_numpy() + 1).astype("int64"),
        "rule": pd.Series([p[0] for p in parts], dtype="object"),
        "detail": pd.Series([p[1] for p in parts], dtype="object"),
    })
    original = raw.loc[bad.to_numpy()].reset_index(drop=True).astype("object")
    original.columns = [f"raw:{c}" for c in original.columns]
    return pd.concat([q, original], axis=1)


def _transaction_measures(engine: DuckDBEngine | SparkEngine,
                          log: CleanTable | SparkCleanTable | None) -> pd.DataFrame:
    """Lines, revenue, refunds, zero amounts, outliers (above Q3 + 3 IQR, the quartiles
    interpolated as numpy's) and statuses of the cleaned order log (``clean_transactions``
    on ``engine``). The revenue is summed as a decimal (to a millionth), so that it
    is the same in any order of summing, on any engine."""
    if log is None or not log.n_processed:
        return pd.DataFrame(columns=["measure", "value"])
    view = _clean_view("transactions")
    lines, revenue, refunds, zeros, largest, q1, q3 = engine.rows(
        "SELECT COUNT(*), CAST(SUM(CAST(amount AS DECIMAL(38, 6))) FILTER (WHERE "
        "status = 'completed') AS DOUBLE), "
        "COUNT(*) FILTER (WHERE amount < 0), COUNT(*) FILTER (WHERE amount = 0), "
        "MAX(amount), QUANTILE_CONT(amount, 0.25), QUANTILE_CONT(amount, 0.75) "
        f"FROM {view}")[0]
    upper = q3 + 3 * (q3 - q1)
    outliers = engine.rows(f"SELECT COUNT(*) FROM {view} WHERE amount > "
                           f"CAST('{upper!r}' AS DOUBLE)")[0][0]
    rows = [
        ("order lines", int(lines)),
        ("revenue (completed)", float(revenue or 0.0)),
        ("refund lines (negative amount)", int(refunds)),
        ("zero-amount lines", int(zeros)),
        (f"outlier lines (amount above {upper:,.2f} = Q3 + 3 IQR)", int(outliers)),
        ("largest amount", float(largest)),
    ]
    for status, n in engine.rows(f"SELECT status, COUNT(*) FROM {view} GROUP BY status "
                                 "ORDER BY status"):
        rows.append((f"status {status}", int(n)))
    return pd.DataFrame(rows, columns=["measure", "value"]).astype({"value": "object"})


def _monthly(engine: DuckDBEngine | SparkEngine,
             log: CleanTable | SparkCleanTable | None) -> pd.DataFrame:
    """Orders, customers and revenue of completed lines per month, counted over the
    cleaned order log (``clean_transactions`` on ``engine``; the revenue summed as a
    decimal, as :func:`_transaction_measures` sums it)."""
    if log is None or not log.n_processed:
        return pd.DataFrame(columns=["month", "orders", "customers", "revenue"])
    columns = engine.columns(_clean_view("transactions"))
    key = ("order_id" if "order_id" in columns
           else "customer_id || '|' || CAST(CAST(order_date AS DATE) AS VARCHAR)")
    out = engine.frame(
        "SELECT strftime(date_trunc('month', order_date), '%Y-%m-%d') AS month, "
        f"COUNT(DISTINCT {key}) AS orders, COUNT(DISTINCT customer_id) AS customers, "
        f"CAST(SUM(CAST(amount AS DECIMAL(38, 6))) AS DOUBLE) AS revenue "
        f"FROM {_clean_view('transactions')} "
        "WHERE status = 'completed' GROUP BY 1 ORDER BY 1")
    return out.astype({"orders": "int64", "customers": "int64", "revenue": "float64"})


#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV
#: injection"): a text cell starting with one is written with a single quote before it.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise_csv_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as it should be written to a CSV that people open in a spreadsheet:
    every text cell, and column name, that starts with one of :data:`FORMULA_PREFIXES`
    gets a single quote in front (``=HYPERLINK(...)`` becomes ``'=HYPERLINK(...)``), so
    the spreadsheet shows it as text instead of evaluating it.

    Only text changes (object, string and categorical columns): numbers in numeric
    columns, negative ones included, are left as they are; a number stored as text
    (``"-12"``) is text and gets the quote too, as OWASP advises. ``frame`` itself is not
    modified; columns without such a cell are not copied.
    """
    out = frame.copy(deep=False)
    for i, col in enumerate(frame.columns):
        s = frame.iloc[:, i]
        if isinstance(s.dtype, pd.CategoricalDtype):
            if not _formula_like(s.cat.categories.to_numpy(dtype=object)).any():
                continue
        elif isinstance(s.dtype, pd.StringDtype):
            # (the text's own test, a column at once: a million customers' table took
            # 6 s cell by cell)
            if not s.str.startswith(FORMULA_PREFIXES).fillna(False).any():
                continue
        elif s.dtype != object:
            continue
        values = s.to_numpy(dtype=object)
        risky = _formula_like(values)
        if risky.any():
            values = values.copy()
            values[risky] = ["'" + v for v in values[risky]]
            out.isetitem(i, values)
    names = np.array(list(frame.columns), dtype=object)
    if _formula_like(names).any():
        out.columns = ["'" + c if risky else c
                       for c, risky in zip(names, _formula_like(names), strict=True)]
    return out


def _formula_like(values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are text that a spreadsheet would take for a formula."""
    return np.fromiter((isinstance(v, str) and v.startswith(FORMULA_PREFIXES)
                        for v in values), dtype=bool, count=len(values))


def write_csv(path: str | Path, frame: pd.DataFrame, **to_csv) -> Path:
    """Write ``frame`` as a CSV for people, atomically (:func:`write_atomically`), with
    formula-like text neutralised (:func:`neutralise_csv_cells`), without the index and
    with lines ending in CRLF as RFC 4180 has it (then a cell holding a carriage return
    is quoted; with bare newlines it would end the row). ``to_csv`` options go to
    :meth:`pandas.DataFrame.to_csv`.

    Every CSV a run writes for people goes through here (or :func:`write_csv_frames`);
    Parquet files keep the values as they are.
    """
    return write_csv_frames(path, [frame], **to_csv)


def write_csv_frames(path: str | Path, frames: Iterable[pd.DataFrame], **to_csv) -> Path:
    """:func:`write_csv` of a table that comes in parts (``frames``, with the same
    columns; a large table streamed, :meth:`analysis.store.RunStore.stream`): the same
    bytes as :func:`write_csv` of the parts put together, the header once, with only one
    part in memory at a time. ``frames`` must hold at least one frame (an empty one for
    a header alone)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for i, frame in enumerate(frames):
                _append_csv(out, frame, header=i == 0, **to_csv)
    return write_atomically(path, write)


def _append_csv(out, frame: pd.DataFrame, *, header: bool, **to_csv) -> None:
    """``frame``'s rows (after the header, when ``header``) appended to the open binary
    file ``out``, as :func:`write_csv` writes them."""
    safe = neutralise_csv_cells(frame)
    if not to_csv and (table := _csv_ready(safe)) is not None:
        _copy_csv(table, out, header=header)
        return
    options = {"index": False, "lineterminator": "\r\n", **to_csv}
    safe.to_csv(out, header=header, **options)


def _csv_ready(frame: pd.DataFrame) -> pd.DataFrame | None:
    """``frame`` with the columns whose text DuckDB's CSV writer would write otherwise
    than pandas' ``to_csv`` already written as that text: flags as ``True``/``False``,
    float32 as its own shortest digits, times as pandas writes them, and an empty text
    as nothing (DuckDB would write ``""``); None when a column is of a kind this does
    not know (pandas then writes the file). The same bytes, several times faster: a
    million customers' table took 44 s through ``to_csv``."""
    # (one column: pandas writes a missing cell as "", DuckDB as a blank line, which
    # readers skip)
    if (len(frame.columns) < 2 or frame.columns.has_duplicates
            or not all(isinstance(c, str) for c in frame.columns)):
        return None
    out = frame.copy(deep=False)
    for i in range(frame.shape[1]):
        s = frame.iloc[:, i]
        kind = s.dtype
        if isinstance(kind, pd.CategoricalDtype):
            if pd.api.types.infer_dtype(kind.categories, skipna=True) != "string" or (
                    kind.categories == "").any():
                return None
        elif kind == bool:
            out.isetitem(i, np.where(s.to_numpy(), "True", "False").astype(object))
        elif kind == np.float32:
            values = s.to_numpy()
            out.isetitem(i, pd.Series(values.astype(str), index=s.index, dtype=object)
                         .where(~np.isnan(values), None))
        elif pd.api.types.is_datetime64_dtype(kind):
            out.isetitem(i, s.astype(str).astype(object).where(s.notna(), None))
        elif kind == object or isinstance(kind, pd.StringDtype):
            values = s.to_numpy(dtype=object, na_value=None)
            if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
                return None
            empty = values == ""
            if empty.any():
                values = values.copy()
                values[empty] = None
            out.isetitem(i, values)
        elif not (isinstance(kind, np.dtype) and kind.kind in "iuf") and not isinstance(
                kind, pd.Int64Dtype | pd.Int32Dtype | pd.Float64Dtype):
            return None
    return out


def _copy_csv(frame: pd.DataFrame, out, *, header: bool = True) -> None:
    """``frame`` (from :func:`_csv_ready`) written as CSV by DuckDB and appended to the
    open binary file ``out``: a header when ``header``, quotes only where needed, lines
    ending in CRLF, rows in the frame's order."""
    import duckdb

    fd, tmp = tempfile.mkstemp(dir=Path(out.name).parent, prefix=".csv-part.",
                               suffix=".tmp")
    os.close(fd)
    # one thread: with two, DuckDB buffered about 1.1 GB more for a million customers'
    # table, in the same time (9.4 s against 10.4 s)
    con = duckdb.connect(config={"threads": 1})
    try:
        con.register("_csv_frame", frame)
        con.execute(f"COPY _csv_frame TO '{tmp.replace(chr(39), chr(39) * 2)}' "
                    f"(FORMAT csv, HEADER {str(header).lower()}, NEW_LINE '\r\n')")
        with open(tmp, "rb") as part:
            shutil.copyfileobj(part, out, 1 << 20)
    finally:
        con.close()
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomically(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into
    place, so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # (mkstemp's file is its owner's alone: give it a new file's permissions)
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- on Spark
#
# With ``analysis.engine: spark`` a run's input is loaded and validated by Spark's
# executors, by the functions above: each partition of the file's rows is mapped and
# parsed by :func:`_map_columns` and :func:`_parse` (``mapInPandas``); the stop for a
# column most of whose rows do not parse is judged from per-chunk counts, chunk by chunk
# as :func:`load_table` reads; the row rules and the copies are :func:`_judging_sql`'s
# queries, transpiled; the cleaned rows are written by the executors. Only the quarantine
# (its rows, with their original values), the counts and the summary's figures come to
# the driver.

#: The column holding a row's place in its file (0-based), on Spark.
FILE_ROW = "file_row"
_RULE = "_rule"              # rule<TAB>detail of a row set aside while parsing
_UNPARSEABLE = "_unparseable"    # bit i: the i-th checked column did not parse
_UNDECODABLE = "_undecodable"    # the row holds text the file's encoding could not decode
_INTERNAL = {_RULE, _UNPARSEABLE, _UNDECODABLE, _OTHER_COLUMNS}
#: rows of the file read on the driver first: its columns, its mapping onto the contract
_HEAD_ROWS = 1_000


@dataclass(frozen=True)
class SparkCleanTable:
    """One input table loaded and cleaned on Spark (:func:`load_table_on_spark`): as a
    :class:`CleanTable`, but ``data`` is a Spark DataFrame, cached on the executors,
    with :data:`FILE_ROW` beside the contract's columns."""

    name: str
    file: Path | str
    data: Any
    quarantine: pd.DataFrame
    n_read: int
    n_processed: int
    notes: tuple[str, ...] = ()
    given: tuple[str, ...] = ()

    @property
    def n_quarantined(self) -> int:
        return len(self.quarantine)


def load_dataset_on_spark(config: Config, engine: SparkEngine, *,
                          today: dt.date | None = None
                          ) -> dict[str, SparkCleanTable | CleanTable]:
    """:func:`load_dataset` on Spark (``engine``: an :class:`analysis.engine.SparkEngine`):
    each table by :func:`load_table_on_spark` (a table that stops the load lets go of
    the cleaned rows of those before it)."""
    today = today or dt.date.today()
    tables: dict[str, SparkCleanTable | CleanTable] = {}
    try:
        for name, spec in config.tables.items():
            tables[name] = load_table_on_spark(spec, table=name, config=config,
                                               engine=engine, today=today)
    except BaseException:
        for table in tables.values():
            if isinstance(table, SparkCleanTable):
                table.data.unpersist()
        raise
    return tables


def load_table_on_spark(spec: TableSpec, *, table: str, config: Config, engine: SparkEngine,
                        today: dt.date, chunk_rows: int = CHUNK_ROWS
                        ) -> SparkCleanTable | CleanTable:
    """:func:`load_table` by Spark's executors: the same cleaned rows, quarantine (rows,
    rules, details, original values), counts, notes and stops.

    The file's first rows are read on the driver first, as :func:`load_table` reads
    them: a missing, empty or undecodable file, a missing column or a file of a header
    alone stops there. A file Spark does not read as pandas does (Excel, a separator of
    whitespace, an encoding other than UTF-8, Latin-1 or ASCII, a Parquet file with
    times in a zone, or one whose columns Spark names otherwise) is loaded on the driver
    by :func:`load_table` (a :class:`CleanTable`). A table of the Spark catalog
    (``spec.table``) is read by Spark, its rows numbered in the order Spark reads them.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as fn

    if spec.table is not None:
        head = _table_head(spec, engine)
    else:
        reader = _read_chunks(spec, _HEAD_ROWS)
        try:
            head = next(reader)
        finally:
            reader.close()
    head.columns = [str(c) for c in head.columns]
    raw = None if head.empty else _spark_raw(spec, engine, list(head.columns))
    if raw is None:
        return load_table(spec, table=table, config=config, today=today,
                          chunk_rows=chunk_rows)
    mapped, notes, unread = _map_columns(head, spec, table=table, pii=config.pii)
    given = tuple(mapped.columns)
    others = (table != "customers" and bool(unread)       # (as load_table hashes them)
              and bool(_repeat_key(list(given), table=table, config=config)))
    parse = _partition_parser(spec, table=table, config=config, others=others,
                              undecodable=_decodes_with_replacement(spec))
    schema = _parsed_schema(parse(iter([head.assign(**{FILE_ROW: np.arange(len(head))})])))
    parsed = raw.mapInPandas(parse, schema).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        checked = [c for c in (*DATE_COLUMNS[table], *NUMBER_COLUMNS) if c in given]
        _stop_on_spark(parsed, raw, spec, table=table, config=config, checked=checked,
                       chunk_rows=chunk_rows)
        parsed.where(fn.col(_RULE).isNull()).drop(_RULE, _UNPARSEABLE, _UNDECODABLE) \
            .createOrReplaceTempView("parsed")
        keep = [c for c in schema.fieldNames() if c not in _INTERNAL]
        rules, broken_sql, repeated_sql = _judging_sql(
            [c for c in keep if c != FILE_ROW], table=table, config=config, today=today,
            others=others)
        broken = engine.frame(broken_sql)
        repeated = (engine.frame(repeated_sql)[FILE_ROW].to_numpy(dtype="int64")
                    if repeated_sql else np.empty(0, dtype="int64"))
        flagged = np.concatenate([broken[FILE_ROW].to_numpy(dtype="int64"), repeated])
        judged = _rows_of(parsed, flagged)
        later = _judged_text(rules, broken[FILE_ROW].to_numpy(dtype="int64"),
                             broken["broken"].to_numpy(), repeated, judged, table=table)
        early = engine.collect(parsed.where(fn.col(_RULE).isNotNull())
                               .select(FILE_ROW, _RULE))
        marked = pd.concat([pd.Series(early[_RULE].to_numpy(dtype="object"),
                                      index=early[FILE_ROW].to_numpy(dtype="int64"),
                                      dtype="object"), later]).sort_index()
        quarantine = _quarantine_on_spark(raw, marked, spec, table=table, config=config)
        set_aside = _places(engine.session, marked.index.to_numpy(dtype="int64"))
        clean = parsed.where(fn.col(_RULE).isNull()).join(
            fn.broadcast(set_aside), on=FILE_ROW, how="left_anti").select(*keep)
        if config.output.pseudonymize_ids:
            clean = _pseudonymized(clean, key=os.environ[config.output.pseudonym_key_env])
            notes.append("customer ids are pseudonymized (output.pseudonymize_ids)")
        clean = clean.persist(StorageLevel.MEMORY_AND_DISK)
        n_read = raw.count()
        n_processed = clean.count()
    finally:
        engine.session.catalog.dropTempView("parsed")
        parsed.unpersist()
        raw.unpersist()
    return SparkCleanTable(name=table, file=spec.source, data=clean, quarantine=quarantine,
                           n_read=n_read, n_processed=n_processed, notes=tuple(notes),
                           given=given)


def _decodes_with_replacement(spec: TableSpec) -> bool:
    """Whether Spark reads the file's text with a replacement character for bytes its
    encoding cannot decode (where pandas stops): a CSV file in UTF-8."""
    return (spec.resolved_format == "csv"
            and spec.encoding.lower().replace("_", "-") in {"utf-8", "utf8", "utf-8-sig"})


#: The encodings Spark's CSV reader reads line by line as pandas does (UTF-8 and the
#: single-byte ones Spark knows), by the names Spark gives them.
_SPARK_CSV_ENCODINGS = {"utf-8": "UTF-8", "utf8": "UTF-8", "utf-8-sig": "UTF-8",
                        "latin-1": "ISO-8859-1", "latin1": "ISO-8859-1",
                        "iso-8859-1": "ISO-8859-1", "ascii": "US-ASCII",
                        "us-ascii": "US-ASCII"}


def _spark_raw(spec: TableSpec, engine: SparkEngine, columns: list[str]):
    """The file's rows as Spark reads them, under ``columns`` (the names pandas gives),
    with :data:`FILE_ROW` (a CSV file or a table cached, as their rows are numbered
    once); None where Spark cannot read the file as pandas does (see
    :func:`load_table_on_spark`)."""
    from pyspark.sql import functions as fn

    session = engine.session
    fmt = spec.resolved_format
    if fmt == "table":        # (its rows numbered in the order Spark reads them)
        df = session.table(spec.table)
        return _numbered(engine, df, list(df.columns), fn.spark_partition_id())
    path = str(spec.path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if any(pa.types.is_timestamp(f.type) and f.type.tz for f in schema):
            return None
        nanos = [f.name for f in schema if pa.types.is_timestamp(f.type)
                 and f.type.unit == "ns"]
        if nanos:               # (Spark reads no nanoseconds: as analysis.engine does)
            session.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
        df = session.read.parquet(engine.spark_path(path))
        if list(df.columns) != columns:
            return None
        df = df.select(*[(fn.expr(f"timestamp_micros(`{c}` DIV 1000)") if c in nanos
                          else df[f"`{c}`"]).alias(c) for c in df.columns],
                       df["_metadata"]["row_index"].alias(FILE_ROW))
        # (not cached: the file is read again, as it is, for the few rows set aside;
        # caching 17 million lines cost more, 112 s against 98 s for e2e-1m's log)
        return df
    encoding = spec.encoding.lower().replace("_", "-")
    if fmt != "csv" or spec.sep.lower() in {"whitespace", r"\s+", " "} \
            or encoding not in _SPARK_CSV_ENCODINGS:
        return None
    with open(spec.path, "rb") as fh:
        if fh.read(2) in (b"\xff\xfe", b"\xfe\xff"):      # UTF-16, as _read_csv reads it
            return None
    df = session.read.csv(
        engine.spark_path(path), sep=spec.sep, header=spec.header, inferSchema=False, mode="FAILFAST",
        encoding=_SPARK_CSV_ENCODINGS[encoding], quote='"',
        escape='"', ignoreLeadingWhiteSpace=True, ignoreTrailingWhiteSpace=False,
        nullValue="", multiLine=False, enforceSchema=False)
    names = list(spec.names) if spec.names else list(df.columns)
    if len(names) != len(df.columns) or names != columns:
        return None
    df = df.select(*[df[f"`{c}`"].alias(n) for c, n in zip(df.columns, names, strict=True)],
                   df["_metadata"]["file_block_start"].alias("_start"))
    return _numbered(engine, df, names, fn.col("_start"), spec=spec)


def _numbered(engine: SparkEngine, df, names: list[str], block, *,
              spec: TableSpec | None = None):
    """``df`` (its columns ``names``) with :data:`FILE_ROW`, each row's place: the rows of
    the blocks before its own (``block``: where each row's block starts in the file, or
    the partition that reads it) and its place in its block (one task reads a block, so
    its rows' ids are consecutive); cached. A read error of the file (``spec``) stops."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as fn

    df = df.select(*[df[f"`{c}`"] for c in names], block.alias("_block"),
                   fn.monotonically_increasing_id().alias("_id"))
    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    context = df.sparkSession.sparkContext
    # (the first read of the file: a line Spark cannot read stops below, in words;
    # meanwhile Spark would print its stack traces to the terminal)
    context.setLogLevel("OFF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            blocks = df.groupBy("_block").agg(fn.count(fn.lit(1)).alias("n"),
                                              fn.min("_id").alias("first")) \
                .orderBy("_block").toPandas()
    except Exception as exc:          # (Spark's own error, e.g. a line of too many fields)
        df.unpersist()
        if spec is None:
            raise
        raise _unreadable(spec, exc, fields=len(names)) from None
    finally:
        context.setLogLevel("ERROR")          # (as analysis.engine.spark_session sets it)
    blocks["offset"] = blocks["n"].cumsum() - blocks["n"]
    places = engine.session.createDataFrame(
        blocks[["_block", "offset", "first"]].astype("int64"),
        schema="_block long, offset long, first long")
    numbered = df.join(fn.broadcast(places), on="_block").select(
        *[df[f"`{c}`"] for c in names],
        (fn.col("offset") + fn.col("_id") - fn.col("first")).alias(FILE_ROW))
    numbered = numbered.persist(StorageLevel.MEMORY_AND_DISK)
    numbered.count()
    df.unpersist()
    return numbered


def _table_head(spec: TableSpec, engine: SparkEngine) -> pd.DataFrame:
    """The first rows of a catalog table, as the executors get them; the stops for a
    table that is not there or has no rows."""
    from pyspark.errors import AnalysisException

    try:
        df = engine.session.table(spec.table)
    except AnalysisException:              # (no such table or view)
        raise DataContractError(file=spec.table, rule="table_exists",
                                message="no table or view of that name in the Spark "
                                        "session's catalog") from None
    head = df.limit(_HEAD_ROWS).toPandas()
    if head.empty:
        raise DataContractError(file=spec.table, rule="no_rows",
                                message="the table has no rows", examples=list(df.columns))
    return head


def _unreadable(spec: TableSpec, exc: Exception, *, fields: int) -> DataContractError:
    """The stop for a file Spark's reader rejects (in its ``FAILFAST`` mode), with the
    line it names: in a file of ``fields`` columns, a line of more or fewer fields, or
    with a quote left open."""
    text = str(exc)
    line = re.search(r"Malformed CSV record: (.*?)(?: SQLSTATE|\n|$)", text)
    if line is None:
        found = re.search(r"(Malformed[^\n]*|[^\n]*(?:tokens|columns)[^\n]*)", text)
        return DataContractError(file=spec.source, rule="parse_file",
                                 message=f"cannot be read as {spec.resolved_format}: "
                                         f"{(found.group(1) if found else text)[:300]}")
    return DataContractError(
        file=spec.source, rule="parse_file",
        message=f"cannot be read as {spec.resolved_format}: a line does not split into "
                f"the header's {fields} fields (a field too many or too few, or a quote "
                f"left open); check 'sep' in the config", examples=[line.group(1)[:200]])


def _partition_parser(spec: TableSpec, *, table: str, config: Config, others: bool,
                      undecodable: bool):
    """The function each partition of the file's rows is parsed by (``mapInPandas``):
    :func:`_map_columns` and :func:`_parse` on each batch, giving the parsed columns,
    :data:`FILE_ROW`, the rule a row breaks while parsing, which checked columns did not
    parse, whether the row holds undecodable text and, with ``others``, a hash of the
    columns the contract does not read."""
    checked = [c for c in (*DATE_COLUMNS[table], *NUMBER_COLUMNS)]

    def parse(batches):
        for raw in batches:
            rows = raw.pop(FILE_ROW).to_numpy(dtype="int64")
            raw.index = pd.Index(rows)
            mapped, _, unread = _map_columns(raw, spec, table=table, pii=config.pii)
            marks: dict[str, pd.Series] = {}
            parsed, rules = _parse(mapped, spec, table=table, config=config, marks=marks)
            bits = np.zeros(len(raw), dtype="int64")
            for i, col in enumerate(c for c in checked if c in marks):
                bits |= marks[col].to_numpy(dtype=bool).astype("int64") << i
            extra = {FILE_ROW: rows, _RULE: rules.astype("object").to_numpy(),
                     _UNPARSEABLE: bits,
                     _UNDECODABLE: (raw.apply(lambda s: s.astype("str").str.contains(
                         "\ufffd", regex=False).fillna(False)).any(axis=1).to_numpy()
                         if undecodable and raw.shape[1] else np.zeros(len(raw), bool))}
            if others:
                extra[_OTHER_COLUMNS] = pd.util.hash_pandas_object(
                    raw[unread], index=False).to_numpy().view("int64")
            yield parsed.reset_index(drop=True).assign(**extra)

    return parse


def _parsed_schema(frames) -> Any:
    """The Spark schema of :func:`_partition_parser`'s frames (of the file's first rows):
    times without a zone, as the data's are."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(_arrow_of(next(frames)).schema, prefer_timestamp_ntz=True)


def _stop_on_spark(parsed, raw, spec: TableSpec, *, table: str, config: Config,
                   checked: list[str], chunk_rows: int) -> None:
    """The stops :func:`load_table` makes while it reads, made from counts per chunk of
    ``chunk_rows`` rows in file order (chunk by chunk, column by column, as it reads): a
    chunk holding undecodable text, and a ``checked`` column more than half of whose
    rows read so far do not parse."""
    from pyspark.sql import functions as fn

    bit = [(fn.col(_UNPARSEABLE).bitwiseAND(1 << i) != 0) for i in range(len(checked))]
    counted = parsed.groupBy(fn.expr(f"{FILE_ROW} DIV {int(chunk_rows)}").alias("chunk")) \
        .agg(fn.count(fn.lit(1)).alias("n"),
             fn.min(fn.when(fn.col(_UNDECODABLE), fn.col(FILE_ROW))).alias("undecodable"),
             *[fn.sum(b.cast("long")).alias(f"bad{i}") for i, b in enumerate(bit)]) \
        .orderBy("chunk").toPandas()
    n_rows, n_bad = 0, [0] * len(checked)
    for chunk in counted.itertuples(index=False):
        if pd.notna(chunk.undecodable):
            raise DataContractError(
                file=spec.source, rule="encoding",
                message=f"cannot be decoded as {spec.encoding} (row "
                        f"{int(chunk.undecodable) + 1:,} holds bytes that are not "
                        f"{spec.encoding}); set 'encoding' in the config (e.g. latin-1, "
                        "utf-16)")
        n_rows += int(chunk.n)
        for i, column in enumerate(checked):
            bad = int(getattr(chunk, f"bad{i}"))
            n_bad[i] += bad
            if bad and n_bad[i] > _MAX_UNPARSEABLE_SHARE * n_rows:
                first = parsed.where(bit[i] & (fn.expr(f"{FILE_ROW} DIV {int(chunk_rows)}")
                                               == int(chunk.chunk))) \
                    .select(FILE_ROW).orderBy(FILE_ROW).limit(5).toPandas()
                rows = _rows_of(raw, first[FILE_ROW].to_numpy(dtype="int64"))
                mapped, _, _ = _map_columns(rows, spec, table=table, pii=config.pii)
                raise _mostly_bad(spec, column, n_bad[i], n_rows,
                                  mapped[column].astype("object").tolist())


def _rows_of(df, rows: np.ndarray) -> pd.DataFrame:
    """The rows of the Spark DataFrame ``df`` at the places ``rows`` of the file, on the
    driver, in file order, indexed by their place (:data:`FILE_ROW` dropped)."""
    from pyspark.sql import functions as fn

    wanted = _places(df.sparkSession, rows)
    # (converted as the partitions are: an integer column with gaps as floats, as
    # pyarrow gives it to the driver's load)
    found = df.join(fn.broadcast(wanted), on=FILE_ROW, how="left_semi").toPandas()
    found = found.sort_values(FILE_ROW, kind="stable")
    found.index = pd.Index(found.pop(FILE_ROW).to_numpy(dtype="int64"))
    return found


def _quarantine_on_spark(raw, marked: pd.Series, spec: TableSpec, *, table: str,
                         config: Config) -> pd.DataFrame:
    """The quarantine of the rows ``marked`` (``rule<TAB>detail`` by place in the file),
    with their original values, as :func:`_set_aside` makes it."""
    rows = _rows_of(raw, marked.index.to_numpy(dtype="int64"))
    mapped, _, _ = _map_columns(rows, spec, table=table, pii=config.pii)
    rules = pd.Series(marked.loc[rows.index].to_numpy(), index=rows.index, dtype="object")
    return _set_aside(rows, mapped, rules, rules.notna(), config=config)


def _pseudonymized(clean, *, key: str):
    """The Spark DataFrame ``clean`` with its ids pseudonymized (:func:`pseudonymize`),
    by the executors."""
    def each(batches):
        for frame in batches:
            yield frame.assign(customer_id=pseudonymize(frame["customer_id"], key=key))

    return clean.mapInPandas(each, clean.schema)


def _places(session, rows: np.ndarray):
    """The places ``rows`` in a file as a Spark DataFrame of one column,
    :data:`FILE_ROW` (none or many)."""
    return session.createDataFrame(pd.DataFrame({FILE_ROW: np.asarray(rows, dtype="int64")}),
                                   schema=f"{FILE_ROW} long")
