"""Monitoring across runs: KPIs per run, run history, what changed since the last run,
and feature drift.

Every successful run appends its KPIs and model metrics to
``<processed_dir>/history.parquet``; the executive report compares the run with the
previous successful one (``reports/latest`` before the switch).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.config import DAYS_PER_MONTH
from analysis.data import write_atomically
from analysis.engine import as_engine
from analysis.segments import ACTIVE_STAGES, TIER_HIGH
from analysis.store import (
    SCAN_ORDER,
    CustomerView,
    RunStore,
    duck_connection,
    parquet_scan,
    sql_name,
    sql_text,
)

__all__ = ["append_history", "drift_bins", "drift_counts", "feature_drift", "kpi_deltas",
           "migration_matrix", "monthly_trend", "new_alerts", "population_stability",
           "read_history", "realized_outcomes", "run_kpis", "stability_bins", "stability_index"]


def run_kpis(processed_dir: str | Path) -> dict:
    """The headline numbers of one run, from its processed folder.

    Returns
    -------
    dict
        ``as_of``, ``customers``, ``active_customers``, ``revenue_12m``,
        ``top20_revenue_share``, ``predicted_value``, ``at_risk_customers``,
        ``revenue_at_risk``, ``high_value_customers``, ``complaint_rate`` (share of
        customers with a complaint in the last 90 days), ``churn_auc`` and ``value_mae``
        (of the methods that scored the customers; the AUC on the customers active at the
        evaluation cutoff),
        ``phaseout_customers``, ``campaign_profit`` (those that exist).
    """
    folder = Path(processed_dir)
    # (counted where the customer table lies: DuckDB over the run store)
    with CustomerView(RunStore(folder), ["lifecycle_stage", "spend_365d", "value_tier",
                                         "complaints_90d", "churn_probability",
                                         "predicted_value", "phaseout_candidate"]) as c:
        n, top, phaseout = _kpi_counts(c)
    profile = json.loads((folder / "profile.json").read_text())
    spend = float(n["spend"]) if n["spend_known"] else 0.0
    out = {"as_of": profile["as_of"], "customers": int(n["customers"]),
           "active_customers": int(n["active"])}
    # a snapshot without revenue has no revenue figure to compare: none is recorded
    known = bool(n["spend_known"])
    if known:
        out.update(revenue_12m=spend, top20_revenue_share=float(top) / spend if spend else 0,
                   high_value_customers=int(n["high"]))
    if "complaints" in n:
        out["complaint_rate"] = float(n["complaints"])
    if "risk_known" in n and n["risk_known"]:
        out["at_risk_customers"] = int(n["at_risk"])
        if known:
            out.update(predicted_value=float(n["predicted"]),
                       revenue_at_risk=float(n["spend_at_risk"]))
    models = folder / "models.json"
    if models.is_file():
        m = json.loads(models.read_text())
        # the method that scored the customers (runs before the choice: XGBoost)
        if "churn" in m:
            # on the customers still active at the evaluation cutoff, those churn risk is
            # about (runs before that: everyone)
            judged = m.get("churn_active", m["churn"])
            out["churn_auc"] = judged[m["churn"].get("chosen", "model")]["roc_auc"]
        if "value" in m:
            out["value_mae"] = m["value"][m["value"].get("chosen", "model")]["mae"]
    if phaseout is not None:
        out["phaseout_customers"] = phaseout
    retention = folder / "strategy" / "retention.json"
    if retention.is_file():
        profit = json.loads(retention.read_text())["max_expected_profit"]
        if profit is not None:
            out["campaign_profit"] = profit
    return out


def append_history(history_path: str | Path, row: dict) -> pd.DataFrame:
    """Add (or replace, for a re-used run id) one run's row; written atomically."""
    path = Path(history_path)
    history = read_history(path)
    history = history[history["run_id"] != row["run_id"]] if len(history) else history
    history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
    write_atomically(path, lambda tmp: history.to_parquet(tmp, index=False))
    return history


def read_history(history_path: str | Path, *, config: str | None = None) -> pd.DataFrame:
    """The run history (empty frame when there is none yet); given ``config``, only the
    runs of the config of that name (configs sharing output folders share the file; rows
    written before the history named configs are kept)."""
    path = Path(history_path)
    history = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["run_id"])
    if config is not None and "config" in history:
        history = history[history["config"].isna() | (history["config"] == config)]
    return history.reset_index(drop=True)


def kpi_deltas(current: dict, previous: dict) -> pd.DataFrame:
    """KPIs of this run next to the previous one.

    Returns
    -------
    DataFrame
        ``kpi``, ``previous``, ``current``, ``change``, ``change_share``.
    """
    rows = []
    for key, now in current.items():
        before = previous.get(key)
        if isinstance(now, int | float) and isinstance(before, int | float):
            rows.append({"kpi": key, "previous": before, "current": now,
                         "change": now - before,
                         "change_share": (now - before) / abs(before) if before else np.nan})
    return pd.DataFrame(rows)


def _kpi_counts(c: CustomerView) -> tuple[pd.Series, float, int | None]:
    """:func:`run_kpis`' counts and sums over the customers, where they lie; the spend of
    the top 20 % of customers by spend; the phase-out list's size (None without one)."""
    active = f"lifecycle_stage IN ({', '.join(sql_text(s) for s in ACTIVE_STAGES)})"
    risk = f"churn_probability >= 0.5 AND {active}"
    n = c.frame(
        f"SELECT count(*) AS customers, count_if({active}) AS active, "
        "count(spend_365d) AS spend_known, fsum(greatest(spend_365d, 0)) AS spend, "
        f"count_if(value_tier = {sql_text(TIER_HIGH)}) AS high, "
        + ("favg(CASE WHEN complaints_90d > 0 THEN 1.0 ELSE 0.0 END) AS complaints, "
           if "complaints_90d" in c else "")
        + ("count(churn_probability) AS risk_known, "
           f"count_if({risk}) AS at_risk, coalesce(fsum(predicted_value), 0) AS predicted, "
           f"coalesce(fsum(greatest(spend_365d, 0)) FILTER (WHERE {risk}), 0) "
           "AS spend_at_risk, "
           if "churn_probability" in c else "")
        + ("count_if(phaseout_candidate) AS phaseout, " if "phaseout_candidate" in c else "")
        + "NULL AS _ FROM customers").iloc[0]
    # (a spend of 0 where none is known)
    top = c.frame("SELECT coalesce(fsum(s), 0) FROM (SELECT greatest(spend_365d, 0) AS s "
                  "FROM customers ORDER BY s DESC NULLS LAST "
                  f"LIMIT {max(1, round(0.2 * n['customers']))})").iloc[0, 0]
    return n, float(top), int(n["phaseout"]) if "phaseout" in n else None


def migration_matrix(current: CustomerView, previous: RunStore | pd.DataFrame, *,
                     column: str) -> pd.DataFrame:
    """Customers by their ``column`` in the ``previous`` run (rows) and now (columns);
    customers new since then come from "(new)", those gone go to "(gone)". Counted where
    the tables lie: the run's customer view joined with the previous run's store (or a
    table of ``customer_id`` and ``column``)."""
    if isinstance(previous, RunStore):
        before = previous.joined_sql([column])
    else:
        current.register("_previous", previous[["customer_id", column]])
        before = "SELECT * FROM _previous"
    name = sql_name(column)
    table = current.crosstab(
        f"SELECT coalesce(p.{name}::VARCHAR, '(new)') AS before, "
        f"coalesce(c.{name}::VARCHAR, '(gone)') AS now, count(*) AS n "
        f"FROM (SELECT customer_id, {name} FROM customers) AS c "
        f"FULL OUTER JOIN ({before}) AS p ON p.customer_id = c.customer_id GROUP BY ALL")
    return table.rename_axis(index=f"{column} before", columns=f"{column} now")


def new_alerts(previous: str | Path | None, current: str | Path) -> pd.DataFrame:
    """Per rule, the early warnings (customer, rule) of the run in ``current`` (its
    folder) that the run in ``previous`` had not raised (all of them when None, or when
    it has no warnings), counted where they lie (DuckDB over the two tables): ``rule``,
    ``alerts``; most first, ties in the current table's order (the rules')."""
    before = (f"SELECT customer_id, rule FROM {parquet_scan(RunStore(previous).alerts_table)}"
              if previous is not None and RunStore(previous).alerts_table.exists()
              else "SELECT NULL AS customer_id, NULL AS rule WHERE FALSE")
    con = duck_connection()
    try:
        return con.execute(
            "SELECT rule, count(*) AS alerts "
            f"FROM {parquet_scan(RunStore(current).alerts_table, ordered=True)} AS c "
            f"WHERE NOT EXISTS (SELECT 1 FROM ({before}) AS p "
            "WHERE p.customer_id = c.customer_id AND p.rule = c.rule) "
            "GROUP BY rule "
            f"ORDER BY alerts DESC, min(({', '.join(SCAN_ORDER)}))").df()
    finally:
        con.close()


def population_stability(expected, actual, *, bins: int = 10) -> float:
    """Population stability index of a numeric feature (quantile bins of ``expected``).

    Below 0.1: stable; 0.1-0.25: some drift; above 0.25: a large shift.
    """
    edges = stability_bins(expected, bins=bins)
    return stability_index(edges, None if edges is None else _bin_counts(edges, actual))


def stability_bins(expected, *, bins: int = 10) -> tuple[np.ndarray, np.ndarray] | None:
    """The quantile bins of ``expected`` that :func:`population_stability` counts in
    (the outer edges open) and ``expected``'s share in each; None when it has no value.
    One bin (fewer than three distinct edges) means no shift can be seen."""
    e = pd.Series(expected, dtype=float).dropna().to_numpy()
    if len(e) == 0:
        return None
    edges = np.unique(np.quantile(e, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        return edges, np.ones(1)
    edges[0], edges[-1] = -np.inf, np.inf
    return edges, np.histogram(e, edges)[0] / len(e)


def stability_index(bins: tuple[np.ndarray, np.ndarray] | None, counts) -> float:
    """The PSI from :func:`stability_bins` and the actual values' count in each bin
    (None, or no count, when the actual values have none: NaN)."""
    if bins is None or counts is None or np.sum(counts) == 0:
        return float("nan")
    edges, pe = bins
    if len(edges) < 3:
        return 0.0
    pa = np.asarray(counts, dtype=float) / np.sum(counts)
    pe, pa = np.clip(pe, 1e-4, None), np.clip(pa, 1e-4, None)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def feature_drift(train: pd.DataFrame | None, score: pd.DataFrame | None, *,
                  top: int | None = None, bins: dict | None = None,
                  counts: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """PSI of every numeric feature between the training snapshots and the scoring date.

    ``bins`` and ``counts``: instead of ``train`` and ``score``, the training bins of
    each numeric feature (:func:`drift_bins`) and the scoring date's count of values in
    each (:func:`drift_counts`, summed over the parts of a table too large to hold, as
    Spark's executors count them).

    Returns
    -------
    DataFrame
        ``feature``, ``psi``, ``level`` (stable < 0.1 <= some drift < 0.25 <= large
        shift), largest first.
    """
    if bins is None:
        bins = drift_bins(train, score, columns=None if counts is None else list(counts))
    if counts is None:
        counts = drift_counts(bins, score)
    rows = []
    for col, b in bins.items():
        value = stability_index(b, counts[col])
        if value == value:
            rows.append({"feature": col, "psi": value})
    out = pd.DataFrame(rows, columns=["feature", "psi"]).sort_values("psi", ascending=False)
    out["level"] = np.select([out["psi"] >= 0.25, out["psi"] >= 0.1],
                             ["large shift", "some drift"], default="stable")
    return (out.head(top) if top else out).reset_index(drop=True)


def drift_bins(train: pd.DataFrame, score: pd.DataFrame | None, *,
               columns: list[str] | None = None) -> dict:
    """The training bins (:func:`stability_bins`) of each numeric column of ``score``
    that training has, in ``score``'s order (of ``columns`` when given; ``score`` is
    then not read)."""
    names = columns if columns is not None else [
        c for c in score.columns if c in train and pd.api.types.is_numeric_dtype(score[c])]
    return {c: stability_bins(train[c]) for c in names}


def drift_counts(bins: dict, score: pd.DataFrame) -> dict[str, np.ndarray | None]:
    """Each column's count of ``score``'s values in its training bins (None where the
    bins are)."""
    return {col: None if b is None else _bin_counts(b, score[col]) for col, b in bins.items()}


def _bin_counts(bins: tuple[np.ndarray, np.ndarray], values) -> np.ndarray:
    a = pd.Series(values, dtype=float).dropna().to_numpy()
    return np.histogram(a, bins[0])[0] if len(bins[0]) >= 3 else np.array([len(a)])


def realized_outcomes(previous: RunStore, actual: str | Path, *,
                      memory_limit: str | None = None) -> dict:
    """How an earlier run's predictions turned out, once its horizon has passed, counted
    where the tables lie (DuckDB over Parquet, out of core, whichever engine wrote them).

    ``previous`` is that run's store (its customers' ``churn_probability`` and
    ``predicted_value``); ``actual`` a table of the labels observed since (``churned``,
    ``future_spend``: :func:`analysis.features.write_features` at that run's date with
    its horizon). The customers in both with a churn probability and a label count.

    Returns
    -------
    dict
        ``customers``, ``churn_auc`` (the Mann-Whitney statistic, ties counted half: as
        scikit-learn's ``roc_auc_score``; NaN with one class only), ``brier``,
        ``predicted_churn_rate``, ``observed_churn_rate``, ``value_mae``,
        ``predicted_total``, ``actual_total``.
    """
    con = duck_connection(memory_limit)
    try:
        con.execute(
            "CREATE TEMP VIEW d AS SELECT p.churn_probability AS p, "
            "p.predicted_value AS v, a.churned::DOUBLE AS y, a.future_spend AS s "
            f"FROM ({previous.joined_sql(['churn_probability', 'predicted_value'])}) AS p "
            f"JOIN {parquet_scan(actual)} AS a ON a.customer_id = p.customer_id "
            "WHERE p.churn_probability IS NOT NULL AND a.churned IS NOT NULL")
        out = con.execute(
            "SELECT count(*) AS customers, favg(p) AS predicted_churn_rate, "
            "favg(y) AS observed_churn_rate, favg((p - y) * (p - y)) AS brier, "
            "favg(abs(s - v)) AS value_mae, coalesce(fsum(v), 0) AS predicted_total, "
            "coalesce(fsum(s), 0) AS actual_total, count_if(y = 1) AS n1 FROM d"
        ).df().iloc[0].to_dict()
        n1 = int(out.pop("n1"))
        n0 = int(out["customers"]) - n1
        # each churner's rank among all (ties: their mean rank), against the ranks they
        # would have if every churner came first
        ranks = con.execute(
            "SELECT fsum(r) FROM (SELECT y, rank() OVER (ORDER BY p) "
            "+ (count(*) OVER (PARTITION BY p) - 1) / 2.0 AS r FROM d) WHERE y = 1"
        ).fetchone()[0]
    finally:
        con.close()
    out = {k: (int(v) if k == "customers" else float(v)) for k, v in out.items()}
    out["churn_auc"] = ((float(ranks) - n1 * (n1 + 1) / 2) / (n1 * n0) if n1 and n0
                        else float("nan"))
    return out


def monthly_trend(con, *, as_of: dt.date, horizon_days: int, months: int = 13
                  ) -> pd.DataFrame:
    """Key numbers at each of the ``months`` monthly dates up to ``as_of``, from the order
    log alone (so that a first run already has a trend).

    At each date m: ``buying_customers`` (a purchase in the 365 days before m),
    ``revenue_12m`` (completed net amount in those days, as the customer table's
    ``spend_365d``), ``top20_revenue_share`` (of that revenue, the share of the 20 % of
    buying customers who spent most) and ``churn_rate``: of the customers with a purchase
    in the year before m - ``horizon_days``, the share with none from then to m (the churn
    of the horizon that ended at m, so every point is fully observed).

    Returns
    -------
    DataFrame
        ``as_of`` (date) and the four numbers, oldest first.
    """
    h = int(horizon_days)
    cuts = [as_of - dt.timedelta(days=round(k * DAYS_PER_MONTH)) for k in range(months)][::-1]
    # each date's customers from its own window of the daily rows (one aggregate per
    # date, stacked: faster than joining the dates to the rows; read twice below, so
    # materialised once)
    per = "\n        UNION ALL\n".join(f"""
        SELECT {m} AS m, customer_id,
               SUM(amount) FILTER (WHERE order_date >= {m} - INTERVAL 365 DAY)    AS rev12,
               BOOL_OR(purchase AND order_date >= {m} - INTERVAL 365 DAY)         AS buying,
               BOOL_OR(purchase AND order_date < {m} - INTERVAL {h} DAY)          AS base,
               BOOL_OR(purchase AND order_date >= {m} - INTERVAL {h} DAY)         AS recent
        FROM daily
        WHERE order_date < {m} AND order_date >= {m} - INTERVAL {365 + h} DAY
        GROUP BY customer_id""" for m in (f"DATE '{c.isoformat()}'" for c in cuts))
    sql = f"""
    WITH daily AS (
        SELECT customer_id, order_date, SUM(amount) AS amount,
               BOOL_OR(amount >= 0) AS purchase
        FROM lines
        WHERE status = 'completed' AND order_date < DATE '{as_of.isoformat()}'
          AND order_date >= DATE '{cuts[0].isoformat()}' - INTERVAL {365 + h} DAY
        GROUP BY customer_id, order_date
    ), per AS MATERIALIZED ({per}
    ), ranked AS (
        SELECT m, rev12, ROW_NUMBER() OVER (PARTITION BY m ORDER BY rev12 DESC) AS rn,
               COUNT(*) OVER (PARTITION BY m) AS n
        FROM per WHERE buying
    ), top AS (
        SELECT m, SUM(rev12) FILTER (WHERE rn <= ROUND(0.2 * n)) / NULLIF(SUM(rev12), 0)
                    AS top20_revenue_share
        FROM ranked GROUP BY m
    ), kpis AS (
        SELECT m,
               COUNT(*) FILTER (WHERE buying)                            AS buying_customers,
               COALESCE(SUM(rev12), 0)                                   AS revenue_12m,
               AVG(CASE WHEN recent THEN 0.0 ELSE 1.0 END) FILTER (WHERE base) AS churn_rate
        FROM per GROUP BY m
    )
    SELECT k.m AS as_of, k.buying_customers, k.revenue_12m, k.churn_rate,
           t.top20_revenue_share
    FROM kpis k LEFT JOIN top t ON t.m = k.m ORDER BY k.m"""
    out = as_engine(con).frame(sql)
    out["as_of"] = pd.to_datetime(out["as_of"]).dt.date
    return out[["as_of", "buying_customers", "revenue_12m", "top20_revenue_share",
                "churn_rate"]]
