"""Point-in-time customer features and labels, set-based SQL run by DuckDB.

Definitions (``c`` is the cutoff, ``H`` the horizon in days):

- *History* is every record dated strictly before ``c``; *the horizon* is
  ``[c, c + H)``.
- A *completed* line has status ``completed``; a *purchase* line is a completed line
  with ``amount >= 0`` (refunds are negative completed lines: they reduce spend, they are
  not purchases). Cancelled and returned lines count only in ``cancel_rate`` and
  ``return_rate``.
- Money: ``monetary_total``, ``margin_total``, the window spends and ``future_spend`` are
  net sums over completed lines (refunds included); per-order mean and maximum are over
  purchase orders.
- An *order* is an ``order_id``; without order ids, the lines of one customer on one day
  (the literature's "same-day purchases merged into one transaction"). An order is dated
  by its first line; before a cutoff that falls between its lines' days, an order is
  what its lines before the cutoff make it.

Core columns, one row per customer with a purchase before ``c``:

=================  ===========================================================
customer_id        the customer
recency_days       ``c`` minus the last purchase date, in days
frequency          distinct purchase days before ``c``
monetary_total     sum of ``amount`` over completed lines before ``c``
tenure_days        ``c`` minus the first purchase date, in days
churned            1 when there is no purchase in ``[c, c + H)``, else 0
future_spend       sum of ``amount`` over completed lines in ``[c, c + H)``
=================  ===========================================================

Each query below is one concern, named after what it computes. The order log is read
once per call, whatever the number of cutoffs (:func:`snapshots_by_cutoff`): the lines
are rolled up to orders (``ORDERS``) and category spend (``CATEGORY_SPEND``), each
concern is computed for every cutoff from those, and one statement joins them; most
per-customer measures come from one pass over the orders (``ACTIVITY``). A large log is
taken in ranges of customer ids (:data:`LINES_PER_PASS` lines each), one after the other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from analysis.engine import DuckDBEngine, SparkEngine, as_engine, spark_session
from analysis.memory import spill_directory

#: what the functions below run their SQL on: a DuckDB connection from :func:`connect`,
#: or an engine (:func:`connect_spark`)
Connection = duckdb.DuckDBPyConnection | DuckDBEngine | SparkEngine

__all__ = [
    "CORE_COLUMNS",
    "LABEL_COLUMNS",
    "build_features",
    "features_on_spark",
    "write_features",
    "build_snapshots",
    "connect",
    "connect_run",
    "connect_spark",
    "data_end",
    "data_start",
    "fit_horizon_to_history",
    "honest_cutoffs",
    "resolve_as_of",
    "resolve_horizon_days",
    "snapshots_by_cutoff",
    "suggest_horizon_days",
]

CORE_COLUMNS = ("customer_id", "recency_days", "frequency", "monetary_total", "tenure_days",
                "churned", "future_spend")
LABEL_COLUMNS = ("churned", "future_spend", "future_margin", "future_orders", "declined")
WINDOWS_DAYS = (30, 90, 180, 365)

# --------------------------------------------------------------------------- the queries
#
# One pass over the order log serves every cutoff of a call. The lines are read once into
# orders (``ORDERS``; the rare orders spanning several days also by day, ``ORDER_DAYS``)
# and purchase spend per category between cutoffs (``CATEGORY_SPEND``). Order units (an
# order of one day, or one day of a longer order), the purchase days (``PURCHASE_DAYS``)
# and each order's channel (``CHANNEL_CHANGES``) follow from those. Every cutoff's
# features are then computed from these compact tables, a concern at a time: a unit
# counts for a cutoff when it is dated before it, which is what "history" means line by
# line.

#: The columns of the order log the features read (those of them the file has; the
#: others take the defaults of :func:`_lines_sql`).
LINE_INPUTS = ("customer_id", "order_date", "amount", "status", "order_id", "category",
               "channel", "margin")

# Lines as the queries see them: the contract's columns plus an order key.
_LINES = """
SELECT customer_id,
       CAST(order_date AS DATE) AS order_date,
       amount,
       {status} AS status,
       {order_key} AS order_key,
       {category} AS category,
       {channel} AS channel,
       {margin} AS margin
FROM tx_raw
"""

# What a set of an order's lines adds up to (the lines of the order, or of one of its
# days), kept narrow: the tables hold one row per order.
_ORDER_SUMS = """
       COALESCE(bool_or(status = 'completed' AND amount >= 0), FALSE)     AS purchase,
       SUM(amount) FILTER (WHERE status = 'completed' AND amount >= 0)    AS purchase_value,
       SUM(amount) FILTER (WHERE status = 'completed')                    AS net_amount,
       SUM(margin) FILTER (WHERE status = 'completed')                    AS net_margin,
       MIN(channel) FILTER (WHERE status = 'completed' AND amount >= 0)   AS channel,
       COALESCE(bool_or(status = 'completed'), FALSE)                    AS completed,
       CAST(COUNT(*) AS INTEGER)                                          AS n_lines,
       CAST(COUNT(*) FILTER (WHERE status = 'cancelled') AS INTEGER)      AS n_cancelled,
       CAST(COUNT(*) FILTER (WHERE status = 'returned' OR amount < 0) AS INTEGER)
                                                                          AS n_returned"""

# One row per order (customer, order key): the one grouping of the lines by order, over
# the lines any cutoff of the call sees (``end``: the last cutoff plus the horizon). An
# order's date is its first day; nearly every order has all its lines on that day
# (``one_day``; always without order ids, where an order is a customer's lines on one
# day). ``keyed``: the order has an order key (orders without one are not counted as
# future orders). The key itself is not kept.
ORDERS = """
SELECT customer_id,
       MIN(order_date) AS order_date,
       MIN(order_date) = MAX(order_date) AS one_day,
       bool_or(order_key IS NOT NULL) AS keyed,""" + _ORDER_SUMS + """
FROM lines
WHERE order_date < DATE '{end}' {customers}
GROUP BY customer_id, order_key
"""

# The orders whose lines span several days, one row per day: a cutoff between those days
# sees only the days before it. Read only when there are such orders.
ORDER_DAYS = """
SELECT lines.customer_id, lines.order_key, lines.order_date,""" + _ORDER_SUMS + """
FROM lines
SEMI JOIN (SELECT customer_id, order_key FROM lines
           WHERE order_date < DATE '{end}' {customers}
           GROUP BY customer_id, order_key HAVING MIN(order_date) < MAX(order_date)) m
     ON lines.customer_id = m.customer_id AND lines.order_key IS NOT DISTINCT FROM m.order_key
WHERE lines.order_date < DATE '{end}' {customers}
GROUP BY lines.customer_id, lines.order_key, lines.order_date
"""

# Order units: one row per order and day, with what the order is on the unit's day when
# only the days up to it are known. ``first_date`` is the order's date; ``first_purchase``
# marks the unit from which the order is a purchase (its first purchase line);
# ``order_value`` is the order's purchase value up to the unit; ``order_key`` is kept
# for the orders of several days only (``one_day`` orders are one unit each).
ORDER_UNITS = """
SELECT customer_id, CAST(NULL AS VARCHAR) AS order_key, one_day, keyed, order_date,
       order_date AS first_date, purchase, purchase AS first_purchase, purchase_value,
       CASE WHEN purchase THEN purchase_value END AS order_value,
       net_amount, net_margin, completed, n_lines, n_cancelled, n_returned
FROM orders_all
WHERE one_day
"""
ORDER_DAY_UNITS = """
SELECT customer_id, CAST(order_key AS VARCHAR), FALSE, order_key IS NOT NULL, order_date,
       MIN(order_date) OVER whole_order                                   AS first_date,
       purchase,
       purchase AND NOT COALESCE(bool_or(purchase) OVER before_day, FALSE) AS first_purchase,
       purchase_value,
       CASE WHEN bool_or(purchase) OVER up_to_day
            THEN SUM(purchase_value) OVER up_to_day END                   AS order_value,
       net_amount, net_margin, completed, n_lines, n_cancelled, n_returned
FROM order_days
WINDOW whole_order AS (PARTITION BY customer_id, order_key),
       up_to_day AS (PARTITION BY customer_id, order_key ORDER BY order_date
                     ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
       before_day AS (PARTITION BY customer_id, order_key ORDER BY order_date
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
"""

# A purchase order's channel is the first of its purchase lines' channels (alphabetically):
# +1 for that channel from the order's first purchase day; an order spanning several days
# moves to an earlier-named channel when a later day brings one (-1 for the old, +1 for
# the new). Summed up to a cutoff: purchase orders per channel.
CHANNEL_CHANGES = """
SELECT customer_id, order_date, channel, 1 AS delta
FROM orders_all
WHERE one_day AND purchase
"""
CHANNEL_DAY_CHANGES = """
WITH state AS (
    SELECT customer_id, order_key, order_date,
           bool_or(purchase) OVER up_to_day AS is_purchase,
           MIN(channel) OVER up_to_day AS channel
    FROM order_days
    WINDOW up_to_day AS (PARTITION BY customer_id, order_key ORDER BY order_date
                         ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
), moves AS (
    SELECT *, LAG(is_purchase, 1, FALSE) OVER day_before AS was_purchase,
              LAG(channel) OVER day_before AS was_channel
    FROM state
    WINDOW day_before AS (PARTITION BY customer_id, order_key ORDER BY order_date)
)
SELECT customer_id, order_date, channel, 1 AS delta FROM moves
WHERE is_purchase AND (NOT was_purchase OR channel IS DISTINCT FROM was_channel)
UNION ALL
SELECT customer_id, order_date, was_channel, -1 FROM moves
WHERE is_purchase AND was_purchase AND channel IS DISTINCT FROM was_channel
"""

# Distinct purchase days (the dates of purchase orders), each counted from ``counts_from``
# (the day its first order became a purchase: the day itself, unless an order's purchase
# lines came on a later day), with the gap to the customer's previous purchase day.
# ``late`` marks the customers with a day counted from later than itself: before some
# cutoffs their gaps are not a prefix of this sequence and are recomputed (``LATE_GAPS``).
PURCHASE_DAYS = """
WITH days AS (
    SELECT customer_id, first_date AS day, MIN(order_date) AS counts_from
    FROM order_units WHERE first_purchase
    GROUP BY customer_id, first_date
)
SELECT customer_id, day, counts_from,
       DATE_DIFF('day', LAG(day) OVER by_day, day) AS gap_days,
       {late} AS late
FROM days
WINDOW by_day AS (PARTITION BY customer_id ORDER BY day)
"""

# Purchase spend per customer and category between consecutive cutoffs: ``bucket`` is
# the index of the first cutoff that a line is history for.
CATEGORY_SPEND = """
SELECT customer_id, category, {bucket} AS bucket, SUM(amount) AS spend
FROM lines
WHERE status = 'completed' AND amount >= 0 AND order_date < DATE '{last_cutoff}' {customers}
GROUP BY customer_id, category, bucket
"""

# Revenue of completed lines per day (of every customer), for the seasonality of any
# cutoff.
DAILY = """
SELECT order_date, SUM(amount) AS revenue
FROM lines
WHERE status = 'completed' AND order_date < DATE '{end}'
GROUP BY order_date
"""

# The customers of the sampled snapshots: those with an order before the cutoff whose
# id, salted with the cutoff, hashes below the cutoff's threshold (``keep_below``), and
# those a cutoff names (``chosen_customers``: customer_id, k). The other cutoffs keep
# everyone (see :func:`_at_cutoffs`).
SAMPLED_CUSTOMERS = """
SELECT c.customer_id, cut.cutoff, cut.k
FROM (SELECT customer_id, MIN(order_date) AS first_date FROM orders_all
      GROUP BY customer_id) c
JOIN cutoffs cut ON c.first_date < cut.cutoff
WHERE {bucket} < cut.keep_below
UNION ALL
SELECT s.customer_id, cut.cutoff, cut.k FROM chosen_customers s JOIN cutoffs cut ON s.k = cut.k
"""

# Recency, frequency, monetary, tenure, activity windows and rates: every snapshot
# customer's order units before the cutoff, in one pass. An order counts as a purchase
# from its first purchase unit on, dated by its first day.
ACTIVITY = """
SELECT u.cutoff, u.customer_id,
       DATE_DIFF('day', MAX(u.first_date) FILTER (WHERE u.first_purchase), u.cutoff)
                                                                  AS recency_days,
       COUNT(*) FILTER (WHERE u.first_purchase)                  AS n_orders,
       SUM(COALESCE(u.net_amount, 0))                            AS monetary_total,
       DATE_DIFF('day', MIN(u.first_date) FILTER (WHERE u.first_purchase), u.cutoff)
                                                                  AS tenure_days,
       SUM(u.purchase_value) FILTER (WHERE u.purchase)
           / COUNT(*) FILTER (WHERE u.first_purchase)            AS monetary_mean_order,
       MAX(u.order_value)                                        AS monetary_max_order,
       SUM(u.net_margin)                                         AS margin_total,
       SUM(u.net_margin) / NULLIF(SUM(COALESCE(u.net_amount, 0)), 0) AS margin_rate,
       {windows}
       SUM(u.n_cancelled) / SUM(u.n_lines)                       AS cancel_rate,
       SUM(u.n_returned) / SUM(u.n_lines)                        AS return_rate
FROM {units} u
WHERE u.order_date < u.cutoff
GROUP BY u.cutoff, u.customer_id
HAVING COUNT(*) FILTER (WHERE u.first_purchase) > 0
"""

# Activity in the last w days and in the w days before them (rendered per window), by
# the orders' dates.
WINDOW = """COUNT(*) FILTER (WHERE u.first_purchase AND u.first_date >= u.cutoff - {w})
                                                                  AS orders_{w}d,
       COALESCE(SUM(u.net_amount) FILTER (WHERE u.first_date >= u.cutoff - {w}), 0)
                                                                  AS spend_{w}d,
       COALESCE(SUM(u.net_amount) FILTER (WHERE u.first_date <  u.cutoff - {w}
                                            AND u.first_date >= u.cutoff - {w2}), 0)
                                                                  AS spend_prev_{w}d,
       """

# Frequency and the gaps between purchase days before the cutoff: the days counted
# before it, and their gaps, a prefix of the customer's sequence.
GAPS = """
SELECT d.cutoff, d.customer_id,
       COUNT(*)                 AS frequency,
       AVG(d.gap_days)          AS gap_mean_days,
       MEDIAN(d.gap_days)       AS gap_median_days,
       STDDEV_SAMP(d.gap_days)  AS gap_std_days
FROM {days} d
WHERE d.counts_from < d.cutoff AND NOT d.late
GROUP BY d.cutoff, d.customer_id
"""

# The same for the ``late`` customers, recomputed per cutoff.
LATE_GAPS = """
SELECT cutoff, customer_id, COUNT(*), AVG(gap_days), MEDIAN(gap_days),
       STDDEV_SAMP(gap_days)
FROM (SELECT d.cutoff, d.customer_id,
             DATE_DIFF('day', LAG(d.day) OVER (PARTITION BY d.cutoff, d.customer_id
                                               ORDER BY d.day), d.day) AS gap_days
      FROM {days} d
      WHERE d.counts_from < d.cutoff AND d.late)
GROUP BY cutoff, customer_id
"""

CATEGORIES = """
WITH by_cat AS (
    SELECT c.cutoff, c.customer_id, c.category, SUM(c.spend) AS spend
    FROM {spend} c
    WHERE c.bucket <= c.k
    GROUP BY c.cutoff, c.customer_id, c.category
)
SELECT cutoff, customer_id, COUNT(*) AS n_categories,
       FIRST(category ORDER BY ROUND(spend, 6) DESC, category) AS top_category
FROM by_cat
GROUP BY cutoff, customer_id
"""

CHANNELS = """
WITH by_channel AS (
    SELECT c.cutoff, c.customer_id, c.channel, SUM(c.delta) AS n
    FROM {changes} c
    WHERE c.order_date < c.cutoff
    GROUP BY c.cutoff, c.customer_id, c.channel
    HAVING SUM(c.delta) > 0
)
SELECT cutoff, customer_id, COUNT(*) AS n_channels,
       FIRST(channel ORDER BY n DESC, channel) AS top_channel,
       MAX(n) / SUM(n) AS top_channel_share
FROM by_channel
GROUP BY cutoff, customer_id
"""

# ``satisfaction_last``: the score of the last survey; of surveys at the same last time,
# the highest (whichever one a scan meets first would differ from run to run).
INTERACTIONS = """
SELECT i.cutoff, i.customer_id,
       COUNT(*) FILTER (WHERE type = 'complaint')                        AS n_complaints,
       COUNT(*) FILTER (WHERE type = 'complaint'
                        AND i.date >= i.cutoff - 90)                    AS complaints_90d,
       DATE_DIFF('day', MAX(i.date) FILTER (WHERE type = 'complaint'), i.cutoff)
                                                                         AS days_since_complaint,
       COUNT(*) FILTER (WHERE type = 'complaint' AND {unresolved})      AS n_unresolved_complaints,
       COUNT(*) FILTER (WHERE type = 'ticket')                           AS n_tickets,
       ARG_MAX(score, ROW(i.date, score)) FILTER (WHERE type = 'survey'
                                                   AND score IS NOT NULL)
                                                                         AS satisfaction_last,
       AVG(score) FILTER (WHERE type = 'survey')                         AS satisfaction_mean
FROM {interactions} i
WHERE CAST(i.date AS DATE) < i.cutoff
GROUP BY i.cutoff, i.customer_id
"""

ATTRIBUTES = """
SELECT customer_id,
       {signup} AS signup_day
       {attribute_columns}
FROM customers_raw
"""

# Seasonality of the coming horizon, from history only: revenue in the same calendar
# window one year earlier, relative to that year's average per window of the same length.
SEASON = """
SELECT k.cutoff,
       CASE WHEN MIN(d.order_date) <= k.cutoff - 365 THEN
       COALESCE(SUM(d.revenue) FILTER (WHERE d.order_date >= k.cutoff - 365
                                         AND d.order_date <  k.cutoff - 365 + {horizon}), 0)
       / NULLIF(SUM(d.revenue) FILTER (WHERE d.order_date >= k.cutoff - 365
                                         AND d.order_date < k.cutoff) * {horizon} / 365.0, 0)
       END AS season_index   -- unknown without a full year of history
FROM cutoffs k
LEFT JOIN daily d ON d.order_date < k.cutoff
GROUP BY k.cutoff
"""

# Labels over the horizon after the cutoff, and spend over the horizon before it, from
# the completed lines (the units that have some).
LABELS = """
SELECT u.cutoff, u.customer_id,
       bool_or(u.purchase) FILTER (WHERE u.order_date >= u.cutoff)    AS bought,
       SUM(u.net_amount) FILTER (WHERE u.order_date >= u.cutoff)       AS future_spend,
       SUM(u.net_margin) FILTER (WHERE u.order_date >= u.cutoff)       AS future_margin,
       COUNT(*) FILTER (WHERE u.order_date >= u.cutoff AND u.purchase
                          AND u.one_day AND u.keyed)
       + COUNT(DISTINCT u.order_key) FILTER (WHERE u.order_date >= u.cutoff AND u.purchase)
                                                                        AS future_orders,
       SUM(u.net_amount) FILTER (WHERE u.order_date < u.cutoff)        AS spend_before
FROM {units} u
WHERE u.completed
  AND u.order_date >= u.cutoff - {horizon} AND u.order_date < u.cutoff + {horizon}
GROUP BY u.cutoff, u.customer_id
"""


# --------------------------------------------------------------------------- public API


def connect(source: str | Path | Mapping[str, pd.DataFrame], *,
            memory_limit: str | None = None, threads: int | None = None
            ) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the processed tables as views.

    Parameters
    ----------
    source : a folder of cleaned tables (``transactions.parquet`` and optionally
        ``customers.parquet``, ``interactions.parquet``; a run's ``clean/`` folder, which
        is used when given the run folder), or a mapping of table name to frame
        (``transactions`` required; a table the features do not use, such as
        ``campaign``, is left out).
    memory_limit : DuckDB memory limit such as ``"2GB"``; beyond it DuckDB spills to a
        folder under the system's temporary directory.
    threads : DuckDB worker threads (default: all cores).

    Returns
    -------
    duckdb.DuckDBPyConnection
        With views ``tx_raw``, ``lines`` and, where present, ``customers_raw`` and
        ``interactions_raw``.
    """
    con = duckdb.connect()
    # give freed memory back to the system after each query: DuckDB's allocator keeps it
    # otherwise (0.8 GB held after a 300k-customer feature build, with nothing left in
    # use), and Python's tables then sit on top of it. The flush threshold covers the
    # thread caches; the background threads return the freed pages within about a second.
    # (Not a source of run-to-run differences: on large inputs the feature SQL's float
    # sums differ in their last bits between runs with or without these threads, when
    # DuckDB splits a customer's rows across threads; see the README, "Reproducible".)
    con.execute("SET allocator_flush_threshold = '32MB'")
    con.execute("SET allocator_background_threads = true")
    if memory_limit:
        con.execute(f"SET memory_limit = '{_sql_text(memory_limit)}'")
        con.execute(f"SET temp_directory = '{_sql_text(str(spill_directory()))}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    for view, table in _raw_tables(source).items():
        if isinstance(table, Path):     # (a folder: the Parquet part files Spark writes)
            where = str(table / "**" / "*.parquet") if table.is_dir() else str(table)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM "
                        f"read_parquet('{_sql_text(where)}')")
        else:
            con.register(f"{view}_df", table)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM {view}_df")
    con.execute("CREATE VIEW lines AS " + _lines_sql(DuckDBEngine(con)))
    return con


def connect_spark(source: str | Path | Mapping[str, pd.DataFrame] | None, *,
                  session: Any = None, master: str | None = None,
                  conf: Mapping[str, object] | None = None) -> SparkEngine:
    """The same views as :func:`connect`, on Apache Spark: every function of this
    module then runs there (``analysis.engine: spark``).

    Parameters
    ----------
    source : as in :func:`connect` (a folder of Parquet tables, which Spark reads, or
        frames, which are handed to Spark, or Spark's DataFrames), or None to use the
        temporary views
        ``tx_raw`` (and optionally ``customers_raw``, ``interactions_raw``) already on
        the session: e.g. a Delta or catalog table, ``spark.table("sales.orders")
        .createOrReplaceTempView("tx_raw")``, with the contract's column names.
    session : a Spark session (default: the active one, e.g. a Databricks notebook's,
        else a new one on ``master`` with ``conf``: :func:`analysis.engine.spark_session`).
    """
    engine = SparkEngine(session or spark_session(master, conf))
    if source is not None:      # (the views of an earlier source go)
        for view in _RAW.values():
            engine.drop(view)
    for view, table in ({} if source is None else _raw_tables(source)).items():
        if isinstance(table, Path):
            engine.read_parquet(view, table)
        elif isinstance(table, pd.DataFrame):
            engine.register(view, table)
        else:                     # a Spark DataFrame (data.load_dataset_on_spark's)
            table.createOrReplaceTempView(view)
    engine.view("lines", _lines_sql(engine))
    return engine


def connect_run(processed_dir: str | Path, config) -> Connection:
    """The views of a run's cleaned tables (``processed_dir``) on the engine the config
    names (``analysis.engine``): :func:`connect`, with the config's DuckDB memory limit,
    or :func:`connect_spark`, with its ``spark:`` section. Every stage opens its run
    store this way, so a whole run's set-based work follows the config."""
    if config.analysis.engine == "spark":
        return connect_spark(processed_dir, master=config.spark.master,
                             conf=config.spark.conf)
    return connect(processed_dir, memory_limit=config.analysis.duckdb_memory_limit)


def _raw_tables(source: str | Path | Mapping[str, pd.DataFrame]
                ) -> dict[str, Path | pd.DataFrame]:
    """The input views a source gives (``tx_raw``, ``customers_raw``,
    ``interactions_raw``): its frames, or its Parquet files (or folders of part files)
    in a folder of cleaned tables (a run's ``clean/`` folder when given the run's)."""
    if isinstance(source, Mapping):      # (a table the features do not use is left out)
        return {_RAW[name]: frame for name, frame in source.items()
                if frame is not None and name in _RAW}
    folder = Path(source)
    if (folder / "clean" / "transactions.parquet").exists():
        folder = folder / "clean"
    return {view: folder / f"{name}.parquet" for name, view in _RAW.items()
            if (folder / f"{name}.parquet").exists()}


def _lines_sql(engine: DuckDBEngine | SparkEngine) -> str:
    """The query of the ``lines`` view over ``tx_raw``: the contract's columns, with the
    defaults of the optional ones, and an order key."""
    if not engine.has("tx_raw"):
        raise ValueError("no transactions table to build features from")
    columns = set(engine.columns("tx_raw"))
    order_key = ("order_id" if "order_id" in columns
                 else "customer_id || '|' || CAST(CAST(order_date AS DATE) AS VARCHAR)")
    return _LINES.format(
        order_key=order_key,
        status="status" if "status" in columns else "'completed'",
        category="category" if "category" in columns else "'unknown'",
        channel="channel" if "channel" in columns else "'unknown'",
        margin="margin" if "margin" in columns else "CAST(NULL AS DOUBLE)",
    )


def build_features(con: Connection, *, cutoff: dt.date,
                   horizon_days: int | None = None, labels: bool = True,
                   exclude_attributes: tuple[str, ...] = (),
                   sample_share: float | None = None) -> pd.DataFrame:
    """Features of every customer with a purchase before ``cutoff`` (and labels).

    Parameters
    ----------
    con : a connection from :func:`connect`.
    cutoff : history is every record dated strictly before this day.
    horizon_days : when given, add ``season_index`` (revenue in the same calendar window
        a year before, over that year's average per window of this length; history only)
        and, unless ``labels=False``, the labels for ``[cutoff, cutoff + horizon_days)``.
    exclude_attributes : customer attributes never to return (protected, PII).
    sample_share : keep only about this share of the customers, chosen by a hash of the
        id salted with the cutoff (deterministic; a different draw per cutoff), before
        any work is done: training snapshots of large bases cost a fraction of the time
        and memory.

    Returns
    -------
    DataFrame
        One row per customer, sorted by ``customer_id``: the core columns (see the module
        docstring), ``n_orders``, monetary mean/max per order, margin, gap statistics,
        ``recency_vs_gap`` (recency over the customer's own median gap), per window of
        30/90/180/365 days ``orders_Nd``, ``spend_Nd`` and ``trend_Nd`` (spend in the window
        against the window before, in [-1, 1]), ``cancel_rate``, ``return_rate``,
        ``n_categories``, ``top_category``, ``n_channels``, ``top_channel``,
        ``top_channel_share``, ``cutoff_month`` (calendar month of the cutoff, so that
        models can learn seasonality across snapshots), interaction features when there is an interactions table,
        ``days_since_signup`` and descriptive attributes when there is a customers table;
        with a horizon, ``churned``, ``future_spend``, ``future_margin``,
        ``future_orders``, ``declined``, and ``spend_last_horizon`` (net spend in the
        ``horizon_days`` before the cutoff: history, for the "last period repeats"
        baseline).
    """
    cutoff = _as_date(cutoff)
    frames = snapshots_by_cutoff(con, cutoffs=[cutoff], horizon_days=horizon_days,
                                 labels=labels, exclude_attributes=exclude_attributes,
                                 sample_share=sample_share)
    return frames[cutoff]


def write_features(con: Connection, out: str | Path, *, cutoff: dt.date,
                   horizon_days: int | None = None, labels: bool = True,
                   exclude_attributes: tuple[str, ...] = ()) -> int:
    """The table of :func:`build_features` (same arguments) written as Parquet to
    ``out``; returns its number of customers.

    On Spark the executors build and write it, and the driver never holds it: one file
    ``out`` on a local master; on a cluster a folder ``out`` of part files, the rows in
    id order across them (``out`` then a path the cluster writes: HDFS, S3, DBFS...).
    The columns are typed as :func:`build_features` types them.
    """
    eng = as_engine(con)
    cutoff = _as_date(cutoff)
    if not isinstance(eng, SparkEngine):
        frame = build_features(eng, cutoff=cutoff, horizon_days=horizon_days, labels=labels,
                               exclude_attributes=exclude_attributes)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out, index=False)
        return len(frame)
    written = 0
    with contextlib.closing(_feature_passes(
            eng, cutoffs=[cutoff], horizon_days=horizon_days, labels=labels,
            exclude_attributes=exclude_attributes, sample_share=None,
            customers=None)) as passes:
        for joined, drop in passes:      # (Spark takes every customer in one pass)
            written += eng.write_parquet(_spark_tidy(eng.sql(joined), drop), out,
                                         order_by="customer_id")
    return written


@contextlib.contextmanager
def features_on_spark(con: Connection, *, cutoff: dt.date,
                      horizon_days: int | None = None, labels: bool = True,
                      exclude_attributes: tuple[str, ...] = ()) -> Iterator[Any]:
    """The table of :func:`build_features` (same arguments) as a Spark DataFrame, kept
    on the executors (:meth:`analysis.engine.SparkEngine.materialise`) while the block
    runs (its working tables already gone), and freed after it, typed as
    :func:`build_features` types it; its rows in no order. The driver never holds it:
    e.g. the profile step segments it where it lies (:mod:`analysis.segments`)."""
    eng = as_engine(con)
    if not isinstance(eng, SparkEngine):
        raise TypeError("features_on_spark needs a Spark engine (analysis.engine: spark)")
    table = None
    try:
        with contextlib.closing(_feature_passes(
                eng, cutoffs=[_as_date(cutoff)], horizon_days=horizon_days, labels=labels,
                exclude_attributes=exclude_attributes, sample_share=None,
                customers=None)) as passes:
            for joined, drop in passes:  # (Spark takes every customer in one pass)
                table = eng.materialise(_spark_tidy(eng.sql(joined), drop))
        yield table
    finally:
        eng.release(table)


def build_snapshots(con: Connection, *, cutoffs: list[dt.date],
                    horizon_days: int, exclude_attributes: tuple[str, ...] = (),
                    sample_share: float | Mapping[dt.date, float | None] | None = None
                    ) -> pd.DataFrame:
    """Features and labels at several cutoffs, stacked (rolling origin), built in one
    pass over the order log (:func:`snapshots_by_cutoff`); with ``sample_share``, about
    that share of the customers at each cutoff (or at the cutoffs a mapping names).

    Returns
    -------
    DataFrame
        The columns of :func:`build_features` with labels, plus ``cutoff``.
    """
    frames = snapshots_by_cutoff(con, cutoffs=cutoffs, horizon_days=horizon_days,
                                 exclude_attributes=exclude_attributes,
                                 sample_share=sample_share)
    return pd.concat([f.assign(cutoff=pd.Timestamp(c)) for c, f in frames.items()],
                     ignore_index=True)


def snapshots_by_cutoff(con: Connection, *, cutoffs: list[dt.date],
                        horizon_days: int | None = None, labels: bool = True,
                        exclude_attributes: tuple[str, ...] = (),
                        sample_share: float | Mapping[dt.date, float | None] | None = None,
                        customers: Mapping[dt.date, Iterable] | None = None
                        ) -> dict[dt.date, pd.DataFrame]:
    """The features of :func:`build_features` at every cutoff, from one pass over the
    order log.

    The lines are read once, into orders (``ORDERS``) and purchase spend per category
    between cutoffs (``CATEGORY_SPEND``); each concern is then computed for every cutoff
    from those compact tables, never from the lines again. The result is the same
    as one :func:`build_features` per cutoff. A log of more than :data:`LINES_PER_PASS`
    lines is taken in ranges of customer ids, one after the other, so that the order
    tables of one range at a time are in memory (a log sorted by customer, as exports
    often are, is then still read about once; an unsorted one once per range).

    Parameters
    ----------
    cutoffs : the cutoffs (in any order; a cutoff given twice is built once).
    horizon_days, labels, exclude_attributes : as in :func:`build_features`.
    sample_share : one share for every cutoff, or a share per cutoff (a cutoff it does
        not name, or names with None, keeps every customer).
    customers : the only customers to build at a cutoff, per cutoff (ids; a cutoff it
        does not name keeps every customer, or its sample): e.g. a campaign's contacts
        and controls at its date. The lines of no other customer are read when it names
        every cutoff. A cutoff cannot be both sampled and named.

    Returns
    -------
    dict of DataFrame
        Cutoff → the frame :func:`build_features` returns at it, in cutoff order.
    """
    eng = as_engine(con)
    cutoffs = sorted({_as_date(c) for c in cutoffs})
    pieces: dict[dt.date, list[pd.DataFrame]] = {c: [] for c in cutoffs}
    with contextlib.closing(_feature_passes(
            eng, cutoffs=cutoffs, horizon_days=horizon_days, labels=labels,
            exclude_attributes=exclude_attributes, sample_share=sample_share,
            customers=customers)) as passes:
        for joined, drop in passes:
            frame = _tidy(eng.frame(joined).drop(columns=drop, errors="ignore"))
            days = frame.pop("cutoff").to_numpy()
            bounds = np.searchsorted(days, np.array(cutoffs, dtype="datetime64[D]").astype(
                days.dtype), side="left").tolist() + [len(frame)]
            for k, c in enumerate(cutoffs):    # rows in cutoff order, then customer id
                pieces[c].append(frame if len(cutoffs) == 1
                                 else frame.iloc[bounds[k]:bounds[k + 1]])
            del frame
    out = {}
    for c in cutoffs:       # ranges come in id order; one cutoff's pieces joined at a time
        # (an empty piece, typed by DuckDB without rows to go by, is left out)
        found = pieces.pop(c)
        found = [f for f in found if len(f)] or found[:1]
        out[c] = (found[0] if len(found) == 1 else pd.concat(found)).reset_index(drop=True)
        del found
    return out


def _feature_passes(eng: DuckDBEngine | SparkEngine, *, cutoffs: list[dt.date],
                    horizon_days: int | None, labels: bool,
                    exclude_attributes: tuple[str, ...],
                    sample_share: float | Mapping[dt.date, float | None] | None,
                    customers: Mapping[dt.date, Iterable] | None
                    ) -> Iterator[tuple[str, list[str]]]:
    """The passes of :func:`snapshots_by_cutoff` (its arguments; ``cutoffs`` sorted):
    for each range of customers, the query of their features at every cutoff (rows in
    cutoff, then id order, with a ``cutoff`` column), to be read while the pass's tables
    exist, and the columns to drop from it (derived from a column the log lacks)."""
    if not cutoffs:
        raise ValueError("snapshots need at least one cutoff")
    if not isinstance(sample_share, Mapping):
        sample_share = dict.fromkeys(cutoffs, sample_share)
    shares = {_as_date(c): s for c, s in sample_share.items()}
    keep_below = [None if shares.get(c) is None or shares[c] >= 1
                  else int(max(shares[c], 0.0) * 1_000_000) for c in cutoffs]
    chosen = {_as_date(c): pd.unique(pd.Series(list(ids), dtype=object).dropna().astype(str))
              for c, ids in (customers or {}).items()}
    if unknown := set(chosen) - set(cutoffs):
        raise ValueError(f"customers named for dates that are not cutoffs: {sorted(unknown)}")
    if both := [c for c, k in zip(cutoffs, keep_below, strict=True)
                if k is not None and c in chosen]:
        raise ValueError(f"cutoffs both sampled and given their customers: {both}")
    named = pd.DataFrame({
        "customer_id": np.concatenate([chosen[c] for c in cutoffs if c in chosen] or [[]]),
        "k": np.repeat([k for k, c in enumerate(cutoffs) if c in chosen],
                       [len(chosen[c]) for c in cutoffs if c in chosen]).astype(int)})
    views = {v for v in ("customers_raw", "interactions_raw") if eng.has(v)}
    tx_cols = set(eng.columns("tx_raw"))
    absent = {"margin": ["margin_total", "margin_rate", "future_margin"],
              "category": ["n_categories", "top_category"],
              "channel": ["n_channels", "top_channel", "top_channel_share"]}
    drop = [c for col, derived in absent.items() if col not in tx_cols for c in derived]
    # the work grows with the lines and with the customers each snapshot keeps
    n_lines, n_customers = eng.rows(
        "SELECT COUNT(*), " + ("approx_count_distinct(customer_id)" if chosen else "1")
        + " FROM lines")[0]
    weight = sum((len(chosen[c]) / max(n_customers, 1) if c in chosen
                  else 1.0 if k is None else k / 1_000_000)
                 for c, k in zip(cutoffs, keep_below, strict=True))
    only = ""
    if chosen and len(chosen) == len(cutoffs):
        # no snapshot keeps anyone else: the other customers' lines are never read
        only = " AND customer_id IN (SELECT customer_id FROM chosen_customers)"
        n_lines = n_lines * min(1.0, named["customer_id"].nunique() / max(n_customers, 1))
    ranges = [r + only for r in _customer_ranges(eng, max(1.0, weight) * n_lines)]
    eng.register("_cutoffs_df", pd.DataFrame({
        "cutoff": pd.to_datetime(cutoffs), "k": range(len(cutoffs)),
        "keep_below": pd.array(keep_below, dtype="Int64")}))
    eng.register("_chosen_df", named)
    end = (cutoffs[-1] + dt.timedelta(days=horizon_days or 0)).isoformat()
    # the working tables' row order is never read (the frame is read in cutoff and id
    # order): DuckDB need not keep it, which makes the build faster (17M lines: 16.4 s ->
    # 14.4 s, the same frame), within the block only
    with eng.unordered():
        try:
            eng.view("cutoffs", "SELECT CAST(cutoff AS DATE) AS cutoff, k, keep_below "
                     "FROM _cutoffs_df")
            eng.view("chosen_customers", "SELECT CAST(customer_id AS VARCHAR) AS customer_id, "
                     "CAST(k AS BIGINT) AS k FROM _chosen_df")
            eng.table("daily", DAILY.format(end=end))
            for customers in ranges:
                tables = _OrderTables(eng, cutoffs, end=end, customers=customers)
                concerns, joined = _snapshot_sql(
                    eng, views=views, cutoffs=cutoffs,
                    sampled=[k is not None or c in chosen
                             for c, k in zip(cutoffs, keep_below, strict=True)],
                    horizon_days=horizon_days, labels=labels,
                    exclude_attributes=exclude_attributes, late=tables.multi_day)
                try:
                    # one concern at a time (in one statement DuckDB holds all their working
                    # tables at once), then the order tables go before the concerns are
                    # joined and read, so that the frame never shares memory with them
                    for name, query in concerns:
                        eng.table(name, query)
                    tables.drop()
                    yield joined, drop
                finally:
                    tables.drop()
                    eng.drop(*(name for name, _ in concerns))
        finally:
            eng.drop("daily", "cutoffs", "chosen_customers")
            eng.unregister("_cutoffs_df")
            eng.unregister("_chosen_df")


#: Work per pass of :func:`snapshots_by_cutoff`, in lines times snapshots (a sampled
#: snapshot counts as its share): a larger call is split into ranges of customer ids,
#: built one after the other, so that the order tables and the features of one range at
#: a time are in DuckDB's memory (about 0.25 GB per million lines of a one-cutoff build).
LINES_PER_PASS = 4_000_000


def _customer_ranges(con: Connection, work: float) -> list[str]:
    """SQL conditions on ``customer_id`` splitting the log into ranges of about
    :data:`LINES_PER_PASS` of ``work`` each (bounds from a fixed sample of the lines);
    one empty condition for a call that fits one pass, or for an engine that partitions
    the work itself."""
    eng = as_engine(con)
    n_parts = math.ceil(work / LINES_PER_PASS)
    if n_parts <= 1 or not eng.splits_work:
        return [""]
    sample = sorted(r[0] for r in eng.rows(
        "SELECT customer_id FROM lines WHERE customer_id IS NOT NULL "
        "USING SAMPLE reservoir(20000 ROWS) REPEATABLE (42)"))
    bounds = sorted({sample[len(sample) * i // n_parts] for i in range(1, n_parts)})
    if not bounds:
        return [""]
    first, *middle, last = [None, *bounds, None]
    edges = list(zip([first, *middle], [*middle, last], strict=True))
    return ([f" AND customer_id < '{_sql_text(edges[0][1])}'"]
            + [f" AND customer_id >= '{_sql_text(lo)}' AND customer_id < '{_sql_text(hi)}'"
               for lo, hi in edges[1:-1]]
            + [f" AND (customer_id >= '{_sql_text(edges[-1][0])}' OR customer_id IS NULL)"])


class _OrderTables:
    """The one pass over the lines of the customers ``customers`` selects (an SQL
    condition, see :func:`_customer_ranges`), as temporary tables and views of the
    connection: ``orders_all``, ``order_days`` (only the orders spanning several days),
    the order units, purchase days, channel changes and category spend; :meth:`drop`
    removes them."""

    TABLES = ("orders_all", "order_days", "purchase_days", "category_spend")
    VIEWS = ("order_units", "channel_changes")

    def __init__(self, eng: DuckDBEngine | SparkEngine, cutoffs: list[dt.date], *,
                 end: str, customers: str) -> None:
        self.eng = eng
        eng.table("orders_all", ORDERS.format(end=end, customers=customers))
        self.multi_day = bool(eng.rows(
            "SELECT COUNT(*) FROM orders_all WHERE NOT one_day")[0][0])
        units, changes = ORDER_UNITS, CHANNEL_CHANGES
        if self.multi_day:
            eng.table("order_days", ORDER_DAYS.format(end=end, customers=customers))
            units += f"UNION ALL SELECT * FROM ({ORDER_DAY_UNITS})"
            changes += f"UNION ALL SELECT * FROM ({CHANNEL_DAY_CHANGES})"
        eng.view("order_units", units)
        eng.view("channel_changes", changes)
        late = ("bool_or(counts_from > day) OVER (PARTITION BY customer_id)"
                if self.multi_day else "FALSE")
        eng.table("purchase_days", PURCHASE_DAYS.format(late=late))
        bucket = ("CASE " + " ".join(f"WHEN order_date < DATE '{c.isoformat()}' THEN {k}"
                                     for k, c in enumerate(cutoffs)) + " END"
                  if len(cutoffs) > 1 else "0")
        eng.table("category_spend", CATEGORY_SPEND.format(
            bucket=bucket, last_cutoff=cutoffs[-1].isoformat(), customers=customers))

    def drop(self) -> None:
        self.eng.drop(*self.VIEWS, *self.TABLES)


def _at_cutoffs(table: str, cutoffs: list[dt.date], sampled: list[bool]) -> str:
    """``table``'s rows paired with every cutoff whose snapshot holds their customer, as
    columns ``cutoff`` and ``k`` (its index) beside the table's: a cutoff that keeps every
    customer pairs with every row (the query's condition on dates does the rest); the
    sampled cutoffs pair with their customers' rows (``sampled_customers``)."""
    parts = [f"SELECT DATE '{c.isoformat()}' AS cutoff, {k} AS k, t.* FROM {table} t"
             for k, (c, s) in enumerate(zip(cutoffs, sampled, strict=True)) if not s]
    if any(sampled):
        parts.append(f"SELECT s.cutoff, s.k, t.* FROM {table} t "
                     f"JOIN sampled_customers s USING (customer_id)")
    return "(" + "\n UNION ALL ".join(parts) + ")"


def _snapshot_sql(eng: DuckDBEngine | SparkEngine, *, views: set[str],
                  cutoffs: list[dt.date], sampled: list[bool], horizon_days: int | None,
                  labels: bool, exclude_attributes: tuple[str, ...], late: bool
                  ) -> tuple[list[tuple[str, str]], str]:
    """Every cutoff's features from the order tables: the concerns, (table name, query)
    in the order they are built, and the statement that joins them."""
    windows = "".join(WINDOW.format(w=w, w2=2 * w) for w in WINDOWS_DAYS)
    units, days = (_at_cutoffs(t, cutoffs, sampled) for t in ("order_units", "purchase_days"))
    bucket = eng.hash_bucket("c.customer_id || CAST(cut.cutoff AS VARCHAR)")
    ctes = ([("sampled_customers", SAMPLED_CUSTOMERS.format(bucket=bucket))]
            if any(sampled) else [])
    ctes += [("activity", ACTIVITY.format(windows=windows, units=units)),
             ("gaps", GAPS.format(days=days) + (
                 f"UNION ALL SELECT * FROM ({LATE_GAPS.format(days=days)})" if late else "")),
             ("categories", CATEGORIES.format(
                 spend=_at_cutoffs("category_spend", cutoffs, sampled))),
             ("channels", CHANNELS.format(
                 changes=_at_cutoffs("channel_changes", cutoffs, sampled)))]
    key = "USING (cutoff, customer_id)"
    select = ["a.cutoff", "a.customer_id", "a.recency_days", "gaps.frequency", "a.n_orders",
              "a.monetary_total", "a.tenure_days", "a.monetary_mean_order",
              "a.monetary_max_order", "a.margin_total", "a.margin_rate",
              "gaps.gap_mean_days", "gaps.gap_median_days", "gaps.gap_std_days",
              "a.recency_days / NULLIF(gaps.gap_median_days, 0) AS recency_vs_gap"]
    joins = [f"LEFT JOIN gaps {key}"]
    for w in WINDOWS_DAYS:
        now, prev = f"GREATEST(a.spend_{w}d, 0)", f"GREATEST(a.spend_prev_{w}d, 0)"
        select += [f"a.orders_{w}d", f"a.spend_{w}d",
                   f"COALESCE(({now} - {prev}) / NULLIF({now} + {prev}, 0), 0) AS trend_{w}d"]
    select += ["a.cancel_rate", "a.return_rate", "month(a.cutoff) AS cutoff_month",
               "categories.n_categories",
               "categories.top_category", "channels.n_channels", "channels.top_channel",
               "channels.top_channel_share"]
    joins += [f"LEFT JOIN categories {key}", f"LEFT JOIN channels {key}"]
    if "interactions_raw" in views:
        cols = set(eng.columns("interactions_raw"))
        unresolved = "resolved = FALSE" if "resolved" in cols else "FALSE"
        if "score" not in cols:
            raise ValueError("interactions need a 'score' column (may be empty)")
        ctes.append(("inter", INTERACTIONS.format(
            unresolved=unresolved,
            interactions=_at_cutoffs("interactions_raw", cutoffs, sampled))))
        select += ["COALESCE(inter.n_complaints, 0) AS n_complaints",
                   "COALESCE(inter.complaints_90d, 0) AS complaints_90d",
                   "inter.days_since_complaint",
                   "COALESCE(inter.n_unresolved_complaints, 0) AS n_unresolved_complaints",
                   "COALESCE(inter.n_tickets, 0) AS n_tickets",
                   "inter.satisfaction_last", "inter.satisfaction_mean"]
        joins.append(f"LEFT JOIN inter {key}")
    if "customers_raw" in views:
        cols = eng.columns("customers_raw")
        excluded = {c.casefold() for c in exclude_attributes}
        attrs = [c for c in cols if c not in {"customer_id", "signup_date"}
                 and c.casefold() not in excluded]
        signup = "signup_date" in cols
        ctes.append(("attrs", ATTRIBUTES.format(
            signup="CAST(signup_date AS DATE)" if signup else "CAST(NULL AS DATE)",
            attribute_columns="".join(f", {_ident(c)}" for c in attrs))))
        select.append("DATE_DIFF('day', attrs.signup_day, a.cutoff)"
                      + ("" if signup else "::DOUBLE") + " AS days_since_signup")
        select += [f"attrs.{_ident(c)}" for c in attrs]
        joins.append("LEFT JOIN attrs USING (customer_id)")
    if horizon_days is not None:
        ctes.append(("season", SEASON.format(horizon=int(horizon_days))))
        select.append("season.season_index")
        joins.append("LEFT JOIN season USING (cutoff)")
        ctes.append(("labels", LABELS.format(horizon=int(horizon_days), units=units)))
        select.append("COALESCE(labels.spend_before, 0) AS spend_last_horizon")
        if labels:
            select += [
                "CASE WHEN COALESCE(labels.bought, FALSE) THEN 0 ELSE 1 END AS churned",
                "COALESCE(labels.future_spend, 0) AS future_spend",
                "COALESCE(labels.future_margin, 0) AS future_margin",
                "COALESCE(labels.future_orders, 0) AS future_orders",
                "CASE WHEN COALESCE(labels.spend_before, 0) > 0 AND "
                "COALESCE(labels.future_spend, 0) < 0.5 * labels.spend_before "
                "THEN 1 ELSE 0 END AS declined"]
        joins.append(f"LEFT JOIN labels {key}")
    return ctes, ("SELECT " + ",\n       ".join(select) + "\nFROM activity a\n"
                  + "\n".join(joins) + "\nORDER BY a.cutoff, a.customer_id")


def data_start(con: Connection) -> dt.date:
    """The day of the first transaction."""
    return as_engine(con).rows("SELECT MIN(order_date) FROM lines")[0][0]


def data_end(con: Connection) -> dt.date:
    """The day after the last transaction: the natural scoring date."""
    last = as_engine(con).rows("SELECT MAX(order_date) FROM lines")[0][0]
    return last + dt.timedelta(days=1)


def resolve_as_of(con: Connection, *, as_of: dt.date | str | None = None
                  ) -> dt.date:
    """The scoring date: ``as_of`` when given, else the day after the last transaction."""
    return data_end(con) if as_of in (None, "") else _as_date(as_of)


def resolve_horizon_days(con: Connection, *, horizon_days: int | str,
                         cutoff: dt.date | None = None, step_days: int = 30,
                         min_train_cutoffs: int = 3) -> int:
    """The configured horizon, or, when the config says ``auto``, the longest one that
    both suits the data's rhythm and fits its history.

    ``auto`` starts from :func:`suggest_horizon_days` and shortens it, 30 days at a time
    (down to 30), until :func:`honest_cutoffs` over the history before ``cutoff`` leaves
    an evaluation cutoff, a validation cutoff and at least ``min_train_cutoffs``
    training cutoffs ``step_days`` apart. A year of history thus gets a 60-day horizon
    and 180 days a 30-day one; a history too short even for 30 days keeps 30 (the
    models then fall back to BG/NBD + Gamma-Gamma, which need no labels).
    """
    if horizon_days != "auto":
        return int(horizon_days)
    suggested = suggest_horizon_days(con, cutoff=cutoff)
    as_of = data_end(con) if cutoff is None else _as_date(cutoff)
    return fit_horizon_to_history(suggested, first_date=data_start(con), as_of=as_of,
                                  step_days=step_days, min_train_cutoffs=min_train_cutoffs)


def fit_horizon_to_history(suggested: int, *, first_date: dt.date, as_of: dt.date,
                           step_days: int = 30, min_train_cutoffs: int = 3) -> int:
    """The longest horizon, ``suggested`` or shorter by multiples of 30 days (at least
    30), whose :func:`honest_cutoffs` leave ``min_train_cutoffs`` training cutoffs."""
    for horizon in range(int(suggested), 29, -30):
        _, _, train = honest_cutoffs(as_of=as_of, horizon_days=horizon,
                                     n_train=min_train_cutoffs, step_days=step_days,
                                     first_date=first_date)
        if len(train) >= min_train_cutoffs:
            return horizon
    return 30


def honest_cutoffs(*, as_of: dt.date, horizon_days: int, n_train: int, step_days: int,
                   first_date: dt.date) -> tuple[dt.date, dt.date, list[dt.date]]:
    """Evaluation, validation and training cutoffs whose labels never overlap.

    - evaluation: ``as_of - H`` (the latest cutoff whose horizon is fully observed);
    - validation: ``evaluation - H`` (its labels end where the evaluation starts);
    - training: ``validation - H - k * step_days`` for k = 0 .. n_train - 1 (labels end
      by the validation cutoff), keeping those with at least H days of history.
    """
    h = dt.timedelta(days=horizon_days)
    eval_cut = as_of - h
    valid_cut = eval_cut - h
    train = [valid_cut - h - dt.timedelta(days=k * step_days) for k in range(n_train)]
    train = [c for c in train if (c - first_date).days >= horizon_days]
    return eval_cut, valid_cut, train


def suggest_horizon_days(con: Connection, *, quantile: float = 0.8,
                         cutoff: dt.date | None = None) -> int:
    """A churn horizon from the data's rhythm: the ``quantile`` of inter-purchase gaps.

    Gaps between distinct purchase days of repeat customers (before ``cutoff`` if
    given), rounded up to a multiple of 30 days and clipped to [30, 365].
    """
    where = "" if cutoff is None else f"AND order_date < DATE '{_as_date(cutoff).isoformat()}'"
    sql = f"""
    WITH days AS (SELECT DISTINCT customer_id, order_date FROM lines
                  WHERE status = 'completed' AND amount >= 0 {where}),
         gaps AS (SELECT DATE_DIFF('day', LAG(order_date) OVER (PARTITION BY customer_id
                  ORDER BY order_date), order_date) AS g FROM days)
    SELECT QUANTILE_CONT(g, {float(quantile)}) FROM gaps WHERE g IS NOT NULL
    """
    q = as_engine(con).rows(sql)[0][0]
    if q is None or not np.isfinite(q):
        return 90
    return int(min(max(30 * math.ceil(q / 30), 30), 365))


# --------------------------------------------------------------------------- helpers

_RAW = {"transactions": "tx_raw", "customers": "customers_raw",
        "interactions": "interactions_raw"}


#: The features that are whole numbers (int64); every other number is a float64.
_INT_FEATURES = ("recency_days", "frequency", "n_orders", "cutoff_month", "tenure_days",
                 "churned", "declined", "future_orders", "n_categories", "n_channels",
                 "n_complaints", "complaints_90d", "n_unresolved_complaints", "n_tickets",
                 *(f"orders_{w}d" for w in WINDOWS_DAYS))


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame of a pass, typed: :data:`_INT_FEATURES` as int64, other numbers (and
    flags) as float64."""
    # (only the columns whose type changes are converted: a copy of every column of a
    # million customers' features took 2 s)
    casts = {}
    for col in frame.columns:
        target = ("int64" if col in _INT_FEATURES else "float64"
                  if pd.api.types.is_numeric_dtype(frame[col]) else None)
        if target is not None and frame[col].dtype != target:
            casts[col] = target
    return frame.astype(casts) if casts else frame


def _spark_tidy(df: Any, drop: list[str]) -> Any:
    """:func:`_tidy` of a pass's Spark DataFrame, without its ``cutoff`` and ``drop``
    columns."""
    from pyspark.sql import functions as fn
    from pyspark.sql import types as T

    df = df.drop("cutoff", *(c for c in drop if c in df.columns))
    columns = []
    for field in df.schema.fields:
        column = fn.col(f"`{field.name}`")
        if field.name in _INT_FEATURES:
            column = column.cast("bigint")
        elif isinstance(field.dataType, T.NumericType | T.BooleanType):
            column = column.cast("double")
        columns.append(column.alias(field.name))
    return df.select(*columns)


def _as_date(value: dt.date | str | pd.Timestamp) -> dt.date:
    if isinstance(value, pd.Timestamp):
        return value.date()
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


def _sql_text(value: str) -> str:
    return value.replace("'", "''")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
