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
  (the literature's "same-day purchases merged into one transaction").

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

Each query below is one concern, named after what it computes; :func:`build_features`
joins them in one DuckDB statement. Lines are rolled up to orders once (``ORDERS``) and
most per-customer measures come from one pass over the orders (``ACTIVITY``).
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

__all__ = [
    "CORE_COLUMNS",
    "LABEL_COLUMNS",
    "build_features",
    "build_snapshots",
    "connect",
    "data_end",
    "data_start",
    "fit_horizon_to_history",
    "honest_cutoffs",
    "resolve_as_of",
    "resolve_horizon_days",
    "suggest_horizon_days",
]

CORE_COLUMNS = ("customer_id", "recency_days", "frequency", "monetary_total", "tenure_days",
                "churned", "future_spend")
LABEL_COLUMNS = ("churned", "future_spend", "future_margin", "future_orders", "declined")
WINDOWS_DAYS = (30, 90, 180, 365)

# --------------------------------------------------------------------------- the queries

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

HISTORY = "SELECT * FROM lines WHERE order_date < DATE '{cutoff}'"

# One row per order (customer, order key) before the cutoff: the roll-up every other
# concern starts from, so that the lines are grouped once.
ORDERS = """
SELECT customer_id, order_key,
       MIN(order_date)                                                     AS order_date,
       COUNT(*) FILTER (WHERE status = 'completed' AND amount >= 0) > 0    AS is_purchase,
       SUM(amount) FILTER (WHERE status = 'completed' AND amount >= 0)     AS purchase_value,
       COALESCE(SUM(amount) FILTER (WHERE status = 'completed'), 0)        AS net_amount,
       SUM(margin) FILTER (WHERE status = 'completed')                     AS net_margin,
       MIN(channel) FILTER (WHERE status = 'completed' AND amount >= 0)    AS channel,
       COUNT(*)                                                            AS n_lines,
       COUNT(*) FILTER (WHERE status = 'cancelled')                        AS n_cancelled,
       COUNT(*) FILTER (WHERE status = 'returned' OR amount < 0)           AS n_returned
FROM history
GROUP BY customer_id, order_key
"""

# Recency, frequency, monetary, tenure, activity windows and rates, in one pass.
ACTIVITY = """
SELECT customer_id,
       DATE_DIFF('day', MAX(order_date) FILTER (WHERE is_purchase), DATE '{cutoff}')
                                                                  AS recency_days,
       COUNT(DISTINCT order_date) FILTER (WHERE is_purchase)     AS frequency,
       COUNT(*) FILTER (WHERE is_purchase)                       AS n_orders,
       SUM(net_amount)                                           AS monetary_total,
       DATE_DIFF('day', MIN(order_date) FILTER (WHERE is_purchase), DATE '{cutoff}')
                                                                  AS tenure_days,
       AVG(purchase_value) FILTER (WHERE is_purchase)            AS monetary_mean_order,
       MAX(purchase_value) FILTER (WHERE is_purchase)            AS monetary_max_order,
       SUM(net_margin)                                           AS margin_total,
       SUM(net_margin) / NULLIF(SUM(net_amount), 0)              AS margin_rate,
       {windows}
       SUM(n_cancelled) / SUM(n_lines)                           AS cancel_rate,
       SUM(n_returned) / SUM(n_lines)                            AS return_rate
FROM orders
GROUP BY customer_id
HAVING COUNT(*) FILTER (WHERE is_purchase) > 0
"""

# Activity in the last w days and in the w days before them (rendered per window).
WINDOW = """COUNT(*) FILTER (WHERE is_purchase AND order_date >= DATE '{cutoff}' - {w})
                                                                  AS orders_{w}d,
       COALESCE(SUM(net_amount) FILTER (WHERE order_date >= DATE '{cutoff}' - {w}), 0)
                                                                  AS spend_{w}d,
       COALESCE(SUM(net_amount) FILTER (WHERE order_date <  DATE '{cutoff}' - {w}
                                          AND order_date >= DATE '{cutoff}' - {w2}), 0)
                                                                  AS spend_prev_{w}d,
       """

GAPS = """
WITH days AS (
    SELECT DISTINCT customer_id, order_date FROM orders WHERE is_purchase
), gaps AS (
    SELECT customer_id,
           DATE_DIFF('day', LAG(order_date) OVER (PARTITION BY customer_id ORDER BY order_date),
                     order_date) AS gap_days
    FROM days
)
SELECT customer_id,
       AVG(gap_days)          AS gap_mean_days,
       MEDIAN(gap_days)       AS gap_median_days,
       STDDEV_SAMP(gap_days)  AS gap_std_days
FROM gaps
GROUP BY customer_id
"""

CATEGORIES = """
WITH by_cat AS (
    SELECT customer_id, category, SUM(amount) AS spend
    FROM history WHERE status = 'completed' AND amount >= 0
    GROUP BY customer_id, category
), ranked AS (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY ROUND(spend, 6) DESC, category) AS rk,
           COUNT(*) OVER (PARTITION BY customer_id) AS n_categories
    FROM by_cat
)
SELECT customer_id, n_categories, category AS top_category
FROM ranked WHERE rk = 1
"""

CHANNELS = """
WITH by_channel AS (
    SELECT customer_id, channel, COUNT(*) AS n
    FROM orders WHERE is_purchase
    GROUP BY customer_id, channel
), ranked AS (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY n DESC, channel) AS rk,
           COUNT(*) OVER (PARTITION BY customer_id) AS n_channels,
           SUM(n) OVER (PARTITION BY customer_id) AS total
    FROM by_channel
)
SELECT customer_id, n_channels, channel AS top_channel, n / total AS top_channel_share
FROM ranked WHERE rk = 1
"""

INTERACTIONS = """
SELECT customer_id,
       COUNT(*) FILTER (WHERE type = 'complaint')                        AS n_complaints,
       COUNT(*) FILTER (WHERE type = 'complaint'
                        AND date >= DATE '{cutoff}' - 90)               AS complaints_90d,
       DATE_DIFF('day', MAX(date) FILTER (WHERE type = 'complaint'), DATE '{cutoff}')
                                                                         AS days_since_complaint,
       COUNT(*) FILTER (WHERE type = 'complaint' AND {unresolved})      AS n_unresolved_complaints,
       COUNT(*) FILTER (WHERE type = 'ticket')                           AS n_tickets,
       ARG_MAX(score, date) FILTER (WHERE type = 'survey' AND score IS NOT NULL)
                                                                         AS satisfaction_last,
       AVG(score) FILTER (WHERE type = 'survey')                         AS satisfaction_mean
FROM interactions_raw
WHERE CAST(date AS DATE) < DATE '{cutoff}'
GROUP BY customer_id
"""

ATTRIBUTES = """
SELECT customer_id,
       DATE_DIFF('day', CAST(signup_date AS DATE), DATE '{cutoff}') AS days_since_signup
       {attribute_columns}
FROM customers_raw
"""

# Seasonality of the coming horizon, from history only: revenue in the same calendar
# window one year earlier, relative to that year's average per window of the same length.
SEASON = """
SELECT CASE WHEN MIN(order_date) <= DATE '{cutoff}' - 365 THEN
       COALESCE(SUM(amount) FILTER (WHERE order_date >= DATE '{cutoff}' - 365
                                      AND order_date <  DATE '{cutoff}' - 365 + {horizon}), 0)
       / NULLIF(SUM(amount) FILTER (WHERE order_date >= DATE '{cutoff}' - 365
                                      AND order_date < DATE '{cutoff}') * {horizon} / 365.0, 0)
       END AS season_index   -- unknown without a full year of history
FROM lines
WHERE status = 'completed' AND order_date < DATE '{cutoff}'
"""

LABELS = """
WITH horizon AS (
    SELECT * FROM lines
    WHERE order_date >= DATE '{cutoff}' AND order_date < DATE '{cutoff}' + {horizon}
      AND status = 'completed'
), before AS (
    SELECT customer_id, SUM(amount) AS spend_before
    FROM lines
    WHERE order_date >= DATE '{cutoff}' - {horizon} AND order_date < DATE '{cutoff}'
      AND status = 'completed'
    GROUP BY customer_id
), ahead AS (
    SELECT customer_id,
           COUNT(*) FILTER (WHERE amount >= 0)                     AS n_purchase_lines,
           COUNT(DISTINCT order_key) FILTER (WHERE amount >= 0)    AS future_orders,
           SUM(amount)                                             AS future_spend,
           SUM(margin)                                             AS future_margin
    FROM horizon GROUP BY customer_id
)
SELECT b.customer_id,
       CASE WHEN COALESCE(a.n_purchase_lines, 0) = 0 THEN 1 ELSE 0 END AS churned,
       COALESCE(a.future_spend, 0)   AS future_spend,
       COALESCE(a.future_margin, 0)  AS future_margin,
       COALESCE(a.future_orders, 0)  AS future_orders,
       CASE WHEN COALESCE(p.spend_before, 0) > 0
                 AND COALESCE(a.future_spend, 0) < 0.5 * p.spend_before THEN 1 ELSE 0 END
                                     AS declined,
       COALESCE(p.spend_before, 0)   AS spend_last_horizon
FROM activity b
LEFT JOIN ahead a USING (customer_id)
LEFT JOIN before p USING (customer_id)
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
        (``transactions`` required).
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
        spill = Path(tempfile.gettempdir()) / "csl-duckdb-spill"
        con.execute(f"SET temp_directory = '{_sql_text(str(spill))}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if isinstance(source, Mapping):
        for name, frame in source.items():
            if frame is not None:
                con.register(f"{name}_df", frame)
                con.execute(f"CREATE VIEW {_RAW[name]} AS SELECT * FROM {name}_df")
    else:
        folder = Path(source)
        if (folder / "clean" / "transactions.parquet").is_file():
            folder = folder / "clean"
        for name, view in _RAW.items():
            path = folder / f"{name}.parquet"
            if path.is_file():
                con.execute(f"CREATE VIEW {view} AS SELECT * FROM "
                            f"read_parquet('{_sql_text(str(path))}')")
    tables = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    if "tx_raw" not in tables:
        raise ValueError("no transactions table to build features from")
    columns = {r[0] for r in con.execute("DESCRIBE tx_raw").fetchall()}
    order_key = ("order_id" if "order_id" in columns
                 else "customer_id || '|' || CAST(CAST(order_date AS DATE) AS VARCHAR)")
    con.execute("CREATE VIEW lines AS " + _LINES.format(
        order_key=order_key,
        status="status" if "status" in columns else "'completed'",
        category="category" if "category" in columns else "'unknown'",
        channel="channel" if "channel" in columns else "'unknown'",
        margin="margin" if "margin" in columns else "CAST(NULL AS DOUBLE)",
    ))
    return con


def build_features(con: duckdb.DuckDBPyConnection, *, cutoff: dt.date,
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
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    fmt = {"cutoff": cutoff.isoformat()}
    windows = "".join(WINDOW.format(w=w, w2=2 * w, **fmt) for w in WINDOWS_DAYS)
    history = HISTORY.format(**fmt)
    if sample_share is not None and sample_share < 1:
        threshold = int(max(sample_share, 0.0) * 1_000_000)
        history += (f" AND hash(customer_id || '{cutoff.isoformat()}') % 1000000 "
                    f"< {threshold}")
    ctes = [("history", history), ("orders", ORDERS.format(**fmt)),
            ("activity", ACTIVITY.format(windows=windows, **fmt)),
            ("gaps", GAPS.format(**fmt)), ("categories", CATEGORIES.format(**fmt)),
            ("channels", CHANNELS.format(**fmt))]
    select = ["a.customer_id", "a.recency_days", "a.frequency", "a.n_orders",
              "a.monetary_total", "a.tenure_days", "a.monetary_mean_order",
              "a.monetary_max_order", "a.margin_total", "a.margin_rate",
              "gaps.gap_mean_days", "gaps.gap_median_days", "gaps.gap_std_days",
              "a.recency_days / NULLIF(gaps.gap_median_days, 0) AS recency_vs_gap"]
    joins = ["LEFT JOIN gaps USING (customer_id)"]
    for w in WINDOWS_DAYS:
        now, prev = f"GREATEST(a.spend_{w}d, 0)", f"GREATEST(a.spend_prev_{w}d, 0)"
        select += [f"a.orders_{w}d", f"a.spend_{w}d",
                   f"COALESCE(({now} - {prev}) / NULLIF({now} + {prev}, 0), 0) AS trend_{w}d"]
    select += ["a.cancel_rate", "a.return_rate",
               f"{cutoff.month} AS cutoff_month",
               "categories.n_categories",
               "categories.top_category", "channels.n_channels", "channels.top_channel",
               "channels.top_channel_share"]
    joins += ["LEFT JOIN categories USING (customer_id)",
              "LEFT JOIN channels USING (customer_id)"]
    if "interactions_raw" in views:
        cols = {r[0] for r in con.execute("DESCRIBE interactions_raw").fetchall()}
        unresolved = "resolved = FALSE" if "resolved" in cols else "FALSE"
        if "score" not in cols:
            raise ValueError("interactions need a 'score' column (may be empty)")
        ctes.append(("inter", INTERACTIONS.format(unresolved=unresolved, **fmt)))
        select += ["COALESCE(inter.n_complaints, 0) AS n_complaints",
                   "COALESCE(inter.complaints_90d, 0) AS complaints_90d",
                   "inter.days_since_complaint",
                   "COALESCE(inter.n_unresolved_complaints, 0) AS n_unresolved_complaints",
                   "COALESCE(inter.n_tickets, 0) AS n_tickets",
                   "inter.satisfaction_last", "inter.satisfaction_mean"]
        joins.append("LEFT JOIN inter USING (customer_id)")
    if "customers_raw" in views:
        cols = [r[0] for r in con.execute("DESCRIBE customers_raw").fetchall()]
        excluded = {c.casefold() for c in exclude_attributes}
        attrs = [c for c in cols if c not in {"customer_id", "signup_date"}
                 and c.casefold() not in excluded]
        attr_sql = "".join(f", {_ident(c)}" for c in attrs)
        signup = "signup_date" in cols
        sql = ATTRIBUTES if signup else ATTRIBUTES.replace(
            "DATE_DIFF('day', CAST(signup_date AS DATE), DATE '{cutoff}')", "CAST(NULL AS DOUBLE)")
        ctes.append(("attrs", sql.format(attribute_columns=attr_sql, **fmt)))
        select.append("attrs.days_since_signup")
        select += [f"attrs.{_ident(c)}" for c in attrs]
        joins.append("LEFT JOIN attrs USING (customer_id)")
    if horizon_days is not None:
        ctes.append(("season", SEASON.format(horizon=int(horizon_days), **fmt)))
        select.append("season.season_index")
        joins.append("CROSS JOIN season")
        ctes.append(("labels", LABELS.format(horizon=int(horizon_days), **fmt)))
        select.append("labels.spend_last_horizon")
        if labels:
            select += ["labels.churned", "labels.future_spend", "labels.future_margin",
                       "labels.future_orders", "labels.declined"]
        joins.append("LEFT JOIN labels USING (customer_id)")
    sql = ("WITH " + ",\n".join(
        f"{name} AS {'MATERIALIZED ' if name == 'orders' else ''}({body})"
        for name, body in ctes)
        + "\nSELECT " + ",\n       ".join(select) + "\nFROM activity a\n" + "\n".join(joins)
        + "\nORDER BY a.customer_id")
    frame = con.execute(sql).df()
    tx_cols = {r[0] for r in con.execute("DESCRIBE tx_raw").fetchall()}
    absent = {"margin": ["margin_total", "margin_rate", "future_margin"],
              "category": ["n_categories", "top_category"],
              "channel": ["n_channels", "top_channel", "top_channel_share"]}
    drop = [c for col, derived in absent.items() if col not in tx_cols for c in derived]
    return _tidy(frame.drop(columns=[c for c in drop if c in frame]))


def build_snapshots(con: duckdb.DuckDBPyConnection, *, cutoffs: list[dt.date],
                    horizon_days: int, exclude_attributes: tuple[str, ...] = (),
                    sample_share: float | None = None) -> pd.DataFrame:
    """Features and labels at several cutoffs, stacked (rolling origin); with
    ``sample_share``, about that share of the customers at each cutoff.

    Returns
    -------
    DataFrame
        The columns of :func:`build_features` with labels, plus ``cutoff``.
    """
    frames = [build_features(con, cutoff=c, horizon_days=horizon_days,
                             exclude_attributes=exclude_attributes,
                             sample_share=sample_share).assign(cutoff=pd.Timestamp(c))
              for c in sorted(cutoffs)]
    return pd.concat(frames, ignore_index=True)


def data_start(con: duckdb.DuckDBPyConnection) -> dt.date:
    """The day of the first transaction."""
    return con.execute("SELECT MIN(order_date) FROM lines").fetchone()[0]


def data_end(con: duckdb.DuckDBPyConnection) -> dt.date:
    """The day after the last transaction: the natural scoring date."""
    last = con.execute("SELECT MAX(order_date) FROM lines").fetchone()[0]
    return last + dt.timedelta(days=1)


def resolve_as_of(con: duckdb.DuckDBPyConnection, *, as_of: dt.date | str | None = None
                  ) -> dt.date:
    """The scoring date: ``as_of`` when given, else the day after the last transaction."""
    return data_end(con) if as_of in (None, "") else _as_date(as_of)


def resolve_horizon_days(con: duckdb.DuckDBPyConnection, *, horizon_days: int | str,
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


def suggest_horizon_days(con: duckdb.DuckDBPyConnection, *, quantile: float = 0.8,
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
    q = con.execute(sql).fetchone()[0]
    if q is None or not np.isfinite(q):
        return 90
    return int(min(max(30 * math.ceil(q / 30), 30), 365))


# --------------------------------------------------------------------------- helpers

_RAW = {"transactions": "tx_raw", "customers": "customers_raw",
        "interactions": "interactions_raw"}


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    ints = ["recency_days", "frequency", "n_orders", "cutoff_month", "tenure_days", "churned", "declined",
            "future_orders", "n_categories", "n_channels", "n_complaints", "complaints_90d",
            "n_unresolved_complaints", "n_tickets"] + [f"orders_{w}d" for w in WINDOWS_DAYS]
    out = frame.copy()
    for col in ints:
        if col in out:
            out[col] = out[col].astype("int64")
    for col in out.columns:
        if col not in ints and pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].astype("float64")
    return out


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
