"""Decisions: one action per customer, retention targeting by expected profit, phase-out
review with guardrails, early warnings and a fairness audit.

Every number a decision uses is a named parameter (:class:`~analysis.config.StrategyParams`, the config's
``strategy`` section) and the action policy is a table (:data:`DEFAULT_POLICY`), so the
report can print both. Protected attributes never enter a decision; they are only used by
:func:`fairness_audit`, after the fact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from scipy import stats

from analysis.clv import RFM_SUMMARY_COLUMNS, fit_bgnbd, rfm_summary, summary_of_rows
from analysis.config import DAYS_PER_MONTH, StrategyParams
from analysis.data import read_columns, write_csv
from analysis.engine import SparkEngine, as_engine
from analysis.features import (
    Connection,
    build_features,
    connect_run,
    resolve_as_of,
    snapshots_by_cutoff,
)
from analysis.models import (customers_with_reasons, explain_customers, prepare_matrix,
                             read_model_run, skipped_reason, summary_kept_on_spark)
from analysis.segments import (
    ACTIVE_STAGES,
    STAGE_ACTIVE,
    STAGE_LAPSED,
    STAGE_LOST,
    STAGE_NEW,
    TIER_HIGH,
    TIER_LOW,
    TIER_MID,
    TIER_UNKNOWN,
    WIN_BACK_STAGES,
)
from analysis.store import SCAN_ORDER, RunStore, duck_connection, parquet_scan
from analysis.uplift import (
    BGNBD_FIT_CUSTOMERS,
    contact_value,
    estimate_hazard_effect,
    hazard_effect_rows,
    last_coefficient,
    learn_uplift,
    recent_campaign_customers,
)

__all__ = [
    "DECISION_COLUMNS",
    "DEFAULT_POLICY",
    "RISK_BANDS",
    "GROW",
    "MAINTAIN",
    "NO_ACTION_LAPSED",
    "NURTURE",
    "PHASEOUT_REVIEW",
    "RETAIN_AUTOMATED",
    "RETAIN_PERSONAL",
    "ACTIONS_WITH_REASONS",
    "RETAIN_PREFIX",
    "SERVE_LOW_COST",
    "WIN_BACK",
    "StrategyParams",
    "StrategyRun",
    "action_summary",
    "assign_actions",
    "CAMPAIGN_COLUMNS",
    "campaign_list",
    "campaign_summary",
    "decision_table",
    "describe_condition",
    "churn_risk_band",
    "decide",
    "decide_on_spark",
    "decide_snapshot",
    "DECISIONS_SCHEMA",
    "ALERT_RULES",
    "CURVE_POINTS",
    "GUARDRAIL_STEPS",
    "best_depth",
    "contact_gains",
    "growth_potential",
    "guardrails_passed",
    "phaseout_list",
    "guardrail_effects",
    "measurement_window",
    "policy_table",
    "read_strategy",
    "alert_counts",
    "read_alerts",
    "write_strategy",
    "customer_economics",
    "early_warnings",
    "estimate_margin_uplift",
    "estimate_retention_effect",
    "fairness_audit",
    "fairness_summary",
    "order_profits",
    "period_profits",
    "phaseout_review",
    "retention_targeting",
    "strategy_step",
    "needs_reasons",
    "needs_value_reasons",
]

#: The actions of the default policy. A policy's actions whose name starts with
#: :data:`RETAIN_PREFIX` are retention contacts: together they are the campaign.
PHASEOUT_REVIEW = "Review for phase-out"
WIN_BACK = "Win back"
RETAIN_PERSONAL = "Retain - personal outreach"
NURTURE = "Nurture / VIP care"
RETAIN_AUTOMATED = "Retain - automated offer"
GROW = "Grow / develop"
NO_ACTION_LAPSED = "No action - lapsed"
SERVE_LOW_COST = "Serve at low cost"
MAINTAIN = "Maintain"
RETAIN_PREFIX = "Retain"

#: Actions whose customers a person reads about one by one, each with their reasons
#: (with the customers under an early warning and :data:`TOP_OF_TABLE`).
ACTIONS_WITH_REASONS = (RETAIN_PERSONAL, RETAIN_AUTOMATED, WIN_BACK, PHASEOUT_REVIEW)
#: Actions whose case rests on the customer's value: their customers also carry the
#: value model's reasons (with the :data:`TOP_OF_TABLE` highest predicted values).
ACTIONS_WITH_VALUE_REASONS = (PHASEOUT_REVIEW,)
#: The customers at the top of a table: the highest churn probabilities and the highest
#: predicted values, this many of each.
TOP_OF_TABLE = 100

#: The churn-risk bands of the decisions (``churn_risk``): ``high`` from ``high_risk``
#: on, ``low`` below it, ``unknown`` without a churn probability. Words distinct from
#: the lifecycle stages and the RFM segment names (:mod:`analysis.segments`).
RISK_BANDS = ("high", "low", "unknown")


def churn_risk_band(probability: pd.Series, *, high_risk: float) -> np.ndarray:
    """The :data:`RISK_BANDS` band of each churn probability."""
    return np.where(probability.isna(), RISK_BANDS[2],
                    np.where(probability >= high_risk, RISK_BANDS[0], RISK_BANDS[1]))


#: The action policy: rows are tried in order and the first whose conditions all hold
#: names the customer's action. A condition lists the allowed values of a decision
#: column (see :func:`assign_actions`); a row without conditions matches everyone.
DEFAULT_POLICY: list[dict] = [
    {"action": PHASEOUT_REVIEW, "phaseout_candidate": [True],
     "why": "unprofitable over several periods, every order losing money beyond chance, "
            "low potential, guardrails passed"},
    {"action": WIN_BACK, "lifecycle_stage": list(WIN_BACK_STAGES), "value_tier": [TIER_HIGH],
     "why": "lapsed customers with high past value"},
    {"action": RETAIN_PERSONAL, "value_tier": [TIER_HIGH], "churn_risk": ["high"],
     "lifecycle_stage": list(ACTIVE_STAGES),
     "why": "high value, high risk of churning"},
    {"action": RETAIN_AUTOMATED, "value_tier": [TIER_UNKNOWN], "churn_risk": ["high"],
     "lifecycle_stage": list(ACTIVE_STAGES),
     "why": "high risk of churning, value unknown (the data has no revenue): the low-cost "
            "contact, not valued against what it may save"},
    {"action": RETAIN_AUTOMATED, "retention_profitable": [True],
     "why": "a retention contact is expected to pay for itself (churn risk x effect x "
            "value if retained > contact and offer cost)"},
    {"action": NURTURE, "value_tier": [TIER_HIGH], "churn_risk": ["low"],
     "why": "high value, low risk, a retention contact would not pay for itself"},
    {"action": GROW, "value_tier": [TIER_LOW, TIER_MID], "potential": [True],
     "why": "predicted value well above current value, or rising and broad interest"},
    {"action": NO_ACTION_LAPSED, "lifecycle_stage": list(WIN_BACK_STAGES),
     "why": "already gone, and not known to be valuable enough to win back"},
    {"action": SERVE_LOW_COST, "value_tier": [TIER_LOW], "profitable": [False],
     "why": "low value, no potential, unprofitable at the current cost to serve: move to "
            "self-service and automated channels (not refusal of service)"},
    {"action": MAINTAIN, "why": "standard service"},
]

#: The columns of the run's customer table that :func:`decide` reads (the strategy step
#: loads only these: a large base's table has dozens more, long texts among them).
DECISION_COLUMNS = (
    "customer_id", "value_tier", "lifecycle_stage", "churn_probability", "predicted_value",
    "spend_365d", "spend_90d", "n_categories", "trend_90d", "trend_180d", "monetary_mean_order",
    "top_channel", "margin_rate", "n_complaints", "complaints_90d", "days_since_complaint",
    "tenure_days", "frequency", "recency_days", "recency_vs_gap", "satisfaction_last")


# --------------------------------------------------------------------------- economics


def customer_economics(customers: pd.DataFrame, *, horizon_days: int,
                       params: StrategyParams) -> pd.DataFrame:
    """Expected margin, cost to serve and profit per customer over the horizon.

    Parameters
    ----------
    customers : one row per customer with ``predicted_value``, ``monetary_mean_order``,
        ``top_channel`` (optional), ``margin_rate`` (optional), ``n_complaints``
        (optional), ``tenure_days``.

    Returns
    -------
    DataFrame
        ``customer_id``, ``margin_rate_used``, ``expected_revenue``, ``expected_orders``,
        ``expected_margin``, ``cost_to_serve``, ``expected_profit``.
    """
    c = customers
    rate = c["margin_rate"].clip(0, 1) if "margin_rate" in c else pd.Series(np.nan, c.index)
    rate = rate.fillna(params.margin_rate)
    revenue = c["predicted_value"].clip(lower=0)
    orders = (revenue / c["monetary_mean_order"].where(c["monetary_mean_order"] > 0)).fillna(0)
    channel = c["top_channel"] if "top_channel" in c else pd.Series("", index=c.index)
    per_order = channel.map(params.cost_per_order_by_channel).astype(float).fillna(
        params.cost_per_order)
    years = horizon_days / 365.0
    complaints_per_year = (c["n_complaints"] / np.maximum(c["tenure_days"], 30) * 365
                           if "n_complaints" in c else 0.0)
    cost = orders * per_order + complaints_per_year * years * params.cost_per_complaint \
        + params.cost_per_account_year * years
    margin = revenue * rate
    return pd.DataFrame({"customer_id": c["customer_id"], "margin_rate_used": rate,
                         "expected_revenue": revenue, "expected_orders": orders,
                         "expected_margin": margin, "cost_to_serve": cost,
                         "expected_profit": margin - cost})


def growth_potential(customers: pd.DataFrame, *, horizon_days: int,
                     params: StrategyParams) -> pd.Series:
    """Whether each customer of an order log has growth potential: a predicted value
    over the horizon of at least ``growth_ratio`` times their run rate (last 12 months'
    spend over the horizon), or a rising 180-day trend, broad interest (three or more
    categories) and a predicted value above the run rate."""
    c = customers
    run_rate = c["spend_365d"].clip(lower=0) * horizon_days / 365
    broad = c["n_categories"] >= 3 if "n_categories" in c else False
    return (c["predicted_value"] >= params.growth_ratio * np.maximum(run_rate, 1.0)) | (
        (c["trend_180d"] > 0.3) & broad & (c["predicted_value"] > run_rate))


def period_profits(con: Connection, *, as_of: dt.date, horizon_days: int,
                   periods: int, params: StrategyParams) -> pd.DataFrame:
    """Realised profit of each customer in each of the ``periods`` horizon-length
    windows before ``as_of`` (margin, or revenue x margin rate, minus orders x channel
    cost): the long-term view the phase-out guardrail needs.

    Returns
    -------
    DataFrame
        ``customer_id`` and ``profit_p1`` (most recent period) .. ``profit_pK``.
    """
    return as_engine(con).frame(_period_profits_sql(as_of=as_of, horizon_days=horizon_days,
                                                    periods=periods, params=params))


def _period_profits_sql(*, as_of: dt.date, horizon_days: int, periods: int,
                        params: StrategyParams) -> str:
    """The query of :func:`period_profits`."""
    case = _channel_cost_sql("MIN(channel)", params)
    cols = []
    for k in range(1, periods + 1):
        start = as_of - dt.timedelta(days=k * horizon_days)
        end = as_of - dt.timedelta(days=(k - 1) * horizon_days)
        cols.append(f"SUM(CASE WHEN order_date >= DATE '{start}' AND order_date < DATE '{end}' "
                    f"THEN order_profit ELSE 0 END) AS profit_p{k}")
    sql = f"""
    WITH orders AS (
        SELECT customer_id, order_key, MIN(order_date) AS order_date,
               SUM(COALESCE(margin, amount * {float(params.margin_rate)}))
                 - {case} AS order_profit
        FROM lines
        WHERE status = 'completed' AND order_date < DATE '{as_of}'
        GROUP BY customer_id, order_key
    )
    SELECT customer_id, {", ".join(cols)} FROM orders GROUP BY customer_id"""
    return sql


def order_profits(con: Connection, *, as_of: dt.date,
                  params: StrategyParams) -> pd.DataFrame:
    """Each customer's profit per order over their whole history before ``as_of`` (margin,
    or revenue x margin rate, less the cost of the order's own channel): how sure it is
    that their orders lose money.

    Returns
    -------
    DataFrame
        ``customer_id``, ``n_orders_profit`` (completed orders), ``order_profit_mean``
        and ``order_profit_se`` (its standard error; NaN with one order).
    """
    return as_engine(con).frame(_order_profits_sql(as_of=as_of, params=params))


def _order_profits_sql(*, as_of: dt.date, params: StrategyParams) -> str:
    """The query of :func:`order_profits`."""
    case = _channel_cost_sql("MIN(channel)", params)
    return f"""
    WITH orders AS (
        SELECT customer_id, order_key,
               SUM(COALESCE(margin, amount * {float(params.margin_rate)})) - {case}
                 AS order_profit
        FROM lines
        WHERE status = 'completed' AND order_date < DATE '{as_of}'
        GROUP BY customer_id, order_key
    )
    SELECT customer_id, COUNT(*) AS n_orders_profit, AVG(order_profit) AS order_profit_mean,
           STDDEV_SAMP(order_profit) / SQRT(COUNT(*)) AS order_profit_se
    FROM orders GROUP BY customer_id"""


def _channel_cost_sql(column: str, params: StrategyParams) -> str:
    """SQL for the cost to serve one order through the channel in ``column``."""
    whens = " ".join(f"WHEN {column} = '{name.replace(chr(39), chr(39) * 2)}' THEN {float(cost)}"
                     for name, cost in params.cost_per_order_by_channel.items())
    default = float(params.cost_per_order)
    return f"(CASE {whens} ELSE {default} END)" if whens else str(default)


# --------------------------------------------------------------------------- retention


def estimate_retention_effect(campaign: pd.DataFrame, outcomes: pd.DataFrame, *,
                              by: str | None = None, n_boot: int = 500, seed: int = 0
                              ) -> pd.DataFrame:
    """P(retained | contacted) for would-be churners, from a randomized campaign.

    ``outcomes`` has ``customer_id`` and ``churned`` (no purchase in a window after the
    campaign date) for the customers the campaign could keep; the effect is the relative drop
    in churn, (churn_control - churn_treated) / churn_control, with a bootstrap 95 %
    interval, overall and per value of ``by``.

    Returns
    -------
    DataFrame
        ``group``, ``n_treated``, ``n_control``, ``churn_treated``, ``churn_control``,
        ``retention_rate``, ``ci_low``, ``ci_high``.
    """
    keys = [k for k in ("customer_id", "campaign_date") if k in outcomes and k in campaign]
    df = campaign[[*keys, "treated"]].merge(outcomes, on=keys)
    df["treated"] = df["treated"].astype(bool)
    rng = np.random.default_rng(seed)
    groups = [("all", df)]
    if by is not None and by in df:
        groups += [(str(g), part) for g, part in df.groupby(by, observed=True)]
    rows = []
    for name, part in groups:
        t = part.loc[part["treated"], "churned"].to_numpy(dtype=float)
        c = part.loc[~part["treated"], "churned"].to_numpy(dtype=float)
        if len(t) < 30 or len(c) < 30 or c.mean() == 0:
            continue
        effect = (c.mean() - t.mean()) / c.mean()
        boots = []
        for _ in range(n_boot):
            tb, cb = rng.choice(t, len(t)), rng.choice(c, len(c))
            if cb.mean() > 0:
                boots.append((cb.mean() - tb.mean()) / cb.mean())
        lo, hi = np.percentile(boots, [2.5, 97.5])
        rows.append({"group": name, "n_treated": len(t), "n_control": len(c),
                     "churn_treated": t.mean(), "churn_control": c.mean(),
                     "retention_rate": effect, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def estimate_margin_uplift(frame: pd.DataFrame, *, by: str | None = None,
                           covariates: tuple[str, ...] = ()) -> pd.DataFrame:
    """Extra margin per contacted customer, from a randomized campaign.

    ``frame`` has one row per customer the campaign could reach: ``treated``,
    ``future_margin`` (margin in the window after the campaign), ``predicted_margin``
    (what the value model expected over that window, at the campaign date) and the
    ``covariates`` (pre-campaign numbers). The effect is the difference in mean margin
    between contacted and not contacted customers, adjusted by regression on
    ``predicted_margin`` and the covariates (CUPED: same estimand, a fraction of the
    variance), with a heteroskedasticity-robust 95 % interval. ``uplift_rate`` is that
    effect over the mean predicted margin: the share of a customer's expected margin a
    contact adds, which is what P(churn) x P(retained | contacted) x value if retained
    amounts to, measured directly instead of assumed.

    Returns
    -------
    DataFrame
        ``group``, ``n_treated``, ``n_control``, ``margin_treated``, ``margin_control``,
        ``uplift`` (per customer), ``uplift_rate``, ``ci_low``, ``ci_high`` (of the rate).
    """
    df = frame.reset_index(drop=True)
    groups = [("all", df)]
    if by is not None and by in df:
        groups += [(str(g), part) for g, part in df.groupby(by, observed=True)]
    rows = []
    for name, part in groups:
        t = part["treated"].astype(bool).to_numpy()
        if t.sum() < 30 or (~t).sum() < 30:
            continue
        y = part["future_margin"].to_numpy(dtype=float)
        base = part["predicted_margin"].to_numpy(dtype=float)
        X = np.column_stack([np.ones(len(part)), base]
                            + [part[c].fillna(0).to_numpy(dtype=float) for c in covariates]
                            + [t.astype(float)])
        effect, se = last_coefficient(X, y, clusters=part["customer_id"].to_numpy()
                               if "customer_id" in part else None)
        scale = float(base.mean())
        if not np.isfinite(effect) or scale <= 0:
            continue
        rows.append({"group": name, "n_treated": int(t.sum()), "n_control": int((~t).sum()),
                     "margin_treated": float(y[t].mean()), "margin_control": float(y[~t].mean()),
                     "uplift": effect, "uplift_rate": effect / scale,
                     "ci_low": (effect - 1.96 * se) / scale,
                     "ci_high": (effect + 1.96 * se) / scale})
    return pd.DataFrame(rows)


def retention_targeting(customers: pd.DataFrame, economics: pd.DataFrame, *,
                        params: StrategyParams, retention_rate: pd.Series | float | None = None,
                        uplift_rate: float | None = None, window_days: int = 365,
                        horizon_days: int = 90, eligible: pd.Series | None = None,
                        uplift_per_customer: pd.Series | np.ndarray | None = None,
                        method: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Expected gain of a retention contact per customer, and the most profitable depth.

    Two ways to value a contact, both ``gain = saved share x value if retained - contact
    cost - offer cost``:

    * measured (``uplift_rate`` from :func:`estimate_margin_uplift`): the value at stake
      is the customer's expected margin over the campaign's observed window
      (``predicted_value`` scaled from ``horizon_days`` to ``window_days``, times the
      margin rate) and the saved share is the measured uplift rate;
    * assumed (no campaign data): value if retained = ``retention_value_months`` of the
      run-rate margin (last 12 months' spend x margin rate) and the saved share is
      P(churn) x ``retention_rate``;
    * per customer (``uplift_per_customer``, aligned with ``customers``): each customer's
      own incremental margin over ``window_days`` replaces the rate x value, the value at
      stake being as in the measured case; ``method`` names where it comes from
      (default ``"learned"``; the measured hazard effect of :func:`decide` gives
      ``"measured"``).

    Only ``eligible`` customers (default: all) can be targeted. Customers are ranked by
    gain; the chosen depth maximises the cumulative expected profit (the EMP idea of
    Verbraken et al.: the best point of the profit curve).

    Returns
    -------
    frame : ``customer_id``, ``value_if_retained``, ``retention_gain``, ``rank``,
        ``cumulative_profit``, ``targeted``.
    summary : ``method``, ``campaign_size``, ``campaign_cost``, ``expected_revenue_saved``,
        ``expected_margin_saved``, ``max_expected_profit``, ``roi``.
    """
    return _rank_gains(customers, contact_gains(
        customers, economics, params=params, retention_rate=retention_rate,
        uplift_rate=uplift_rate, window_days=window_days, horizon_days=horizon_days,
        eligible=eligible, uplift_per_customer=uplift_per_customer, method=method),
        params=params)


def _rank_gains(customers: pd.DataFrame, gains: dict, *, params: StrategyParams
                ) -> tuple[pd.DataFrame, dict]:
    """:func:`retention_targeting`'s ranking of the customers by their gains
    (:func:`contact_gains`) and the most profitable depth."""
    value, gain, saved_revenue = gains["value"], gains["gain"], gains["saved_revenue"]
    cost = params.contact_cost + params.offer_cost
    order = np.argsort(-gain, kind="stable")
    cum = np.cumsum(np.where(np.isfinite(gain[order]), gain[order], 0.0))
    depth = best_depth(cum[:int(np.isfinite(gain).sum())])
    rank = np.empty(len(gain), dtype=int)
    rank[order] = np.arange(1, len(gain) + 1)
    cumulative = np.empty(len(gain))
    cumulative[order] = cum
    frame = pd.DataFrame({"customer_id": customers["customer_id"].to_numpy(),
                          "value_if_retained": value,
                          "retention_gain": np.where(np.isfinite(gain), gain, np.nan),
                          "rank": rank, "cumulative_profit": cumulative,
                          "targeted": rank <= depth})
    chosen = frame["targeted"].to_numpy()
    revenue_saved = float(saved_revenue[chosen].sum())
    margin_saved = float((gain + cost)[chosen].sum())
    total_cost = depth * cost
    summary = {"method": gains["method"], "campaign_size": depth, "campaign_cost": total_cost,
               "expected_revenue_saved": revenue_saved,
               "expected_margin_saved": margin_saved,
               "max_expected_profit": float(cum[depth - 1]) if depth else 0.0,
               "roi": (margin_saved - total_cost) / total_cost if total_cost else 0.0}
    return frame, summary


def best_depth(cumulative: np.ndarray) -> int:
    """The most profitable depth of a campaign: the first place (from 1) where the
    running total of the gains, best first, over the customers who can be targeted
    (``cumulative``), is largest; 0 when it is never above zero (no contact pays)."""
    return int(np.argmax(cumulative) + 1) if len(cumulative) and cumulative.max() > 0 else 0


def contact_gains(customers: pd.DataFrame, economics: pd.DataFrame, *,
                  params: StrategyParams, retention_rate: pd.Series | float | None = None,
                  uplift_rate: float | None = None, window_days: int = 365,
                  horizon_days: int = 90, eligible: pd.Series | None = None,
                  uplift_per_customer: pd.Series | np.ndarray | None = None,
                  method: str | None = None) -> dict:
    """Each customer's expected gain of a retention contact, row by row (the valuations
    of :func:`retention_targeting`, which ranks them): ``value`` (the value if
    retained), ``gain`` (-inf where the customer cannot be targeted or the risk is
    unknown), ``saved_revenue`` (the revenue a contact is expected to keep) and
    ``method``."""
    rate_used = economics["margin_rate_used"].to_numpy()
    if uplift_per_customer is not None:
        revenue = (customers["predicted_value"].clip(lower=0) * window_days / horizon_days
                   ).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            saved_share = np.where(revenue * rate_used > 0, np.asarray(
                uplift_per_customer, dtype=float) / (revenue * rate_used), 0.0)
        method = method or "learned"
    elif uplift_rate is not None:
        revenue = (customers["predicted_value"].clip(lower=0) * window_days / horizon_days
                   ).to_numpy()
        saved_share = np.full(len(customers), float(uplift_rate))
        method = "measured"
    else:
        if retention_rate is None:
            retention_rate = params.retention_rate
        revenue = (customers["spend_365d"].clip(lower=0)
                   * params.retention_value_months / 12).to_numpy()
        rr = retention_rate if np.isscalar(retention_rate) else retention_rate.to_numpy()
        saved_share = customers["churn_probability"].to_numpy() * rr
        method = "assumed"
    value = revenue * rate_used
    cost = params.contact_cost + params.offer_cost
    gain = (np.asarray(uplift_per_customer, dtype=float) if uplift_per_customer is not None
            else saved_share * value) - cost
    gain = np.where(np.isnan(gain), -np.inf, gain)    # unknown risk: never targeted
    if eligible is not None:
        gain = np.where(np.asarray(eligible, dtype=bool), gain, -np.inf)
    return {"value": value, "gain": gain, "saved_revenue": saved_share * revenue,
            "method": method}


# --------------------------------------------------------------------------- phase-out


def phaseout_review(customers: pd.DataFrame, economics: pd.DataFrame,
                    history: pd.DataFrame, *, params: StrategyParams) -> pd.DataFrame:
    """Apply the phase-out guardrails; every customer gets the verdict of each one.

    A customer is a candidate only when all hold: unprofitable in the forecast
    (``expected_profit < 0``) *and* in each of the K previous periods; a material
    forecast loss (above ``phaseout_min_loss``); where ``history`` has each customer's
    profit per order (:func:`order_profits`), their orders lose money beyond chance: at
    least two orders, and the upper end of the ``phaseout_confidence`` interval of their
    mean profit per order below zero (a customer whose orders pay for themselves, or
    who has shown too few of them to tell, may be served at lower cost but is not put up
    for phase-out); low potential (not ``potential`` and a non-rising 180-day trend);
    tenure below the threshold unless the expected loss is large; no complaint in the
    last N days.

    Returns
    -------
    DataFrame
        ``customer_id``, ``unprofitable_now``, ``unprofitable_all_periods``,
        ``material_loss``, ``order_loss_sure``, ``low_potential``, ``tenure_ok``,
        ``no_recent_complaint``, ``phaseout_candidate``, ``phaseout_reasons``.
    """
    c = customers.reset_index(drop=True)
    e = economics.reset_index(drop=True)
    k = [f"profit_p{i}" for i in range(1, params.phaseout_periods + 1)]
    h = c[["customer_id"]].merge(history, on="customer_id", how="left")
    h[k] = h[k].fillna(0.0)
    z = stats.norm.ppf(0.5 + params.phaseout_confidence / 2)
    if "order_profit_mean" in h:
        upper = h["order_profit_mean"] + z * h["order_profit_se"]
        order_loss = (h["n_orders_profit"].fillna(0) >= 2) & (upper < 0).fillna(False)
    else:                                   # no orders to judge by (a snapshot)
        upper, order_loss = pd.Series(np.nan, c.index), pd.Series(True, c.index)
    now = e["expected_profit"] < 0
    all_periods = now & (h[k] < 0).all(axis=1)
    loss = -e["expected_profit"]
    # a snapshot has no spending trend (then potential alone decides) and counts tenure
    # in months
    flat = c["trend_180d"] <= 0 if "trend_180d" in c else pd.Series(True, c.index)
    low_potential = ~c["potential"].astype(bool) & flat
    tenure = (c["tenure_days"] if "tenure_days" in c
              else c["tenure_months"] * DAYS_PER_MONTH)
    tenure_ok = (tenure < params.phaseout_max_tenure_days) | (
        loss > params.phaseout_large_loss)
    days = c["days_since_complaint"] if "days_since_complaint" in c else pd.Series(np.nan,
                                                                                   c.index)
    no_complaint = days.isna() | (days > params.phaseout_complaint_days)
    material = loss > params.phaseout_min_loss
    candidate = (all_periods & material & order_loss.to_numpy() & low_potential & tenure_ok
                 & no_complaint)
    mean = h["order_profit_mean"] if "order_profit_mean" in h else pd.Series(np.nan, c.index)

    def cents(v: float) -> float:
        # (a sum taken in another order, by another engine, differs in its last bits,
        # which must not move a cent: rounded to a millionth before it is printed)
        return round(float(v), 6)

    reasons = [
        (f"expected profit {cents(p):,.2f} over the horizon; unprofitable in each of the "
         f"last {params.phaseout_periods} periods "
         f"({', '.join(f'{cents(v):,.2f}' for v in row)}); "
         + (f"{cents(m):,.2f} per order on average, at best {cents(u):,.2f} "
            f"({params.phaseout_confidence:.0%} interval); " if np.isfinite(u) else "")
         + f"predicted value {cents(pv):,.2f}; tenure {t:.0f} days; no complaint in "
         f"{params.phaseout_complaint_days} days") if cand else ""
        for cand, p, row, m, u, pv, t in zip(candidate, e["expected_profit"], h[k].to_numpy(),
                                             mean, upper, c["predicted_value"], tenure,
                                             strict=True)]
    return pd.DataFrame({"customer_id": c["customer_id"], "unprofitable_now": now,
                         "unprofitable_all_periods": all_periods, "material_loss": material,
                         "order_loss_sure": order_loss.to_numpy(),
                         "low_potential": low_potential, "tenure_ok": tenure_ok,
                         "no_recent_complaint": no_complaint,
                         "phaseout_candidate": candidate, "phaseout_reasons": reasons})


def guardrail_effects(review: pd.DataFrame) -> pd.DataFrame:
    """How many customers each guardrail kept off the list, applied in order.

    Returns
    -------
    DataFrame
        ``step``, ``customers_remaining``, ``kept_off``.
    """
    steps, passed = guardrails_passed(review)
    return _guardrail_rows(steps, np.bincount(passed, minlength=len(steps) + 1))


#: The phase-out guardrails in the order they are applied: (what it keeps, the
#: :func:`phaseout_review` column of the customers it keeps).
GUARDRAIL_STEPS = (
    ("unprofitable in the forecast (a single snapshot)", "unprofitable_now"),
    ("... and over time (each previous period, or the lifetime average)",
     "unprofitable_all_periods"),
    ("... and a forecast loss above the minimum", "material_loss"),
    ("... and orders that lose money beyond chance (at least two, the upper end "
     "of the interval of their profit per order below zero)", "order_loss_sure"),
    ("... and low potential", "low_potential"),
    ("... and tenure below the threshold unless the loss is large", "tenure_ok"),
    ("... and no recent complaint", "no_recent_complaint"))


def guardrails_passed(review: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """The guardrail steps ``review`` has (their labels, in order) and, per customer, how
    many of them in a row they pass from the first: a customer is still on the list after
    step k when they passed at least k."""
    steps = [(label, col) for label, col in GUARDRAIL_STEPS if col in review]
    passed = np.zeros(len(review), dtype=np.int64)
    still = np.ones(len(review), dtype=bool)
    for _, col in steps:
        still &= review[col].astype(bool).to_numpy()
        passed += still
    return [label for label, _ in steps], passed


def _guardrail_rows(steps: list[str], counts: np.ndarray) -> pd.DataFrame:
    """:func:`guardrail_effects` from the number of customers who passed exactly k steps
    (``counts[k]``, k = 0 .. len(steps))."""
    rows, previous = [], None
    for k, label in enumerate(steps, start=1):
        n = int(np.asarray(counts)[k:].sum())
        rows.append({"step": label, "customers_remaining": n,
                     "kept_off": 0 if previous is None else previous - n})
        previous = n
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- actions


def assign_actions(decisions: pd.DataFrame, *, policy: list[dict] | None = None
                   ) -> pd.DataFrame:
    """One action per customer from the policy table (first matching row wins).

    ``decisions`` holds the decision columns the policy refers to (``value_tier``,
    ``churn_risk``, ``lifecycle_stage``, ``potential``, ``profitable``,
    ``retention_profitable``, ``phaseout_candidate``).

    Returns
    -------
    DataFrame
        ``customer_id``, ``action``, ``action_reason``.
    """
    policy = policy or DEFAULT_POLICY
    action = pd.Series(pd.NA, index=decisions.index, dtype="object")
    why = pd.Series("", index=decisions.index, dtype="object")
    for row in policy:
        conditions = {k: v for k, v in row.items() if k not in {"action", "why"}}
        mask = action.isna()
        for column, allowed in conditions.items():
            if column not in decisions:
                raise KeyError(f"policy row {row['action']!r} uses unknown column {column!r}")
            mask &= decisions[column].isin(allowed)
        action[mask] = row["action"]
        why[mask] = row.get("why", "")
    return pd.DataFrame({"customer_id": decisions["customer_id"],
                         "action": action.fillna("Maintain"), "action_reason": why})


#: How a policy condition on a yes/no decision column reads (other columns: their name).
CONDITION_WORDS = {
    "phaseout_candidate": "on the phase-out list (every guardrail passed)",
    "retention_profitable": "a retention contact is expected to pay for itself",
    "potential": "growth potential",
    "profitable": "profitable at the current cost to serve",
}


def describe_condition(column: str, allowed: list) -> str:
    """One policy condition in words: ``churn risk high``, ``lifecycle stage lapsed or
    lost``, ``growth potential``, ``not profitable at the current cost to serve``."""
    if all(isinstance(v, (bool, np.bool_)) for v in allowed) and len(allowed) == 1:
        words = CONDITION_WORDS.get(column, column.replace("_", " "))
        return words if allowed[0] else f"not {words}"
    return f"{column.replace('_', ' ')} {' or '.join(map(str, allowed))}"


def policy_table(policy: list[dict] | None = None) -> pd.DataFrame:
    """The policy as a readable table: action, conditions (in words), why."""
    rows = []
    for row in policy or DEFAULT_POLICY:
        cond = " and ".join(describe_condition(k, v) for k, v in row.items()
                            if k not in {"action", "why"}) or "everyone else"
        rows.append({"action": row["action"], "conditions": cond, "why": row.get("why", "")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- warnings


def early_warnings(customers: pd.DataFrame, *, params: StrategyParams,
                   previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """Alerts with the rule that fired, for customers who are not already lost.

    Rules: overdue against the own rhythm; spend drop over the last 90 days against the
    90 before; a complaint in the last 90 days; a low last satisfaction score; a high
    churn probability; and, given the ``previous`` run's ``customer_id`` and
    ``churn_probability``, a churn probability risen sharply since then.

    Returns
    -------
    DataFrame
        ``customer_id``, ``rule``, ``detail``.
    """
    c = customers[customers["lifecycle_stage"] != STAGE_LOST]
    rules = []
    if {"frequency", "recency_vs_gap"} <= set(c.columns):      # order history only
        overdue = (c["frequency"] >= 2) & (c["recency_vs_gap"] >= params.warning_gap_multiple)
        rules.append(("overdue", overdue,
                      lambda r: f"no order for {r.recency_days:.0f} days, "
                                f"{r.recency_vs_gap:.1f} times the usual gap"))
    if {"trend_90d", "spend_90d"} <= set(c.columns):
        # trend = (a - b) / (a + b); spend dropped by x or more  <=>  trend <= -x / (2 - x)
        drop = c["trend_90d"] <= -params.warning_spend_drop / (2 - params.warning_spend_drop)
        drop &= c["spend_90d"] >= 0
        rules.append(("spend drop", drop & (c["lifecycle_stage"] != STAGE_LAPSED),
                      lambda r: f"spend trend {r.trend_90d:+.2f} over the last 90 days"))
    if "complaints_90d" in c:
        rules.append(("new complaint", c["complaints_90d"] > 0,
                      lambda r: f"{r.complaints_90d:.0f} complaint(s) in the last 90 days"))
    if "satisfaction_last" in c:
        rules.append(("low satisfaction", c["satisfaction_last"] <= params.warning_satisfaction,
                      lambda r: f"last satisfaction score {r.satisfaction_last:.0f}"))
    if "churn_probability" in c:
        rules.append(("high churn risk", c["churn_probability"] >= params.warning_churn,
                      lambda r: f"churn probability {r.churn_probability:.0%}"))
    if previous is not None and "churn_probability" in c and "churn_probability" in previous:
        before = c["customer_id"].map(previous.set_index("customer_id")["churn_probability"])
        c = c.assign(churn_before=before)
        rules.append(("churn risk rising",
                      (c["churn_probability"] - before) >= params.warning_churn_rise,
                      lambda r: f"churn probability {r.churn_before:.0%} -> "
                                f"{r.churn_probability:.0%} since the previous run"))
    frames = []
    for name, mask, describe in rules:
        hit = c[mask.fillna(False)]
        frames.append(pd.DataFrame({"customer_id": hit["customer_id"], "rule": name,
                                    "detail": [describe(r) for r in hit.itertuples()]}))
    if not frames:
        return pd.DataFrame(columns=["customer_id", "rule", "detail"])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- fairness


def fairness_audit(actions: pd.DataFrame, attributes: pd.DataFrame, *,
                   protected: tuple[str, ...], params: StrategyParams,
                   min_group: int | None = None) -> pd.DataFrame:
    """Share of each protected group in each action against its share of customers.

    ``ratio`` = the group's rate of receiving the action / the rate of everyone else;
    ``flag`` when the ratio is below ``fairness_ratio`` (the four-fifths rule) or above
    its inverse, *and* a chi-square test of the group against the rest has
    p < ``fairness_p_value`` after Holm's correction over every (attribute, group,
    action) tested: small groups and rare actions vary by chance, and with dozens of
    comparisons some p-values are small by chance alone. Groups with fewer than
    ``min_group`` customers (default ``params.fairness_min_group``) are too small to
    judge: their rows keep the rates but are not tested (``judged`` False, no p-value,
    never flagged) and do not count in the correction.

    Returns
    -------
    DataFrame
        ``attribute``, ``group``, ``action``, ``n_group``, ``share_of_customers``,
        ``share_of_action``, ``rate``, ``rate_others``, ``ratio``, ``judged``,
        ``p_value``, ``p_adjusted`` (Holm), ``flag``.
    """
    df = actions[["customer_id", "action"]].merge(attributes, on="customer_id", how="left")
    counts = {attr: df.groupby(["action", attr], dropna=False, observed=True).size()
              .rename("n").reset_index().rename(columns={attr: "group"})
              for attr in protected if attr in df}
    return _fairness_of_counts(counts, n=len(df), params=params, min_group=min_group)


def _fairness_of_counts(counts: dict[str, pd.DataFrame], *, n: int, params: StrategyParams,
                        min_group: int | None = None) -> pd.DataFrame:
    """:func:`fairness_audit` from the customers per (action, group) of each protected
    attribute (``counts``: attribute -> ``action``, ``group`` (None or NaN where the
    attribute is missing), ``n``) of ``n`` customers, however they were counted."""
    min_group = params.fairness_min_group if min_group is None else min_group
    rows = []
    for attr, long in counts.items():
        action_code, action_names = pd.factorize(long["action"], sort=True)
        group_code, groups = pd.factorize(long["group"].astype("object").fillna("missing"),
                                          sort=True)
        table = np.zeros((len(action_names), len(groups)), dtype=np.int64)
        np.add.at(table, (action_code, group_code), long["n"].to_numpy(dtype=np.int64))
        for i, action in enumerate(action_names):
            n_action = int(table[i].sum())
            for j, group in enumerate(groups):
                n_g = int(table[:, j].sum())
                if n_g == n:
                    continue
                judged = n_g >= min_group
                a = int(table[i, j])
                b = n_action - a
                rate, rate_others = a / n_g, b / (n - n_g)
                ratio = rate / rate_others if rate_others > 0 else np.inf if rate > 0 else 1.0
                two = np.array([[a, n_g - a], [b, n - n_g - b]])
                p = (np.nan if not judged else
                     stats.chi2_contingency(two)[1] if (a + b) > 0 and (n - a - b) > 0
                     else 1.0)
                rows.append({"attribute": attr, "group": group, "action": action,
                             "n_group": n_g, "share_of_customers": n_g / n,
                             "share_of_action": a / max(n_action, 1),
                             "rate": rate, "rate_others": rate_others, "ratio": ratio,
                             "judged": judged, "p_value": p})
    out = pd.DataFrame(rows, columns=["attribute", "group", "action", "n_group",
                                      "share_of_customers", "share_of_action", "rate",
                                      "rate_others", "ratio", "judged", "p_value"])
    out["judged"] = out["judged"].astype(bool)
    out["p_adjusted"] = np.nan
    out.loc[out["judged"], "p_adjusted"] = holm(
        out.loc[out["judged"], "p_value"].to_numpy(dtype=float))
    out["flag"] = (out["judged"]
                   & ((out["ratio"] < params.fairness_ratio)
                      | (out["ratio"] > 1 / params.fairness_ratio))
                   & (out["p_adjusted"] < params.fairness_p_value))
    return out


def fairness_summary(audit: pd.DataFrame, *, min_group: int) -> tuple[pd.DataFrame, str]:
    """What the report shows of a :func:`fairness_audit`: every flagged row, and one
    sentence for the rest (the comparisons judged and not flagged, and the groups too
    small to judge, with ``min_group`` the size they fell short of).

    Returns
    -------
    flagged : DataFrame
        The flagged rows of ``audit`` (same columns).
    sentence : str
        E.g. "16 other comparisons, none flagged; 2 groups too small to judge (fewer
        than 30 customers): gender x (12), age_band 85+ (4)."
    """
    judged = audit["judged"] if "judged" in audit else pd.Series(True, index=audit.index)
    flagged = audit[audit["flag"]]
    n_other = int((judged & ~audit["flag"]).sum())
    small = (audit.loc[~judged, ["attribute", "group", "n_group"]]
             .drop_duplicates(["attribute", "group"]))
    if len(flagged):
        lead = f"{n_other:,} other comparison{'s' if n_other != 1 else ''}, none flagged"
    elif n_other == 0:
        lead = "No comparison could be judged"
    else:
        lead = (f"None of the {n_other:,} comparisons is flagged" if n_other != 1 else
                "The one comparison is not flagged")
    if len(small):
        names = ", ".join(f"{r.attribute} {r.group} ({r.n_group:,})"
                          for r in small.itertuples())
        tail = (f"; {len(small)} group{'s' if len(small) != 1 else ''} too small to judge "
                f"(fewer than {min_group:,} customers): {names}.")
    else:
        tail = f"; every group has at least {min_group:,} customers."
    return flagged, lead + tail


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of ``p_values`` (family-wise error control)."""
    m = len(p_values)
    if m == 0:
        return np.asarray(p_values, dtype=float)
    order = np.argsort(p_values, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * np.asarray(p_values)[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


# --------------------------------------------------------------------------- the strategy step


#: What reads the customers' features at the scoring date (the profile step's table):
#: ``reader(columns, ids=None)``, the columns (all when None) of the customers of
#: ``ids`` (all when None), as :meth:`analysis.store.RunStore.read_profile_table`.
FeatureReader = Callable[..., pd.DataFrame]


@dataclass
class StrategyRun:
    """Everything the strategy step decides (frames, plus the retention summary)."""

    customers: pd.DataFrame | None  # customer_id, economics, action, retention, phase-out
    #                                 (None where Spark's executors wrote them to the store)
    actions: pd.DataFrame        # summary per action
    retention: dict              # campaign size, cost, saved, ROI, max profit
    profit_curve: pd.DataFrame   # depth, cumulative_profit
    retention_effect: pd.DataFrame
    guardrails: pd.DataFrame
    alerts: pd.DataFrame | None    # (None where Spark's executors wrote them to the store)
    fairness: pd.DataFrame
    margin_uplift: pd.DataFrame = field(default_factory=pd.DataFrame)


def decide(con: Connection, customers: pd.DataFrame, *, as_of: dt.date,
           horizon_days: int, params: StrategyParams, campaign: pd.DataFrame | None = None,
           attributes: pd.DataFrame | None = None, protected: tuple[str, ...] = (),
           previous: pd.DataFrame | None = None, value_model=None,
           churn_model=None, exclude_attributes: tuple[str, ...] | None = None,
           features: pd.DataFrame | FeatureReader | None = None) -> StrategyRun:
    """Economics, retention targeting, phase-out review, actions, warnings and audit.

    ``customers`` is the scored customer table (profile + ``churn_probability`` +
    ``predicted_value``). ``campaign`` (customer_id, campaign_date, treated), when
    given, replaces the assumed retention rate by effects measured on it: the share of
    the dropout hazard a contact takes off (:func:`analysis.uplift.estimate_hazard_effect`,
    ``retention["hazard_effect"]``), which values each contact over the value window of
    ``retention_value_months`` by the customer's expected margin and dropout hazard
    (:func:`_hazard_contact_value`); and, for the report, the relative drop in churn per
    value tier and, with ``value_model`` (the run's :class:`analysis.models.ValueModel`),
    the extra margin per contact relative to the expected margin per value tier over the
    longest window enough campaigns completed (:func:`estimate_margin_uplift`,
    :func:`measurement_window`), which values each contact when BG/NBD cannot be fitted.
    ``attributes`` holds the protected attributes, used only by the audit; ``previous``
    the previous run's customers (for the rising-risk warning).

    With two or more campaign dates whose outcome windows (one horizon) have closed,
    each contact may be valued by the customer's own uplift (:func:`_learned_uplift`):
    an :class:`analysis.uplift.UpliftLearner` fitted on those campaigns, shrunk to the
    pooled effect, added to the measured effect's value, and judged out of time on the
    two latest campaigns against the measured effect's ranking and (with
    ``churn_model``, the run's :class:`analysis.models.ChurnModel`) the churn-risk
    ranking; it is used only when it wins, and the judgement is
    ``retention["uplift_model"]``. The learner never sees ``exclude_attributes`` (the
    protected attributes and PII; default ``protected``), and scores the customers on
    ``features``, their features at ``as_of`` with the run's horizon (the profile step's
    table, or a :data:`FeatureReader` of it, which reads only the learner's columns and
    only when the learner is used; built when not given).
    """
    c = customers.reset_index(drop=True)
    econ = customer_economics(c, horizon_days=horizon_days, params=params)
    c = c.assign(potential=growth_potential(c, horizon_days=horizon_days, params=params))
    active = c["lifecycle_stage"].isin(ACTIVE_STAGES)
    valuation = _value_contacts(
        con, campaign, tiers=c[["customer_id", "value_tier"]], as_of=as_of,
        horizon_days=horizon_days, params=params, value_model=value_model,
        bg_fit=lambda: _bgnbd_here(con, as_of=as_of))
    hazard = valuation.hazard
    rfm = (hazard["summary"].reindex(c["customer_id"].astype(str))
           if hazard is not None else None)
    rows = _contact_rows(c, econ, valuation, params=params, horizon_days=horizon_days, rfm=rfm)
    targeting, retention = _rank_gains(c, rows, params=params)
    if valuation.learns:
        # each contact valued by the customer's own uplift, learned on the campaigns
        if hazard is not None:
            valuation.to_window = _to_window(rows["over_horizon"][active.to_numpy()].sum(),
                                             rows["over_window"][active.to_numpy()].sum())
        exclude = protected if exclude_attributes is None else exclude_attributes
        valuation.learn(con, as_of=as_of, horizon_days=horizon_days, params=params,
                        exclude=exclude, value_model=value_model, churn_model=churn_model,
                        depth_share=retention["campaign_size"] / max(int(active.sum()), 1))
        if valuation.learner is not None:
            now = (features(["customer_id", *valuation.learner.columns])
                   if callable(features) else features)
            if now is None:
                now = build_features(con, cutoff=as_of, horizon_days=horizon_days,
                                     labels=False, exclude_attributes=exclude)
            extra = valuation.learner.heterogeneity(now).set_axis(
                now["customer_id"].to_numpy())
            rows = _contact_rows(c, econ, valuation, params=params, horizon_days=horizon_days,
                                 rfm=rfm, heterogeneity=c["customer_id"].map(extra))
            targeting, retention = _rank_gains(c, rows, params=params)
    retention.update(valuation.retention_keys(eligible=int(active.sum()), params=params))
    history = period_profits(con, as_of=as_of, horizon_days=horizon_days,
                             periods=params.phaseout_periods, params=params).merge(
        order_profits(con, as_of=as_of, params=params), on="customer_id", how="outer")
    review = phaseout_review(c, econ, history, params=params)
    decisions = _policy_inputs(c, econ, targeting, review, params=params)
    run = _assemble(c, econ, targeting, retention, review, decisions, params=params,
                    horizon_days=horizon_days, attributes=attributes, protected=protected,
                    previous=previous, effect=valuation.effect, uplift=valuation.uplift)
    if hazard is not None:
        inside = run.customers["in_campaign"].to_numpy()
        run.retention["expected_margin_saved_range"] = _saved_range(
            float(run.customers.loc[inside, "expected_uplift"].sum()),
            float(rows["base"][inside].sum()),
            [float(v[inside].sum()) for v in rows["at_bounds"]])
    return run


#: The columns of the decision table (:func:`decision_table`), as Spark's executors write
#: it (:func:`decide_on_spark`).
DECISIONS_SCHEMA = (
    "customer_id string, margin_rate_used double, expected_revenue double, "
    "expected_orders double, expected_margin double, cost_to_serve double, "
    "expected_profit double, value_if_retained double, retention_gain double, "
    "targeted boolean, phaseout_candidate boolean, phaseout_reasons string, action string, "
    "action_reason string, potential boolean, churn_risk string, alerts string, "
    "in_campaign boolean, action_cost double, expected_uplift double, "
    "ordinary_profit double, incremental_profit double, total_profit double, "
    "decision_period_days long")
#: The alert rules of :func:`early_warnings`, in the order it lists them.
ALERT_RULES = ("overdue", "spend drop", "new complaint", "low satisfaction",
               "high churn risk", "churn risk rising")
#: The profit curve kept from Spark: this many evenly spaced depths over everyone, as
#: many over the depths the report draws, and the chosen depth (a curve of one point per
#: customer of tens of millions is drawn no better than of a thousand).
CURVE_POINTS = 1001


def decide_on_spark(eng: SparkEngine, store: RunStore, *, as_of: dt.date, horizon_days: int,
                    params: StrategyParams, campaign: pd.DataFrame | None = None,
                    attributes: str | Path | None = None, protected: tuple[str, ...] = (),
                    previous: RunStore | None = None, value_model=None, churn_model=None,
                    exclude_attributes: tuple[str, ...] | None = None
                    ) -> tuple[StrategyRun, list[str]]:
    """:func:`decide` on Spark, the customers kept on the executors: the run store's
    customers (:data:`DECISION_COLUMNS`, joined where the steps wrote them,
    :meth:`RunStore.sources`) are valued and decided row by row with the functions
    :func:`decide` uses (:func:`customer_economics`, :func:`growth_potential`,
    :func:`_contact_rows`, :func:`phaseout_review`, :func:`_decision_rows`), and the
    executors write the decision table.

    What needs everyone reaches the driver as a few numbers: the campaign's depth from
    the gains' running totals, best first (ties by id, as on one machine:
    :meth:`SparkEngine.running_sums`), at most about 2,000 points of the profit curve
    (:data:`CURVE_POINTS`), the sums of the campaign and of each action, the customers per
    guardrail passed and per (action, protected group). The alerts come to the driver
    (a list a page shows), and the ids of the campaign. With ``campaign``, what is
    measured on it is measured on the driver as :func:`decide` does (its customers only:
    their value tiers, their snapshots at the campaign dates, the learner's rows), with
    BG/NBD fitted on the driver's customers by place (every customer's RFM summary stays
    on the executors, :func:`analysis.models.summary_kept_on_spark`) and the learner
    applied to each customer's features in the profile step's table where it lies.

    ``attributes``: the cleaned customers' table (the protected attributes); ``previous``:
    the previous run's store (its churn probabilities, for the rising-risk warning).
    Returns the run (``customers`` None: the decisions are in the store) and the
    campaign's ids."""
    from pyspark.sql import functions as fn

    spark = eng.session
    cost = params.contact_cost + params.offer_cost

    def read(path: str | Path, names: dict[str, str]):
        return spark.read.parquet(eng.spark_path(path)).select(
            "customer_id", *[fn.col(f"`{k}`").alias(v) for k, v in names.items()])

    customers = None
    for path, names in store.sources(DECISION_COLUMNS):
        part = read(path, names)
        customers = part if customers is None else customers.join(part, "customer_id", "left")
    columns = store.wanted(DECISION_COLUMNS)
    customers = customers.select(*[fn.col(f"`{c}`") for c in columns])
    eligible = int(customers.where(fn.col("lifecycle_stage").isin(list(ACTIVE_STAGES)))
                   .count())
    held = None
    if previous is not None:
        held = next((read(path, {k: "_previous_churn"}) for path, names in
                     previous.sources(["customer_id", "churn_probability"])
                     for k, v in names.items() if v == "churn_probability"), None)
    with_previous = customers if held is None else customers.join(held, "customer_id", "left")
    has_previous = held is not None      # (the functions the executors run hold no frame)

    kept, summaries = [], []      # what stays on the executors until the step ends
    with contextlib.ExitStack() as stack:
        def bg_fit():
            # (every customer's RFM summary stays on the executors; BG/NBD is fitted on
            # the driver's customers, by place, as on one machine)
            summary, fit = stack.enter_context(summary_kept_on_spark(eng, cutoff=as_of))
            summaries.append(summary)
            return fit_bgnbd(fit), None

        ids = (None if campaign is None or not len(campaign)
               else campaign["customer_id"].astype(str).drop_duplicates())
        valuation = _value_contacts(
            eng, campaign, tiers=(store.read_customers(["customer_id", "value_tier"], ids=ids)
                                  if ids is not None else None),
            as_of=as_of, horizon_days=horizon_days, params=params, value_model=value_model,
            bg_fit=bg_fit)
        valued = customers
        if valuation.hazard is not None:
            valued = valued.join(summaries[0].select(
                "customer_id", *[fn.col(c).alias(f"_s_{c}") for c in RFM_SUMMARY_COLUMNS
                                 if c != "customer_id"]), "customer_id", "left")
        try:
            ranked = _ranked_gains(eng, valued, valuation.for_rows(), params=params,
                                   horizon_days=horizon_days, columns=columns)
            kept.append(ranked)
            depth = _best_depth_on_spark(ranked)
            first = ranked
            if valuation.learns:
                if valuation.hazard is not None:
                    sums = ranked.agg(fn.sum("_oh"), fn.sum("_ow")).first()
                    valuation.to_window = _to_window(sums[0] or 0.0, sums[1] or 0.0)
                exclude = protected if exclude_attributes is None else exclude_attributes
                valuation.learn(eng, as_of=as_of, horizon_days=horizon_days, params=params,
                                exclude=exclude, value_model=value_model,
                                churn_model=churn_model,
                                depth_share=depth / max(eligible, 1))
                if valuation.learner is not None:
                    # each customer's learned uplift, from their features at the scoring
                    # date (the profile step's table, where it lies)
                    needed = list(valuation.learner.columns)
                    features = spark.read.parquet(eng.spark_path(store.profile_table))
                    valued = valued.join(features.select(
                        "customer_id", *[fn.col(f"`{c}`").alias(f"_f_{c}") for c in needed
                                         if c in features.columns]), "customer_id", "left")
                    ranked = _ranked_gains(eng, valued, valuation.for_rows(), params=params,
                                           horizon_days=horizon_days, columns=columns,
                                           learned=needed)
                    kept.append(ranked)
                    depth = _best_depth_on_spark(ranked)
            curve = _curve_on_spark(eng, ranked, depth)
            decided = _decided_on_spark(
                eng, with_previous, ranked, first if valuation.hazard is not None else None,
                as_of=as_of, horizon_days=horizon_days, params=params, depth=depth,
                columns=columns, period_days=int(valuation.retention_keys(
                    eligible=eligible, params=params)["value_window_days"]),
                has_previous=has_previous)
            kept.append(decided)
            summary = _summaries_on_spark(eng, decided, hazard=valuation.hazard is not None)
            fairness = pd.DataFrame()
            if attributes is not None and protected:
                attrs = spark.read.parquet(eng.spark_path(attributes))
                present = [a for a in protected if a in attrs.columns]
                if present:
                    joined = decided.select("customer_id", "action").join(
                        attrs.select("customer_id", *present), "customer_id", "left")
                    counts = {a: eng.collect(joined.groupBy("action", a).count()).rename(
                        columns={a: "group", "count": "n"}) for a in present}
                    fairness = _fairness_of_counts(counts, n=int(joined.count()),
                                                   params=params)

            def warn(batches):
                for part in batches:
                    # (texts as objects: pandas' own strings, concatenated, are chunked
                    # arrays, which Spark's Arrow batches do not take)
                    yield early_warnings(part[columns], params=params,
                                         previous=_previous_of(part, has_previous)
                                         ).astype(object)

            # the warnings written by the executors, in the rules' order, then by id (as
            # the driver's): their order key is the rule's place, two digits, then the id
            rank = (" ".join(f"WHEN '{r}' THEN {k}" for k, r in enumerate(ALERT_RULES))
                    + f" ELSE {len(ALERT_RULES)}")         # (a rule of no list: last)
            warned = with_previous.mapInPandas(
                warn, "customer_id string, rule string, detail string")
            eng.write_parquet(
                warned.withColumn("_order", fn.expr(
                    f"concat(lpad(CAST(CASE rule {rank} END AS STRING), 2, '0'), customer_id)")),
                store.alerts_table, order_by="_order", drop_order=True)
            eng.write_parquet(decided.select(*[f for f in decided.columns
                                               if not f.startswith("_")]),
                              store.decisions_table, order_by="customer_id")
            campaign_ids = eng.collect(decided.where("in_campaign").select("customer_id"))[
                "customer_id"].tolist()
        finally:
            eng.release(*kept)
    retention = {"method": valuation.method(), "campaign_size": depth,
                 "campaign_cost": depth * cost, "expected_revenue_saved": 0.0,
                 "expected_margin_saved": 0.0, "max_expected_profit": 0.0, "roi": 0.0,
                 **valuation.retention_keys(eligible=eligible, params=params)}
    retention = _campaign_summary_of(summary["campaign"], retention, targeted=depth)
    if valuation.hazard is not None:
        retention["expected_margin_saved_range"] = _saved_range(
            summary["now"], summary["base"], summary["at_bounds"])
    run = StrategyRun(customers=None, actions=summary["actions"], retention=retention,
                      profit_curve=curve, retention_effect=valuation.effect,
                      margin_uplift=valuation.uplift,
                      guardrails=_guardrail_rows([label for label, _ in GUARDRAIL_STEPS],
                                                 summary["passed"]),
                      alerts=None, fairness=fairness)
    return run, campaign_ids


def _previous_of(part: pd.DataFrame, has_previous: bool) -> pd.DataFrame | None:
    """The previous run's churn probabilities of a part of the customers (joined as
    ``_previous_churn``), as :func:`early_warnings` takes them; None without a previous
    run."""
    if not has_previous:
        return None
    return part.loc[part["_previous_churn"].notna(), ["customer_id", "_previous_churn"]
                    ].rename(columns={"_previous_churn": "churn_probability"})


def _ranked_gains(eng: SparkEngine, valued, v: _Valuation, *, params: StrategyParams,
                  horizon_days: int, columns: list[str], learned: list[str] | None = None):
    """Each customer of ``valued`` (a Spark DataFrame of the decision columns, with the RFM
    summary as ``_s_*`` under a hazard effect, and the learner's features as ``_f_*``
    when ``learned`` names them) valued by :func:`_contact_rows` where they lie, ranked
    by gain, best first (ties by id), with the gains' running total ``_cum`` and place
    ``_place`` (:meth:`SparkEngine.running_sums`; materialised: release it). Also
    ``_value`` and ``_gain``, and under a hazard effect ``_base``, ``_lo``, ``_hi`` (the
    value at the effect and at both ends of its interval) and ``_oh``, ``_ow`` (the value
    over one horizon and over the window, 0 for customers who cannot be contacted)."""
    from pyspark.sql import functions as fn

    hazard = v.hazard is not None

    def gains(batches):
        for part in batches:
            part = part.reset_index(drop=True)
            c = part[columns]
            econ = customer_economics(c, horizon_days=horizon_days, params=params)
            rfm = None
            if hazard:         # (each customer's RFM summary, as the driver computes it)
                held = part[["customer_id", *[f"_s_{k}" for k in RFM_SUMMARY_COLUMNS[1:]]]]
                held = held[held["_s_frequency"].notna()]
                rfm = summary_of_rows(held.set_axis(list(RFM_SUMMARY_COLUMNS), axis=1)
                                      ).reindex(c["customer_id"].astype(str).to_numpy())
            extra = None
            if learned is not None:
                features = part[[f"_f_{k}" for k in learned if f"_f_{k}" in part]]
                extra = v.learner.heterogeneity(features.set_axis(
                    [k[3:] for k in features.columns], axis=1))
            rows = _contact_rows(c, econ, v, params=params, horizon_days=horizon_days,
                                 rfm=rfm, heterogeneity=extra)
            out = {"customer_id": c["customer_id"], "_value": rows["value"],
                   "_gain": rows["gain"]}
            if hazard:
                active = c["lifecycle_stage"].isin(ACTIVE_STAGES).to_numpy()
                out.update(_base=rows["base"], _lo=rows["at_bounds"][0],
                           _hi=rows["at_bounds"][1],
                           _oh=np.where(active, rows["over_horizon"], 0.0),
                           _ow=np.where(active, rows["over_window"], 0.0))
            yield pd.DataFrame(out)

    schema = "customer_id string, _value double, _gain double" + (
        ", _base double, _lo double, _hi double, _oh double, _ow double" if hazard else "")
    return eng.running_sums(
        valued.mapInPandas(gains, schema), [fn.desc("_gain"), fn.asc("customer_id")],
        {"_cum": fn.when(fn.col("_gain") > float("-inf"), fn.col("_gain")).otherwise(0.0),
         "_place": fn.lit(1).cast("long")})


def _best_depth_on_spark(ranked) -> int:
    """:func:`best_depth` of the running totals of :func:`_ranked_gains`: the first place
    where the total over the customers who can be targeted is largest, 0 when it never
    is above zero."""
    from pyspark.sql import functions as fn

    finite = ranked.where(fn.col("_gain") > float("-inf"))
    best = finite.agg(fn.max("_cum")).first()[0]
    return (int(finite.where(fn.col("_cum") == best).agg(fn.min("_place")).first()[0])
            if best is not None and best > 0 else 0)


def _curve_on_spark(eng: SparkEngine, ranked, depth: int) -> pd.DataFrame:
    """The profit curve (``depth``, ``cumulative_profit``) at evenly spaced depths over
    everyone and over the depths the report's chart shows (up to three times the chosen
    depth, :func:`analysis.plots.plot_profit_curve`), and at the chosen depth."""
    from pyspark.sql import functions as fn

    n = int(ranked.count())
    shown = min(n, max(3 * depth, 50))
    places = np.unique(np.r_[np.linspace(1, n, min(n, CURVE_POINTS)).round(),
                             np.linspace(1, shown, min(shown, CURVE_POINTS)).round(),
                             [depth] if depth else []].astype("int64"))
    return eng.collect(ranked.join(fn.broadcast(eng.session.createDataFrame(
        pd.DataFrame({"_place": places}))), "_place").select(
        fn.col("_place").alias("depth"), fn.col("_cum").alias("cumulative_profit"))
    ).sort_values("depth", ignore_index=True)


def _decided_on_spark(eng: SparkEngine, customers, ranked, first, *, as_of: dt.date,
                      horizon_days: int, params: StrategyParams, depth: int,
                      columns: list[str], period_days: int, has_previous: bool):
    """The decision table (:data:`DECISIONS_SCHEMA`) of ``customers`` (with
    ``_previous_churn`` when ``has_previous``), decided where they lie: their gains and
    places from ``ranked`` (targeted: placed within ``depth``), their profits per period
    and per order (the SQL of :func:`period_profits` and :func:`order_profits`), the
    phase-out review and :func:`_decision_rows`; with ``_passed`` (guardrails passed),
    ``_spend`` (last year's revenue) and, with ``first`` (the ranking under the hazard
    effect), ``_base``, ``_lo``, ``_hi``. Materialised: release it."""
    from pyspark.sql import functions as fn

    history = eng.sql(_period_profits_sql(
        as_of=as_of, horizon_days=horizon_days, periods=params.phaseout_periods,
        params=params)).join(eng.sql(_order_profits_sql(as_of=as_of, params=params)),
                             "customer_id", "full")
    kept = history.columns[1:]
    table = (customers
             .join(ranked.select("customer_id", "_value", "_gain",
                                 (fn.col("_place") <= depth).alias("_targeted")),
                   "customer_id", "left")
             .join(history, "customer_id", "left"))
    bounds = ["_base", "_lo", "_hi"] if first is not None else []
    if bounds:
        table = table.join(first.select("customer_id", *bounds), "customer_id", "left")

    def decide_rows(batches):
        for part in batches:
            part = part.reset_index(drop=True)
            c = part[columns]
            econ = customer_economics(c, horizon_days=horizon_days, params=params)
            c = c.assign(potential=growth_potential(c, horizon_days=horizon_days,
                                                    params=params))
            gain = part["_gain"].to_numpy(dtype=float)
            targeting = pd.DataFrame({
                "customer_id": c["customer_id"], "value_if_retained": part["_value"],
                "retention_gain": np.where(np.isfinite(gain), gain, np.nan),
                "targeted": part["_targeted"].fillna(False).astype(bool)})
            review = phaseout_review(c, econ, part[["customer_id", *kept]], params=params)
            out, _ = _decision_rows(
                c, econ, targeting, review,
                _policy_inputs(c, econ, targeting, review, params=params),
                params=params, horizon_days=horizon_days, period_days=period_days,
                previous=_previous_of(part, has_previous))
            yield out.assign(_passed=guardrails_passed(review)[1],
                             _spend=c["spend_365d"].to_numpy(dtype=float),
                             **{b: part[b].to_numpy(dtype=float) for b in bounds})

    return eng.materialise(table.mapInPandas(
        decide_rows, DECISIONS_SCHEMA + ", _passed long, _spend double"
        + "".join(f", {b} double" for b in bounds)))


def _summaries_on_spark(eng: SparkEngine, decided, *, hazard: bool) -> dict:
    """What :func:`campaign_summary`, :func:`action_summary` and
    :func:`guardrail_effects` need of the decision table ``decided`` (a Spark DataFrame
    with ``_passed`` and ``_spend``; under a hazard effect ``_base``, ``_lo``, ``_hi``,
    whose sums over the campaign give :func:`_saved_range`), summed by the executors; a
    sum with an unknown (null) part is unknown, as :func:`_known_sum` has it."""
    from pyspark.sql import functions as fn

    def known(column):
        column = fn.col(column) if isinstance(column, str) else column
        return fn.when(fn.count(fn.when(column.isNull() | fn.isnan(column), 1)) > 0,
                       fn.lit(float("nan"))).otherwise(fn.sum(column))

    inside = fn.col("in_campaign")
    rate = fn.col("margin_rate_used")
    row = decided.agg(
        fn.sum(inside.cast("long")).alias("size"),
        fn.sum(fn.when(inside, fn.col("action_cost")).otherwise(0.0)).alias("cost"),
        known(fn.when(inside, fn.col("expected_uplift")).otherwise(0.0)).alias("margin"),
        known(fn.when(inside & ~(rate.isNull() | fn.isnan(rate) | (rate == 0)),
                      fn.col("expected_uplift") / rate).otherwise(0.0)).alias("revenue"),
        known(fn.when(inside, fn.col("incremental_profit")).otherwise(0.0)).alias("profit"),
        fn.sum((inside & (fn.col("churn_risk") == RISK_BANDS[0])).cast("long")
               ).alias("high_risk"),
        known("ordinary_profit").alias("ordinary_profit"),
        known("total_profit").alias("total_profit"),
        fn.max("decision_period_days").alias("period_days"),
        fn.sum(fn.when(inside, fn.col("expected_uplift"))).alias("now"),
        *[fn.sum(fn.when(inside, fn.col(b))).alias(b) for b in
          (("_base", "_lo", "_hi") if hazard else ())]).first().asDict()
    sums = {k: (int(v or 0) if k in ("size", "high_risk", "period_days")
                else float(v if v is not None else 0.0)) for k, v in row.items()}
    found = {"now": sums.pop("now"), "base": sums.pop("_base", 0.0),
             "at_bounds": [sums.pop("_lo", 0.0), sums.pop("_hi", 0.0)]}
    per_action = eng.collect(decided.groupBy("action").agg(
        fn.count(fn.lit(1)).alias("customers"), known("_spend").alias("revenue_12m"),
        fn.sum("action_cost").alias("action_cost"),
        known("ordinary_profit").alias("ordinary_profit"),
        known("incremental_profit").alias("incremental_profit"),
        known("total_profit").alias("total_profit"))).set_index("action")
    passed = eng.collect(decided.groupBy("_passed").count())
    counts = np.zeros(len(GUARDRAIL_STEPS) + 1, dtype=np.int64)
    counts[passed["_passed"].to_numpy(dtype=int)] = passed["count"].to_numpy()
    return {"campaign": sums, "actions": _largest_actions_first(per_action),
            "passed": counts, **found}


def strategy_step(config, processed_dir: str | Path, *, as_of: str | None = None,
                  previous_processed_dir: str | Path = "") -> StrategyRun:
    """The strategy step, for either mode: read what the earlier steps wrote (the scored
    customers, the horizon; for an order log also the models and the scoring date; the
    campaign and the protected attributes from the cleaned inputs, when the data has
    them), decide (:func:`decide` for an order log, :func:`decide_snapshot` for a
    snapshot; with ``analysis.engine: spark``, :func:`decide_on_spark`, whose executors
    write the decisions, unless the models explained only a sample of the customers,
    whose listed customers are then explained on the driver), and write the decisions
    (:func:`write_strategy`)."""
    processed_dir = Path(processed_dir)
    store = RunStore(processed_dir)
    clean = processed_dir / "clean"
    if config.mode != "snapshot":
        con = connect_run(processed_dir, config)
        run = None if skipped_reason(processed_dir) else read_model_run(processed_dir,
                                                                         tables=())
        eng = as_engine(con)
        campaign = (pd.read_parquet(clean / "campaign.parquet")
                    if (clean / "campaign.parquet").exists() else None)
        if (isinstance(eng, SparkEngine) and run is not None
                and customers_with_reasons(run.sizes) >= run.sizes["score"]
                and store.profile_table.exists()
                and store.horizon_days() == run.horizon_days):
            # the customers stay on the executors (a run whose listed customers still
            # need reasons, or whose profile has no features at the run's horizon, is
            # decided on the driver, below)
            decisions, campaign_ids = decide_on_spark(
                eng, store, as_of=store.scoring_date()
                or resolve_as_of(con, as_of=as_of or config.analysis.as_of),
                horizon_days=store.horizon_days(), params=config.strategy, campaign=campaign,
                attributes=(clean / "customers.parquet"
                            if (clean / "customers.parquet").exists() else None),
                protected=config.protected,
                previous=RunStore(previous_processed_dir) if previous_processed_dir else None,
                value_model=run.value, churn_model=run.churn,
                exclude_attributes=config.protected + config.pii)
            write_strategy(decisions, processed_dir, campaign_ids=campaign_ids)
            return decisions
    attributes = (read_columns(clean / "customers.parquet", ["customer_id", *config.protected])
                  if (clean / "customers.parquet").exists() else None)
    previous = (RunStore(previous_processed_dir).read_customers(
        ["customer_id", "churn_probability"]) if previous_processed_dir else None)
    if config.mode == "snapshot":
        decisions = decide_snapshot(store.read_customers(), horizon_days=store.horizon_days(),
                                    params=config.strategy, attributes=attributes,
                                    protected=config.protected, previous=previous)
    else:
        exclude = config.protected + config.pii
        # the profile step's features are the scoring features when it used the run's
        # horizon (it always does now; a run from before it may not): read when needed,
        # the columns and customers needed (a large base's table has dozens of columns)
        features = (store.read_profile_table
                    if run is not None and store.horizon_days() == run.horizon_days
                    and store.profile_table.exists() else None)
        decisions = decide(con, store.read_customers(DECISION_COLUMNS),
                           as_of=store.scoring_date()
                           or resolve_as_of(con, as_of=as_of or config.analysis.as_of),
                           horizon_days=store.horizon_days(), params=config.strategy,
                           campaign=campaign, attributes=attributes,
                           protected=config.protected, previous=previous,
                           value_model=run.value if run else None,
                           churn_model=run.churn if run else None,
                           exclude_attributes=exclude, features=features)
        if run is not None and customers_with_reasons(run.sizes) < run.sizes["score"]:
            decisions.customers = _explain_listed(
                con, decisions.customers, store, run, features=features, exclude=exclude)
    write_strategy(decisions, processed_dir)
    return decisions


def needs_reasons(customers: pd.DataFrame) -> pd.Series:
    """True for the customers a person reads about one by one, with why they may leave
    (the churn model's reasons): an action of :data:`ACTIONS_WITH_REASONS`, an early
    warning (``alerts``), or among the :data:`TOP_OF_TABLE` highest churn probabilities
    or predicted values."""
    listed = customers["action"].isin(ACTIONS_WITH_REASONS)
    if "alerts" in customers:
        listed |= customers["alerts"].fillna("").ne("")
    for column in ("churn_probability", "predicted_value"):
        if column in customers:
            listed.loc[customers[column].nlargest(TOP_OF_TABLE).index] = True
    return listed


def needs_value_reasons(customers: pd.DataFrame) -> pd.Series:
    """True for the customers read about for their value (the value model's reasons):
    an action of :data:`ACTIONS_WITH_VALUE_REASONS`, or among the :data:`TOP_OF_TABLE`
    highest predicted values. The lists of the other actions say why a customer may
    leave, not what they are worth."""
    listed = customers["action"].isin(ACTIONS_WITH_VALUE_REASONS)
    if "predicted_value" in customers:
        listed.loc[customers["predicted_value"].nlargest(TOP_OF_TABLE).index] = True
    return listed


def _explain_listed(con: Connection, decided: pd.DataFrame, store: RunStore,
                    run, *, features: pd.DataFrame | FeatureReader | None,
                    exclude: tuple[str, ...]
                    ) -> pd.DataFrame:
    """The decisions with ``reasons`` for every customer who :func:`needs_reasons` and
    ``value_reasons`` for every one who :func:`needs_value_reasons` (exact,
    :func:`analysis.models.explain_customers`), when the models step explained only a
    sample; the sample's reasons are kept. ``features``: the customers' features at the
    scoring date with the run's horizon (built when None)."""
    scored = store.read_customers(["customer_id", "churn_probability", "predicted_value",
                                   "reasons", "value_reasons"])
    both = decided[["customer_id", "action", "alerts"]].merge(scored, on="customer_id",
                                                              how="left")
    if "value_reasons" not in both:
        both["value_reasons"] = pd.Series(pd.NA, index=both.index, dtype=object)
    churn_ids = set(both.loc[needs_reasons(both) & both["reasons"].isna(), "customer_id"])
    value_ids = set(both.loc[needs_value_reasons(both) & both["value_reasons"].isna(),
                             "customer_id"])
    if features is None:
        features = build_features(con, cutoff=dt.date.fromisoformat(run.cutoffs["score"]),
                                  horizon_days=run.horizon_days, labels=False,
                                  exclude_attributes=exclude)
    out = both[["customer_id", "reasons", "value_reasons"]].set_index("customer_id")
    for ids, churn in ((churn_ids, True), (value_ids, False)):
        rows = (features(None, ids=sorted(ids)) if callable(features)
                else features[features["customer_id"].isin(ids)]).reset_index(drop=True)
        found = explain_customers(run, rows, churn=churn, value=not churn).rename(
            columns={"churn_reasons": "reasons"})
        out.update(found.set_index("customer_id"))
    return decided.drop(columns=["reasons", "value_reasons"], errors="ignore").merge(
        out.reset_index(), on="customer_id", how="left")


@dataclass
class _Valuation:
    """How each customer's retention contact is valued, decided on the driver from the
    campaigns (campaign-sized work) or from the assumptions: what :func:`_contact_rows`
    needs to value any customers, all at once or a part at a time."""

    rate: float                         # P(retained | contacted): measured or assumed
    uplift_rate: float | None = None    # the measured margin uplift rate (all customers)
    window: int = 365                   # the window a contact's value is measured over
    hazard: dict | None = None          # the measured hazard effect (_hazard_fit)
    effect: pd.DataFrame = field(default_factory=pd.DataFrame)
    uplift: pd.DataFrame = field(default_factory=pd.DataFrame)
    dates: list = field(default_factory=list)
    campaigns: pd.DataFrame | None = None
    learns: bool = False                # a learner is to be fitted on the campaigns
    to_window: float | None = None      # a contact's one-horizon value to the window's
    learner: object = None              # the learned uplift (UpliftResult) when used
    learner_summary: dict | None = None

    def learn(self, con: Connection, *, as_of: dt.date, horizon_days: int,
              params: StrategyParams, exclude: tuple[str, ...], value_model, churn_model,
              depth_share: float) -> None:
        """Fit and judge the uplift learner (:func:`_fit_learned_uplift`); keep it only
        when it won out of time."""
        pooled = (self.uplift.set_index("group").loc["all"] if self.uplift_rate is not None
                  else None)
        result, summary, to_window = _fit_learned_uplift(
            con, self.campaigns, as_of=as_of, horizon_days=horizon_days,
            contact=self.hazard, pooled=pooled, uplift_rate=self.uplift_rate, params=params,
            exclude=exclude, value_model=value_model, churn_model=churn_model,
            depth_share=depth_share, to_window=self.to_window)
        winner = (summary.get("evaluation") or {}).get("winner")
        if winner not in (None, "model"):
            # judged out of time, the learned ranking lost to a simpler one: it is not
            # used, and the run says so
            result = None
            n_held = len((summary.get("evaluation") or {}).get("held_out_campaigns") or [1])
            summary.update(used=False, why=(
                f"on the {'latest campaign' if n_held == 1 else f'{n_held} latest campaigns'}"
                ", which it never saw, it ranked customers no better than "
                f"{'one effect for everyone' if winner == 'pooled' else 'churn risk'}; "
                "each contact is valued by the effect measured for everyone"))
        self.learner, self.learner_summary = result, summary
        if result is not None:
            self.to_window = to_window

    def method(self) -> str:
        """How a contact is valued: ``learned`` (the learner used), ``measured`` (the
        hazard effect or the margin uplift measured on the campaigns) or ``assumed``."""
        if self.learner is not None:
            return "learned"
        return "measured" if self.hazard is not None or self.uplift_rate is not None \
            else "assumed"

    def for_rows(self) -> _Valuation:
        """What :func:`_contact_rows` needs of the valuation, without the campaigns'
        rows: what Spark sends to each of its tasks."""
        return dataclasses.replace(
            self, effect=pd.DataFrame(), uplift=pd.DataFrame(), campaigns=None,
            hazard=None if self.hazard is None else {
                k: self.hazard[k] for k in ("bg", "effect", "fit", "window_days")},
            learner_summary=None)

    def retention_keys(self, *, eligible: int, params: StrategyParams) -> dict:
        """What the retention summary says of the valuation, in its order."""
        keys = {}
        if self.learns:
            keys["uplift_model"] = self.learner_summary
        if self.hazard is not None:
            keys["hazard_effect"] = self.hazard["fit"]
        keys.update(
            retention_rate_used=float(self.rate), uplift_rate_used=self.uplift_rate,
            value_window_days=self.window if (self.uplift_rate is not None
                                              or self.hazard is not None)
            else int(params.retention_value_months * DAYS_PER_MONTH),
            eligible_customers=eligible,
            effect_campaigns=[d.isoformat() for d in self.dates])
        return keys


def _value_contacts(con: Connection, campaign: pd.DataFrame | None, *,
                    tiers: pd.DataFrame, as_of: dt.date, horizon_days: int,
                    params: StrategyParams, value_model, bg_fit) -> _Valuation:
    """How contacts are valued (:class:`_Valuation`): with a campaign, the effects
    measured on it (the relative drop in churn per value tier, the margin uplift per
    contact with ``value_model``) and the hazard effect (:func:`_hazard_fit`, BG/NBD
    from ``bg_fit``); else the assumed retention rate. ``tiers``: the value tier of (at
    least) the campaign's customers."""
    v = _Valuation(rate=params.retention_rate, campaigns=campaign)
    if campaign is None or not len(campaign):
        return v
    # outcome: a window fully observed after the campaigns measured (as long as the
    # data allows, up to a year: a retention contact pays off over months, not
    # weeks), among the customers active within one horizon before each campaign
    # (those it could keep); several campaigns are pooled (measurement_window)
    window, dates = measurement_window(campaign, as_of=as_of, horizon_days=horizon_days)
    v.window, v.dates = window, dates
    on_dates = pd.to_datetime(campaign["campaign_date"]).dt.date
    measured = campaign[on_dates.isin(dates)].assign(campaign_date=on_dates)
    # each campaign's contacts and controls who may be active at its date, in one
    # pass over the log (only they are measured: the effect compares them)
    at_dates = snapshots_by_cutoff(
        con, cutoffs=dates, horizon_days=window,
        customers=recent_campaign_customers(con, measured, dates=dates,
                                            horizon_days=horizon_days))
    parts = []
    for when, at_campaign in at_dates.items():
        parts.append(at_campaign[at_campaign["recency_days"] <= horizon_days].merge(
            tiers[["customer_id", "value_tier"]], on="customer_id", how="left").assign(
            campaign_date=when))
    del at_dates
    reachable = pd.concat(parts, ignore_index=True)
    v.effect = estimate_retention_effect(
        measured, reachable[["customer_id", "campaign_date", "churned", "value_tier"]],
        by="value_tier")
    if len(v.effect) and "all" in set(v.effect["group"]):
        v.rate = max(float(v.effect.set_index("group").loc["all", "retention_rate"]), 0.0)
    if value_model is not None:
        v.uplift = estimate_margin_uplift(
            _campaign_margins(reachable, measured, value_model, window=window,
                              horizon_days=horizon_days, params=params),
            by="value_tier", covariates=("run_rate_margin",))
        if len(v.uplift) and "all" in set(v.uplift["group"]):
            # the overall estimate is used; per-tier ones are reported (they are noisy)
            v.uplift_rate = max(float(v.uplift.set_index("group").loc["all", "uplift_rate"]),
                                0.0)
    v.hazard = _hazard_fit(con, campaign, as_of=as_of, horizon_days=horizon_days,
                           params=params, bg_fit=bg_fit)
    if v.hazard is not None:
        v.window = v.hazard["window_days"]
    v.learns = ((v.hazard is not None or v.uplift_rate is not None)
                and value_model is not None and campaign["campaign_date"].nunique() >= 2)
    return v


def _bgnbd_here(con: Connection, *, as_of: dt.date) -> tuple:
    """BG/NBD at ``as_of`` (on at most :data:`analysis.uplift.BGNBD_FIT_CUSTOMERS`
    customers) and every customer's RFM summary, on the driver."""
    summary = rfm_summary(con, calibration_end=as_of)
    return fit_bgnbd(summary, max_customers=BGNBD_FIT_CUSTOMERS), summary


def _hazard_fit(con: Connection, campaign: pd.DataFrame, *, as_of: dt.date,
                horizon_days: int, params: StrategyParams, bg_fit) -> dict | None:
    """The hazard effect measured on the campaigns (:func:`analysis.uplift.
    estimate_hazard_effect`, every campaign whose first horizon has closed, each over as
    long a window as the data has, up to the value window of ``retention_value_months``)
    and BG/NBD at ``as_of`` (``bg_fit()``: the model and, on the driver, every customer's
    RFM summary), which give each customer's contact its value (:func:`_contact_rows`).

    Returns None when BG/NBD cannot be fitted or the campaigns have too few rows; else
    ``bg``, ``summary``, ``effect`` (the estimate, at least 0), ``rows``
    (:func:`analysis.uplift.hazard_effect_rows`), ``window_days`` and ``fit`` (the
    estimate, :func:`estimate_hazard_effect`, rounded for the run's JSON, with the
    BG/NBD parameters).
    """
    window = int(params.retention_value_months * DAYS_PER_MONTH)
    rows = hazard_effect_rows(con, campaign, as_of=as_of, horizon_days=horizon_days,
                              window_days=window)
    fit = estimate_hazard_effect(rows) if len(rows) else None
    if fit is None:
        return None
    try:
        bg, summary = bg_fit()
    except ValueError:
        return None
    effect = max(fit["effect"], 0.0)
    fit = {**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in fit.items()},
           "value_window_days": window,
           "hazard_params": {k: round(v, 6) for k, v in bg.params_.items()}}
    return {"bg": bg, "summary": summary, "effect": effect, "rows": rows,
            "window_days": window, "fit": fit}


def _contact_rows(c: pd.DataFrame, econ: pd.DataFrame, v: _Valuation, *,
                  params: StrategyParams, horizon_days: int, rfm: pd.DataFrame | None = None,
                  heterogeneity: pd.Series | None = None) -> dict:
    """Each customer's gain of a contact (:func:`contact_gains`), row by row, as the
    valuation ``v`` has it: with the measured hazard effect, each customer's expected
    extra margin over the value window from their own dropout hazard now (BG/NBD on
    their RFM summary, ``rfm``, aligned with ``c``: :func:`analysis.uplift.contact_value`);
    else the measured margin uplift rate, or the assumed retention rate. With
    ``heterogeneity`` (the learner's departure from the pooled effect over one horizon,
    aligned with ``c``), that value plus the departure carried to the value window.

    Adds ``base`` (the value without the learner, or None), and with the hazard effect
    ``at_bounds`` (the value at both ends of the effect's interval) and ``over_horizon``
    / ``over_window`` (the value over one horizon and over the window, whose sums over the
    active customers give :attr:`_Valuation.to_window`)."""
    active = c["lifecycle_stage"].isin(ACTIVE_STAGES)
    hz = v.hazard
    if hz is not None:
        _, hazard = hz["bg"].rates_if_alive(rfm["frequency"], rfm["recency"], rfm["T"])
        hazard = np.asarray(hazard, dtype=float) / 7.0
        margin = econ["expected_margin"].to_numpy(dtype=float)

        def value_at(effect: float, *, over: int = v.window) -> np.ndarray:
            return contact_value(margin, hazard, effect=max(effect, 0.0),
                                 horizon_days=horizon_days, window_days=over)

        base = value_at(hz["effect"])
        extra = {"base": base,
                 "at_bounds": [value_at(max(hz["fit"]["ci_low"], 0.0)),
                               value_at(hz["fit"]["ci_high"])],
                 "over_horizon": value_at(max(hz["effect"], 1e-3), over=horizon_days),
                 "over_window": value_at(max(hz["effect"], 1e-3))}
        gains = contact_gains(c, econ, params=params, window_days=v.window,
                              horizon_days=horizon_days, eligible=active,
                              uplift_per_customer=base, method="measured")
    else:
        gains = contact_gains(c, econ, params=params, retention_rate=v.rate,
                              uplift_rate=v.uplift_rate, window_days=v.window,
                              horizon_days=horizon_days, eligible=active)
        base = gains["value"] * v.uplift_rate if v.uplift_rate is not None else None
        extra = {"base": base}
    if heterogeneity is not None:
        learned = np.asarray(base, dtype=float) + pd.Series(heterogeneity).fillna(
            0.0).to_numpy(dtype=float) * v.to_window
        gains = contact_gains(c, econ, params=params, uplift_rate=v.uplift_rate,
                              window_days=v.window, horizon_days=horizon_days,
                              eligible=active, uplift_per_customer=learned)
    return {**gains, **extra}


def _to_window(over_horizon: float, over_window: float) -> float:
    """The active customers' extra margin of a contact over the value window over that
    over one horizon (carries the learner's one-horizon departures to the window)."""
    return float(over_window / over_horizon) if over_horizon > 0 else 0.0


def _saved_range(now: float, base: float, at_bounds: list[float]) -> list[float]:
    """The campaign's extra margin at both ends of the hazard effect's 95 % interval
    (not a straight line in the effect: a lowered hazard stretches the remaining
    lifetime): ``now`` (the campaign's expected uplift) with the measured effect's part
    (``base``) replaced by that at each end."""
    return [now - base + s for s in at_bounds]


def _fit_learned_uplift(con: Connection, campaign: pd.DataFrame, *, as_of: dt.date,
                        horizon_days: int, contact: dict | None, pooled: pd.Series | None,
                        uplift_rate: float | None, params: StrategyParams,
                        exclude: tuple[str, ...], value_model, churn_model,
                        depth_share: float, to_window: float | None
                        ) -> tuple[object, dict, float | None]:
    """The uplift learner fitted on the campaigns (:func:`analysis.uplift.learn_uplift`,
    one horizon of outcome) and the out-of-time judgement of its ranking on the latest
    campaigns, on the driver; each customer's value is then (:func:`_contact_rows`) the
    run's own valuation without the learner (the measured hazard effect's
    :func:`analysis.uplift.contact_value`, ``contact``, or the pooled margin uplift rate x
    expected margin) plus the learner's shrunk departure from the pooled effect
    (:meth:`analysis.uplift.UpliftResult.heterogeneity`), which is over one horizon: it is
    carried to the value window by one number, the ratio of the contacts' extra margin
    over the window to that over one horizon (``to_window``: of the measured hazard
    effect, or without one, the pooled uplift over the measurement window over the
    learner's pooled uplift over one horizon). With no identified heterogeneity the
    value is the valuation's exactly; customers the learner cannot score keep it. In the
    judgement the pooled ranking is the same valuation at each held-out campaign over one
    horizon, and the learned one that plus the departure.

    Returns ``(result, summary, to_window)``; the result is None when the learner cannot
    be used or a simpler ranking beat it (then it is not refitted on every campaign).
    """
    hazard_then = None
    if contact is not None:
        rows = contact["rows"]
        hazard_then = pd.Series(rows["hazard"].to_numpy(), index=pd.MultiIndex.from_arrays(
            [rows["customer_id"].astype(str), pd.to_datetime(rows["campaign_date"])]))

    def baselines(rows: pd.DataFrame) -> dict[str, np.ndarray]:
        rate = (rows["margin_rate"].clip(0, 1) if "margin_rate" in rows
                else pd.Series(np.nan, rows.index)).fillna(params.margin_rate)
        margin = np.clip(value_model.predict(prepare_matrix(
            rows, value_model.features_, value_model.categories_)), 0, None) * rate.to_numpy()
        if hazard_then is not None:
            keys = pd.MultiIndex.from_arrays([rows["customer_id"].astype(str),
                                              pd.to_datetime(rows["campaign_date"])])
            out = {"pooled": contact_value(
                margin, hazard_then.reindex(keys).to_numpy(),
                effect=max(contact["fit"]["effect"], 0.0), horizon_days=horizon_days,
                window_days=horizon_days)}
        else:
            out = {"pooled": margin * (uplift_rate or 0.0)}
        if churn_model is not None:
            out["churn"] = churn_model.predict_proba(prepare_matrix(
                rows, churn_model.features_, churn_model.categories_))
        return out

    result = learn_uplift(con, campaign, as_of=as_of, horizon_days=horizon_days,
                          window_days=horizon_days, margin_rate=params.margin_rate,
                          exclude_attributes=exclude, depth_share=depth_share,
                          baselines=baselines, refit_beaten=False)
    if result is None:
        return None, {"used": False, "why": "fewer than two campaigns with a closed "
                      f"{horizon_days}-day outcome window and both arms"}, to_window
    summary = {"used": False, "campaigns": [d.isoformat() for d in result.dates],
               "fit": result.model.summary(), "evaluation": result.evaluation,
               "winner": (result.evaluation or {}).get("winner")}
    if summary["winner"] not in (None, "model"):
        # beaten out of time: not used (the caller says why), so not applied to anyone
        return None, summary, to_window
    if to_window is None:
        per_horizon = result.model.mean_pooled_uplift_
        if not (pooled is not None and per_horizon > 0 and float(pooled["uplift"]) > 0):
            summary["why"] = "no positive pooled effect to scale the learned uplift by"
            return None, summary, to_window
        to_window = float(pooled["uplift"]) / per_horizon
    summary.update(used=True, scale_to_value_window=round(float(to_window), 4))
    return result, summary, to_window


#: Outcome windows a campaign effect is measured over, longest first (days); the
#: horizon is always a candidate.
MEASUREMENT_WINDOWS = (365, 270, 180)
#: The fewest campaigns a window must cover to be preferred to a longer one.
MIN_POOLED_CAMPAIGNS = 3


def measurement_window(campaign: pd.DataFrame, *, as_of: dt.date, horizon_days: int
                       ) -> tuple[int, list[dt.date]]:
    """The outcome window to measure the contact effect over, and the campaigns pooled.

    One campaign: the longest fully observed window after it, up to a year (at least the
    horizon). Several: the longest of :data:`MEASUREMENT_WINDOWS` (and the horizon) that
    is fully observed for at least :data:`MIN_POOLED_CAMPAIGNS` of them, pooling those
    campaigns: a year after one campaign of a few hundred contacts cannot tell a small
    effect from none, a shorter window after several can. When no window covers that
    many, the earliest campaign alone, as for one.
    """
    dates = sorted(set(pd.to_datetime(campaign["campaign_date"]).dt.date))
    for window in (*MEASUREMENT_WINDOWS, horizon_days):
        if window < horizon_days:
            continue
        closed = [d for d in dates if (as_of - d).days >= window]
        if len(closed) >= MIN_POOLED_CAMPAIGNS:
            return window, closed
    first = dates[0]
    return max(min(365, (as_of - first).days), horizon_days), [first]


def _campaign_margins(reachable: pd.DataFrame, campaign: pd.DataFrame, value_model, *,
                      window: int, horizon_days: int, params: StrategyParams) -> pd.DataFrame:
    """Per reachable customer at the campaign date: ``treated``, the margin realised in
    the window after it, the margin the value model expected then, and last year's."""
    keys = [k for k in ("customer_id", "campaign_date") if k in reachable and k in campaign]
    r = reachable.merge(campaign[[*keys, "treated"]], on=keys)
    rate = (r["margin_rate"].clip(0, 1) if "margin_rate" in r
            else pd.Series(np.nan, r.index)).fillna(params.margin_rate)
    X = prepare_matrix(r, value_model.features_, value_model.categories_)
    predicted = np.clip(value_model.predict(X), 0, None) * window / horizon_days
    realised = (r["future_margin"] if "future_margin" in r
                else r["future_spend"] * rate).fillna(0.0)
    return pd.DataFrame({"customer_id": r["customer_id"], "treated": r["treated"],
                         "value_tier": r["value_tier"], "future_margin": realised,
                         "predicted_margin": predicted * rate,
                         "run_rate_margin": r["spend_365d"].clip(lower=0) * rate})


def write_strategy(run: StrategyRun, out_dir, *, campaign_ids: list[str] | None = None
                   ) -> dict:
    """Strategy tables under ``strategy/`` (``customers.parquet`` among them: the
    decisions per customer, the run store's decisions table, unless ``run.customers`` is
    None: Spark's executors wrote it, :func:`decide_on_spark`) and the retention campaign
    as people use it (``campaign.csv``; its customers read from the store, those of
    ``campaign_ids`` when given)."""
    out_dir = Path(out_dir)
    folder = out_dir / "strategy"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("actions", "profit_curve", "retention_effect", "margin_uplift", "guardrails",
                 "alerts", "fairness"):
        frame = getattr(run, name)
        path = folder / f"{name}.parquet"
        if frame is not None:        # (else the executors wrote it: the alerts on Spark)
            frame.to_parquet(path, index=False)
        written[name] = path
    store = RunStore(out_dir)
    written["customers"] = (store.decisions_table if run.customers is None
                            else store.write_decisions(run.customers))
    (folder / "retention.json").write_text(json.dumps(run.retention, indent=2))
    written["campaign"] = write_csv(folder / "campaign.csv", campaign_list(
        store.read_customers(CAMPAIGN_COLUMNS, ids=campaign_ids)))
    return written


#: The columns of ``strategy/campaign.csv``, the retention campaign as people use it.
CAMPAIGN_COLUMNS = ("customer_id", "action", "action_reason", "churn_probability",
                    "reasons", "expected_uplift", "incremental_profit")


def campaign_list(customers: pd.DataFrame) -> pd.DataFrame:
    """The retention campaign: exactly the customers whose action is a retention contact,
    best expected incremental profit first, with why (the policy's reason and, where
    the churn model gave them, the customer's own risk reasons)."""
    rows = customers[customers["action"].str.startswith(RETAIN_PREFIX)]
    columns = [c for c in CAMPAIGN_COLUMNS if c in rows]
    return (rows[columns].sort_values("incremental_profit", ascending=False, kind="stable")
            .reset_index(drop=True))


def phaseout_list(out_dir) -> pd.DataFrame:
    """The customers on the phase-out list of a run (``out_dir``), from its decision
    table (only their rows are read): ``customer_id``, ``expected_profit``,
    ``phaseout_reasons``."""
    return read_columns(RunStore(out_dir).decisions_table,
                        ["customer_id", "expected_profit", "phaseout_reasons"],
                        filters=[("phaseout_candidate", "==", True)])


def read_strategy(out_dir, *, customers: bool = True) -> StrategyRun:
    """Read back what :func:`write_strategy` wrote: the decision table and the alerts too
    when ``customers`` (a row per customer, a row per warning; else they are None, and a
    reader of a large base reads what it needs from the run store, e.g.
    :func:`alert_counts`)."""
    folder = Path(out_dir) / "strategy"
    frames = {name: pd.read_parquet(folder / f"{name}.parquet")
              for name in ("actions", "profit_curve", "retention_effect", "margin_uplift",
                           "guardrails", "fairness",
                           *(["customers", "alerts"] if customers else []))
              if (folder / f"{name}.parquet").exists()}    # (or a folder of part files)
    return StrategyRun(retention=json.loads((folder / "retention.json").read_text()),
                       **{"customers": None, "alerts": None, **frames})


def alert_counts(out_dir) -> dict:
    """A run's early warnings counted where they lie (DuckDB over the table): ``alerts``,
    ``customers`` (with at least one) and ``by_rule`` (rule, alerts; most first, ties in
    the rules' order)."""
    con = duck_connection()
    try:
        con.execute("CREATE TEMP VIEW a AS SELECT * "
                    f"FROM {parquet_scan(RunStore(out_dir).alerts_table, ordered=True)}")
        alerts, customers = con.execute(
            "SELECT count(*), count(DISTINCT customer_id) FROM a").fetchone()
        by_rule = con.execute(
            "SELECT rule, count(*) AS alerts FROM a GROUP BY rule "
            f"ORDER BY alerts DESC, min(({', '.join(SCAN_ORDER)}))").df()
    finally:
        con.close()
    return {"alerts": int(alerts), "customers": int(customers), "by_rule": by_rule}


def read_alerts(out_dir, n: int) -> pd.DataFrame:
    """A run's first ``n`` early warnings (only those are read)."""
    return ds.dataset(RunStore(out_dir).alerts_table, format="parquet").head(n).to_pandas()


def decide_snapshot(customers: pd.DataFrame, *, horizon_days: int, params: StrategyParams,
                    attributes: pd.DataFrame | None = None, protected: tuple[str, ...] = (),
                    previous: pd.DataFrame | None = None) -> StrategyRun:
    """The strategy step for snapshot (subscription) data: same policy, targeting,
    guardrails, warnings and audit as :func:`decide`, on what a snapshot holds.

    Economics: expected revenue over the horizon (``predicted_value``) x margin rate,
    less the account's cost to serve. Potential: not high value, low churn risk (under
    half of ``high_risk``) and at least a year of tenure (an upgrade candidate). The
    phase-out review needs a material forecast loss *and* a lifetime average margin
    (total revenue x margin rate / tenure) below the monthly cost to serve, in place of
    the previous periods an order log would give. Retention contacts are valued with the
    assumed ``retention_rate`` (there is no campaign to measure it on).
    """
    c = customers.reset_index(drop=True)
    years = horizon_days / 365.0
    revenue = c["predicted_value"].clip(lower=0)
    if "revenue_month" not in c or c["revenue_month"].notna().any():
        # (else the revenue is unknown: every money figure stays so)
        revenue = revenue.fillna(0.0)
    active = c["lifecycle_stage"].isin([STAGE_NEW, STAGE_ACTIVE])
    cost = np.where(active, params.cost_per_account_year * years, 0.0)   # gone: no cost
    econ = pd.DataFrame({"customer_id": c["customer_id"], "margin_rate_used": params.margin_rate,
                         "expected_revenue": revenue, "expected_orders": 0.0,
                         "expected_margin": revenue * params.margin_rate,
                         "cost_to_serve": cost,
                         "expected_profit": revenue * params.margin_rate - cost})
    risk = c["churn_probability"]
    tenure_m = c["tenure_months"].fillna(0)
    potential = active & c["value_tier"].isin([TIER_LOW, TIER_MID]) & (
        risk < 0.5 * params.high_risk) & (tenure_m >= 12)
    c = c.assign(potential=potential)
    targeting, retention = retention_targeting(c, econ, params=params,
                                               retention_rate=params.retention_rate,
                                               eligible=active)
    retention.update(retention_rate_used=params.retention_rate, uplift_rate_used=None,
                     value_window_days=int(params.retention_value_months * DAYS_PER_MONTH),
                     eligible_customers=int(active.sum()))
    lifetime_margin = (c["monetary_total"].fillna(0) * params.margin_rate
                       / tenure_m.where(tenure_m > 0))
    monthly_cost = params.cost_per_account_year / 12
    history = pd.DataFrame({"customer_id": c["customer_id"],
                            **{f"profit_p{k}": (lifetime_margin - monthly_cost).fillna(0.0)
                               for k in range(1, params.phaseout_periods + 1)}})
    review = phaseout_review(c, econ, history,
                             params=params)
    review["phaseout_candidate"] &= active.to_numpy()
    decisions = _policy_inputs(c, econ, targeting, review, params=params)
    return _assemble(c, econ, targeting, retention, review, decisions, params=params,
                     horizon_days=horizon_days, attributes=attributes, protected=protected,
                     previous=previous)


def _assemble(c: pd.DataFrame, econ: pd.DataFrame, targeting: pd.DataFrame, retention: dict,
              review: pd.DataFrame, decisions: pd.DataFrame, *, params: StrategyParams,
              horizon_days: int, attributes: pd.DataFrame | None, protected: tuple[str, ...],
              previous: pd.DataFrame | None, effect: pd.DataFrame | None = None,
              uplift: pd.DataFrame | None = None) -> StrategyRun:
    """The shared end of both strategy steps: actions from the policy, the decision table,
    warnings, the summary per action, the profit curve and the fairness audit."""
    out, alerts = _decision_rows(c, econ, targeting, review, decisions, params=params,
                                 horizon_days=horizon_days,
                                 period_days=int(retention["value_window_days"]),
                                 previous=previous)
    retention = campaign_summary(out, retention, targeted=int(targeting["targeted"].sum()))
    curve = targeting.sort_values("rank")[["rank", "cumulative_profit"]].rename(
        columns={"rank": "depth"})
    fairness = (fairness_audit(out, attributes, protected=protected, params=params)
                if attributes is not None and protected else pd.DataFrame())
    return StrategyRun(customers=out, actions=action_summary(out, c),
                       retention=retention, profit_curve=curve,
                       retention_effect=effect if effect is not None else pd.DataFrame(),
                       margin_uplift=uplift if uplift is not None else pd.DataFrame(),
                       guardrails=guardrail_effects(review), alerts=alerts,
                       fairness=fairness)


def _policy_inputs(c: pd.DataFrame, econ: pd.DataFrame, targeting: pd.DataFrame,
                   review: pd.DataFrame, *, params: StrategyParams) -> pd.DataFrame:
    """The columns the action policy reads (:func:`assign_actions`), per customer of
    ``c`` (with its ``potential``)."""
    return pd.DataFrame({
        "customer_id": c["customer_id"], "value_tier": c["value_tier"],
        "churn_risk": churn_risk_band(c["churn_probability"], high_risk=params.high_risk),
        "lifecycle_stage": c["lifecycle_stage"], "potential": c["potential"],
        "profitable": econ["expected_profit"] >= 0,
        "retention_profitable": targeting["targeted"],
        "phaseout_candidate": review["phaseout_candidate"]})


def _decision_rows(c: pd.DataFrame, econ: pd.DataFrame, targeting: pd.DataFrame,
                   review: pd.DataFrame, decisions: pd.DataFrame, *, params: StrategyParams,
                   horizon_days: int, period_days: int, previous: pd.DataFrame | None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The decision table of the customers of ``c`` (:func:`decision_table`: the action
    from the policy, its economics, the campaign and phase-out verdicts, the alerts' rules)
    and their alerts (:func:`early_warnings`): row by row, so a part of the customers
    gives its part of both."""
    actions = assign_actions(decisions, policy=params.policy)
    alerts = early_warnings(c, params=params, previous=previous)
    out = (c[["customer_id"]].merge(econ, on="customer_id")
           .merge(targeting[["customer_id", "value_if_retained", "retention_gain", "targeted"]],
                  on="customer_id")
           .merge(review[["customer_id", "phaseout_candidate", "phaseout_reasons"]],
                  on="customer_id")
           .merge(actions, on="customer_id")
           .assign(potential=decisions["potential"].to_numpy(),
                   churn_risk=decisions["churn_risk"].to_numpy(),
                   alerts=lambda d: d["customer_id"].map(_rules_by_customer(alerts))
                   .fillna("")))
    return decision_table(out, horizon_days=horizon_days, period_days=period_days,
                          params=params), alerts


def _rules_by_customer(alerts: pd.DataFrame) -> pd.Series:
    """Each alerted customer's rules, joined by ``"; "`` in the alerts' order (a
    customer's first rule, then "; " and the next rule for as many as it has: a few
    vectorised joins instead of one Python join per customer)."""
    rank = alerts.groupby("customer_id", sort=False).cumcount()
    wide = alerts.assign(_k=rank.to_numpy()).pivot(index="customer_id", columns="_k",
                                                   values="rule")
    joined = wide[0] if len(wide.columns) else pd.Series(dtype=object)
    for k in wide.columns[1:]:
        joined = joined.where(wide[k].isna(), joined + "; " + wide[k])
    return joined


def decision_table(out: pd.DataFrame, *, horizon_days: int, period_days: int,
                   params: StrategyParams) -> pd.DataFrame:
    """Add what each customer's one action costs and is expected to bring, over one period.

    The period is the retention contact's value window (``period_days``: the window the
    campaign was measured over, or ``retention_value_months``), so that a contact's extra
    profit and everyone's ordinary profit add up. Ordinary profit is the horizon's
    ``expected_profit`` at the same rate over the period. Only retention contacts (the
    actions starting with :data:`RETAIN_PREFIX`) have an estimated effect: their
    ``expected_uplift`` is the extra margin a contact is expected to bring and their
    ``incremental_profit`` that less the contact and offer cost (which can be negative:
    a policy may contact customers whose contact does not pay, such as personal outreach);
    every other action is valued at its ordinary profit and adds nothing.

    Returns
    -------
    DataFrame
        ``out`` with ``in_campaign``, ``action_cost``, ``expected_uplift``,
        ``ordinary_profit``, ``incremental_profit``, ``total_profit``.
    """
    contact = out["action"].str.startswith(RETAIN_PREFIX).to_numpy()
    cost = params.contact_cost + params.offer_cost
    # a contact of unknown risk adds nothing but costs its cost; one of unknown value (a
    # snapshot without revenue) adds an unknown amount
    gain = out["retention_gain"].where(out["retention_gain"].notna()
                                       | out["value_if_retained"].isna(), -cost).to_numpy()
    ordinary = out["expected_profit"].to_numpy() * period_days / horizon_days
    incremental = np.where(contact, gain, 0.0)
    return out.assign(in_campaign=contact, action_cost=np.where(contact, cost, 0.0),
                      expected_uplift=np.where(contact, gain + cost, 0.0),
                      ordinary_profit=ordinary, incremental_profit=incremental,
                      total_profit=ordinary + incremental, decision_period_days=period_days)


def campaign_summary(out: pd.DataFrame, retention: dict, *, targeted: int) -> dict:
    """The retention summary of the campaign the decision table holds (its Retain rows).

    ``targeted`` is the depth the profit curve chose; the campaign is the customers whose
    action is a retention contact: those targeted, less those another action took first
    (phase-out review), plus those a policy row contacts regardless (personal outreach).
    """
    in_campaign = out["in_campaign"].to_numpy()
    # (a sum with an unknown part, where revenue is unknown, is unknown: None in the JSON)
    rate = out.loc[in_campaign, "margin_rate_used"].replace(0, np.nan)
    sums = {"size": int(in_campaign.sum()),
            "cost": float(out.loc[in_campaign, "action_cost"].sum()),
            "margin": float(out.loc[in_campaign, "expected_uplift"].sum(skipna=False)),
            "revenue": float((out.loc[in_campaign, "expected_uplift"] / rate)
                             .where(rate.notna(), 0.0).sum(skipna=False)),
            "profit": float(out.loc[in_campaign, "incremental_profit"].sum(skipna=False)),
            "high_risk": int((out.loc[in_campaign, "churn_risk"] == RISK_BANDS[0]).sum()),
            "period_days": int(out["decision_period_days"].iloc[0]) if len(out) else 0,
            "ordinary_profit": float(out["ordinary_profit"].sum(skipna=False)),
            "total_profit": float(out["total_profit"].sum(skipna=False))}
    return _campaign_summary_of(sums, retention, targeted=targeted)


def _campaign_summary_of(sums: dict, retention: dict, *, targeted: int) -> dict:
    """:func:`campaign_summary` from the decision table's sums (``size``, ``cost``,
    ``margin``, ``revenue``, ``profit``, ``high_risk`` over the campaign's rows;
    ``period_days``; ``ordinary_profit`` and ``total_profit`` over everyone), however
    they were summed."""
    r = dict(retention)
    margin, cost, profit = sums["margin"], sums["cost"], sums["profit"]
    r.update(campaign_size=sums["size"], campaign_cost=cost, expected_margin_saved=margin,
             expected_revenue_saved=sums["revenue"],
             expected_incremental_profit=profit, max_expected_profit=profit,
             roi=(margin - cost) / cost if cost else 0.0,
             targeted_by_profit=targeted,
             campaign_high_risk=sums["high_risk"],
             decision_period_days=sums["period_days"],
             ordinary_profit=sums["ordinary_profit"],
             total_profit=sums["total_profit"])
    return {k: None if isinstance(v, float) and v != v else v for k, v in r.items()}


def _known_sum(values: pd.Series) -> float:
    """The sum, unknown (NaN) when a part is: money of customers whose revenue is unknown
    (a snapshot without revenue) is not counted as 0."""
    return values.sum(skipna=False)


def action_summary(out: pd.DataFrame, customers: pd.DataFrame) -> pd.DataFrame:
    """Per action of the decision table: customers, last year's revenue, the action's cost,
    and the ordinary, incremental and total expected profit over the decision period;
    the rows add up to the run's totals (``retention["total_profit"]``)."""
    spend = customers.set_index("customer_id")["spend_365d"]
    return (out.assign(spend_365d=out["customer_id"].map(spend))
            .groupby("action")
            .agg(customers=("customer_id", "size"), revenue_12m=("spend_365d", _known_sum),
                 action_cost=("action_cost", "sum"),
                 ordinary_profit=("ordinary_profit", _known_sum),
                 incremental_profit=("incremental_profit", _known_sum),
                 total_profit=("total_profit", _known_sum))
            .pipe(_largest_actions_first))


def _largest_actions_first(per_action: pd.DataFrame) -> pd.DataFrame:
    """:func:`action_summary`'s rows (indexed by action), most customers first."""
    return per_action.sort_index().sort_values("customers", ascending=False).reset_index()
