"""Segments the business acts on: RFM, value tiers, behavioural clusters, lifecycle, cohorts.

Every function takes the per-customer feature frame of :mod:`analysis.features` (or the
connection or engine, for cohorts) and returns frames; plots live in :mod:`analysis.plots`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from analysis.config import AnalysisParams, Config
from analysis.engine import SparkEngine, as_engine
from analysis.errors import InsufficientDataError
from analysis.explain import FEATURE_LABELS
from analysis.features import (
    Connection,
    build_features,
    connect_run,
    features_on_spark,
    resolve_as_of,
    resolve_horizon_days,
)
from analysis.store import RunStore

__all__ = [
    "ACTIVE_STAGES",
    "CLUSTER_FEATURES",
    "CustomerProfile",
    "LIFECYCLE_STAGES",
    "RFM_SEGMENTS",
    "STAGE_ACTIVE",
    "STAGE_AT_RISK",
    "STAGE_LAPSED",
    "STAGE_LOST",
    "STAGE_NEW",
    "TIER_HIGH",
    "TIER_LOW",
    "TIER_MID",
    "TIER_UNKNOWN",
    "VALUE_TIERS",
    "WIN_BACK_STAGES",
    "assign_lifecycle",
    "cluster_customers",
    "cohort_matrix",
    "pareto_curve",
    "profile_customers",
    "profile_step",
    "read_profile",
    "rfm_scores",
    "segment_profile",
    "tier_summary_of",
    "lifecycle_counts",
    "lifecycle_thresholds",
    "value_tiers",
    "write_profile",
]

#: Score-to-name map of RFM segments over the recency score R and the mean of the
#: frequency and monetary scores FM (both 1-5, 5 best). Rows are tried in order; the
#: first whose ranges hold names the segment. Every (R, FM) pair is covered. The names
#: describe past recency, frequency and spend, and share no word with the lifecycle
#: stages (:data:`LIFECYCLE_STAGES`) or the churn-risk bands
#: (:data:`analysis.strategy.RISK_BANDS`), so that no two can be confused.
RFM_SEGMENTS = pd.DataFrame(
    [
        ("Champions", 4, 5, 4, 5, "bought recently, buy often and spend the most"),
        ("Loyal", 3, 5, 3, 5, "buy regularly and spend well"),
        ("Potential loyalist", 4, 5, 2, 2, "recent customers with average frequency"),
        ("First-time buyers", 5, 5, 1, 1, "bought very recently, for the first time or nearly"),
        ("Promising", 4, 4, 1, 1, "recent shoppers who have not spent much yet"),
        ("Need attention", 3, 3, 2, 2, "average recency, frequency and spend"),
        ("Faded one-off buyers", 3, 3, 1, 1, "one or few small orders, months ago"),
        ("Former top spenders", 1, 2, 5, 5, "used to buy often and spend most; long gone"),
        ("Former regulars", 1, 2, 3, 4, "spent well and often, but long ago"),
        ("Hibernating", 2, 2, 1, 2, "last bought long ago, few orders, small spend"),
        ("Long-gone light buyers", 1, 1, 1, 2, "lowest recency, frequency and spend"),
    ],
    columns=["segment", "r_min", "r_max", "fm_min", "fm_max", "meaning"],
)

#: Lifecycle stages, from the most engaged to the least.
LIFECYCLE_STAGES = ("new", "active", "at risk", "lapsed", "lost")
STAGE_NEW, STAGE_ACTIVE, STAGE_AT_RISK, STAGE_LAPSED, STAGE_LOST = LIFECYCLE_STAGES
#: Customers active at the cutoff (within their own rhythm's lapse window): the population
#: of churn risk and retention. The others are the win-back population.
ACTIVE_STAGES = (STAGE_NEW, STAGE_ACTIVE, STAGE_AT_RISK)
WIN_BACK_STAGES = (STAGE_LAPSED, STAGE_LOST)

#: Value tiers, highest first.
VALUE_TIERS = ("high", "mid", "low")
TIER_HIGH, TIER_MID, TIER_LOW = VALUE_TIERS
#: The tier of every customer when the data says nothing of what customers bring (a
#: subscription export without a revenue column): not ranked, never "high".
TIER_UNKNOWN = "unknown"

#: The stages of customers still *active* at a cutoff (bought within their own rhythm's
#: lapse window): the population churn risk, its accuracy and retention targeting are
#: about. Lapsed and lost customers are the win-back population.
ACTIVE_STAGES = LIFECYCLE_STAGES[:3]

#: Features the behavioural clusters are built on (log1p-transformed, standardised).
CLUSTER_FEATURES = ("recency_days", "frequency", "monetary_mean_order", "tenure_days",
                    "trend_180d")


def rfm_scores(features: pd.DataFrame) -> pd.DataFrame:
    """RFM quintile scores and named segments.

    Scores are quintiles of the percentile rank; tied customers share the score of the
    lowest rank among them (all one-time buyers get F = 1), and values that agree to 12
    significant digits tie (a sum taken in another order differs in its last bits). ``r_score`` is 5
    for the most recent fifth, ``f_score`` and ``m_score`` 5 for the most frequent and
    highest-spending fifth.

    Returns
    -------
    DataFrame
        ``customer_id``, ``r_score``, ``f_score``, ``m_score``, ``fm_score`` (rounded
        mean of F and M), ``rfm_score`` (e.g. "545"), ``rfm_segment``.
    """
    return pd.DataFrame({
        "customer_id": features["customer_id"].to_numpy(),
        **_rfm_named(_quintile(-features["recency_days"]), _quintile(features["frequency"]),
                     _quintile(features["monetary_total"])),
    })


def _rfm_named(r: pd.Series, f: pd.Series, m: pd.Series) -> dict[str, np.ndarray]:
    """The columns of :func:`rfm_scores` but the id, from the three scores (1-5)."""
    r, f, m = (pd.Series(np.asarray(v, dtype="int64")) for v in (r, f, m))
    fm = np.floor((f + m) / 2 + 0.5).astype(int)
    segment = pd.Series(pd.NA, index=r.index, dtype="object")
    for row in RFM_SEGMENTS.itertuples():
        hit = segment.isna() & r.between(row.r_min, row.r_max) & fm.between(row.fm_min,
                                                                             row.fm_max)
        segment[hit] = row.segment
    return {"r_score": r.to_numpy(), "f_score": f.to_numpy(), "m_score": m.to_numpy(),
            "fm_score": fm.to_numpy(),
            "rfm_score": (r.astype(str) + f.astype(str) + m.astype(str)).to_numpy(),
            "rfm_segment": segment.astype("str").to_numpy()}


def value_tiers(features: pd.DataFrame, *, value_col: str = "monetary_total",
                shares: tuple[float, float] = (0.5, 0.3)) -> pd.DataFrame:
    """High / mid / low value tiers by cumulative share of value (Pareto-style).

    Customers are sorted by value, highest first; ``high`` are those whose preceding
    cumulative share is below ``shares[0]`` (they make the first 50 % of value by
    default), ``mid`` the next ``shares[1]``, ``low`` the rest. Negative values count
    as zero.

    Returns
    -------
    DataFrame
        ``customer_id``, ``value``, ``value_rank`` (1 = highest), ``value_share_before``
        (cumulative share of value of the customers ranked above), ``value_tier``.
    """
    high, mid = shares
    value = features[value_col].clip(lower=0).fillna(0.0)
    # customers whose values agree to 12 significant digits rank by id: a sum taken in
    # another order (another engine, or DuckDB's threads) differs in its last bits, which
    # must not decide who comes first, nor, at a boundary, who is high value
    order = np.lexsort((features["customer_id"].to_numpy(), -_significant(value.to_numpy())))
    sorted_value = value.to_numpy()[order]
    total = sorted_value.sum()
    before = (np.cumsum(sorted_value) - sorted_value) / total if total > 0 else \
        np.zeros(len(order))
    tier = np.where(before < high, TIER_HIGH, np.where(before < high + mid, TIER_MID, TIER_LOW))
    out = pd.DataFrame({
        "customer_id": features["customer_id"].to_numpy()[order],
        "value": sorted_value,
        "value_rank": np.arange(1, len(order) + 1),
        "value_share_before": before,
        "value_tier": tier,
    })
    return out.set_index(np.asarray(features.index)[order]).loc[features.index].reset_index(
        drop=True)


def _significant(x: np.ndarray, digits: int = 12) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits (a double holds about 16)."""
    x = np.asarray(x, dtype=float)
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x)))))
    return np.round(x * scale) / scale


def pareto_curve(values: pd.Series, *, n_points: int = 201) -> pd.DataFrame:
    """Share of customers (highest value first) against the share of value they make.

    Returns
    -------
    DataFrame
        ``customer_share``, ``value_share`` (both 0..1, ``n_points`` rows).
    """
    v = np.sort(values.clip(lower=0).fillna(0.0).to_numpy())[::-1]
    total = v.sum()
    cum = np.concatenate([[0.0], np.cumsum(v) / total if total > 0 else np.zeros(len(v))])
    x, idx = _pareto_points(len(v), n_points)
    return pd.DataFrame({"customer_share": x, "value_share": cum[idx]})


def _pareto_points(n: int, n_points: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """The customer shares of :func:`pareto_curve` and, for each, how many of the ``n``
    customers (highest value first) make it."""
    x = np.linspace(0, 1, n_points)
    return x, np.round(x * n).astype(int)


def assign_lifecycle(features: pd.DataFrame, *, new_days: int = 90,
                     at_risk_multiple: float = 1.5, lapsed_multiple: float = 3.0,
                     lost_multiple: float = 6.0, lost_days: int = 365,
                     population_rhythm: float | None = None) -> pd.DataFrame:
    """Lifecycle stage from recency against the customer's own purchase rhythm.

    The rhythm is the customer's median gap between purchase days; for one-time buyers
    the median over all repeat customers. Stages, first match wins:

    - ``new``: first purchase less than ``new_days`` ago;
    - ``active``: recency up to ``at_risk_multiple`` x rhythm;
    - ``at risk``: up to ``lapsed_multiple`` x rhythm;
    - ``lapsed``: up to ``lost_multiple`` x rhythm and at most ``lost_days``;
    - ``lost``: beyond that.

    ``population_rhythm``: the median over all repeat customers when ``features`` holds
    only some of the customers (a partition of them on Spark), else None.

    Returns
    -------
    DataFrame
        ``customer_id``, ``rhythm_days``, ``recency_vs_rhythm``, ``lifecycle_stage``.
    """
    own = features["gap_median_days"]
    population = (population_rhythm if population_rhythm is not None
                  else own.median() if own.notna().any() else 90.0)
    rhythm = own.fillna(population).clip(lower=1.0)
    ratio = features["recency_days"] / rhythm
    conditions = [
        features["tenure_days"] < new_days,
        ratio <= at_risk_multiple,
        ratio <= lapsed_multiple,
        (ratio <= lost_multiple) & (features["recency_days"] <= lost_days),
    ]
    stage = np.select(conditions, LIFECYCLE_STAGES[:4], default=STAGE_LOST)
    return pd.DataFrame({"customer_id": features["customer_id"].to_numpy(),
                         "rhythm_days": rhythm.to_numpy(),
                         "recency_vs_rhythm": ratio.to_numpy(),
                         "lifecycle_stage": stage})


def lifecycle_thresholds(params: AnalysisParams) -> dict[str, float]:
    """The keyword arguments of :func:`assign_lifecycle` that the configuration sets
    (``analysis.lifecycle_*``), so that every step draws the stages with the same
    thresholds."""
    return {"new_days": params.lifecycle_new_days,
            "at_risk_multiple": params.lifecycle_at_risk_gap_multiple,
            "lapsed_multiple": params.lifecycle_lapsed_gap_multiple}


def cluster_customers(features: pd.DataFrame, *, k: int | None = None, max_k: int = 8,
                      seed: int = 42, sample_size: int = 20_000,
                      columns: list[str] | tuple[str, ...] | None = None
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Behavioural clusters: K-means on log-transformed, standardised features.

    ``k`` is chosen automatically (when not given) as the number of clusters from 2 to
    ``max_k`` with the highest silhouette score on a sample. Each cluster gets a
    generated description comparing its medians with the population's.

    Returns
    -------
    labels : DataFrame
        ``customer_id``, ``cluster`` (int), ``cluster_name``.
    summary : DataFrame
        One row per cluster: ``cluster``, ``cluster_name``, ``description``,
        ``n_customers``, ``share``, the median of each clustering feature, and
        ``silhouette`` (of the chosen k, same on every row) and ``k_scores`` (silhouette
        per k tried, as text).
    """
    cols = [c for c in (columns or CLUSTER_FEATURES) if c in features]
    describe = _describe_cluster if columns is None else _describe_generic
    scaled = StandardScaler().fit_transform(_cluster_input(features[cols]))
    n = len(scaled)
    km, k, scores = _fit_clusters(scaled[_cluster_sample(n, sample_size, seed)], n=n, k=k,
                                  max_k=max_k, seed=seed)
    raw = km.predict(scaled)
    relabel = _by_size(np.bincount(raw, minlength=k))
    cluster = relabel[raw]
    short, summary = _cluster_table(
        features[cols].assign(cluster=cluster).groupby("cluster").median(),
        features[cols].median(), pd.Series(cluster).value_counts(), n=n, k=k, scores=scores,
        describe=describe)
    labels = pd.DataFrame({"customer_id": features["customer_id"].to_numpy(),
                           "cluster": cluster,
                           "cluster_name": pd.Series(cluster).map(short).to_numpy()})
    return labels, summary


def _cluster_input(x: pd.DataFrame) -> np.ndarray:
    """The clustering features, log-transformed (sign kept), missing as zero."""
    x = x.astype(float).fillna(0.0)
    return (np.sign(x) * np.log1p(np.abs(x))).to_numpy()


def _cluster_sample(n: int, sample_size: int, seed: int) -> np.ndarray:
    """Positions (in the customers' order) of the customers the clusters are fitted on,
    in the order drawn (the first 5,000 score the silhouettes)."""
    rng = np.random.default_rng(seed)
    return rng.choice(n, min(n, sample_size), replace=False) if n > sample_size else \
        np.arange(n)


def _fit_clusters(sample: np.ndarray, *, n: int, k: int | None, max_k: int, seed: int
                  ) -> tuple[KMeans, int, dict[int, float]]:
    """K-means fitted on the standardised ``sample`` of ``n`` customers, ``k`` chosen by
    silhouette when None; returns the model, ``k`` and the silhouette of each k tried."""
    scores: dict[int, float] = {}
    if k is None:
        for kk in range(2, max(2, min(max_k, n - 1)) + 1):
            km = KMeans(kk, n_init=4, random_state=seed).fit(sample)
            scored = sample[: min(len(sample), 5_000)]
            scores[kk] = float(silhouette_score(scored, km.predict(scored)))
        k = max(scores, key=lambda kk: (round(scores[kk], 3), -kk))
    return KMeans(k, n_init=8, random_state=seed).fit(sample), k, scores


def _by_size(sizes: np.ndarray) -> np.ndarray:
    """Cluster numbers by size, largest first (``sizes``: of each fitted cluster), so
    that labels are stable and readable: the new number of each fitted cluster."""
    relabel = np.empty(len(sizes), dtype=int)
    relabel[np.argsort(-np.asarray(sizes), kind="stable")] = np.arange(len(sizes))
    return relabel


def _cluster_table(medians: pd.DataFrame, overall: pd.Series, counts: pd.Series, *,
                   n: int, k: int, scores: dict[int, float], describe
                   ) -> tuple[dict[int, str], pd.DataFrame]:
    """The short name of each cluster and :func:`cluster_customers`' summary, from the
    medians of each cluster (indexed by cluster), everyone's and the clusters' sizes."""
    names = {c: describe(medians.loc[c], overall) for c in medians.index}
    short = {c: f"{c + 1}. {names[c][0]}" for c in names}
    summary = medians.add_prefix("median_").reset_index()
    summary.insert(1, "cluster_name", summary["cluster"].map(short))
    summary.insert(2, "description", summary["cluster"].map(lambda c: names[c][1]))
    summary.insert(3, "n_customers", summary["cluster"].map(counts).astype(int))
    summary.insert(4, "share", summary["n_customers"] / n)
    summary["silhouette"] = scores.get(k, np.nan)
    summary["k_scores"] = ", ".join(f"k={kk}: {s:.3f}" for kk, s in scores.items())
    return short, summary


def cohort_matrix(con: Connection, *, cutoff: dt.date,
                  max_months: int = 24) -> pd.DataFrame:
    """Monthly acquisition cohorts: retention and revenue by months since first purchase.

    A customer's cohort is the month of their first purchase; they are *retained* in a
    month when they purchase in it. Only history before ``cutoff``.

    Returns
    -------
    DataFrame
        ``cohort`` (month start), ``months_since`` (0 = first month), ``cohort_size``,
        ``n_active``, ``retention`` (n_active / cohort_size), ``revenue``,
        ``revenue_per_customer``.
    """
    sql = f"""
    WITH p AS (
        SELECT customer_id, order_date, amount FROM lines
        WHERE status = 'completed' AND order_date < DATE '{cutoff.isoformat()}'
    ), first AS (
        SELECT customer_id, DATE_TRUNC('month', MIN(order_date)) AS cohort
        FROM p WHERE amount >= 0 GROUP BY customer_id
    ), sizes AS (SELECT cohort, COUNT(*) AS cohort_size FROM first GROUP BY cohort),
    activity AS (
        SELECT f.cohort,
               DATE_DIFF('month', f.cohort, DATE_TRUNC('month', p.order_date)) AS months_since,
               COUNT(DISTINCT p.customer_id) FILTER (WHERE p.amount >= 0) AS n_active,
               SUM(p.amount) AS revenue
        FROM p JOIN first f USING (customer_id)
        GROUP BY 1, 2
    )
    SELECT a.cohort, a.months_since, s.cohort_size, a.n_active,
           a.n_active / s.cohort_size AS retention, a.revenue,
           a.revenue / s.cohort_size AS revenue_per_customer
    FROM activity a JOIN sizes s USING (cohort)
    WHERE a.months_since <= {int(max_months)}
    ORDER BY a.cohort, a.months_since
    """
    out = as_engine(con).frame(sql)
    out["months_since"] = out["months_since"].astype("int64")
    out["cohort"] = pd.to_datetime(out["cohort"])
    return out


def segment_profile(customers: pd.DataFrame, *, by: str,
                    value_col: str = "monetary_total", min_customers: int = 30
                    ) -> pd.DataFrame:
    """What a marketing team needs to act on each segment.

    Parameters
    ----------
    customers : one row per customer with ``by``, ``value_col`` and, when present,
        ``margin_total``, ``churned`` / ``churn_probability``, ``top_category``,
        ``top_channel``, ``recency_days``, ``frequency``.
    by : the segment column.
    min_customers : segments with fewer customers keep their counts and shares, but
        their averages, medians, rates and main categories are left empty
        (``described`` is False): too few customers to describe.

    Returns
    -------
    DataFrame
        One row per segment, largest value share first: ``segment``, ``n_customers``,
        ``customer_share``, ``value_share``, ``margin_share`` (if margin known),
        ``mean_value``, ``median_recency_days`` and ``median_frequency`` (when the
        customers have them: an order log's), ``churn_rate``
        (observed, when labels are present) or ``mean_churn_probability``,
        ``top_categories`` and ``top_channels`` (the three most common, with shares),
        ``described``.
    """
    df = customers
    # recency and frequency come from an order log; a snapshot has neither, and its
    # segments say nothing about them rather than a made-up value
    orders = {f"median_{col}": (col, "median") for col in ("recency_days", "frequency")
              if col in df}
    agg = df.groupby(by, observed=True).agg(
        n_customers=("customer_id", "size"),
        value=(value_col, lambda s: s.clip(lower=0).sum()),
        mean_value=(value_col, "mean"),
        **orders,
    )
    if "margin_total" in df:
        agg["margin"] = (df.groupby(by, observed=True)["margin_total"]
                         .apply(lambda s: s.clip(lower=0).sum()))
    if "churned" in df:
        agg["churn_rate"] = df.groupby(by, observed=True)["churned"].mean()
    if "churn_probability" in df:
        agg["mean_churn_probability"] = df.groupby(by, observed=True)["churn_probability"].mean()
    for col, name in (("top_category", "top_categories"), ("top_channel", "top_channels")):
        if col in df:
            agg[name] = df.groupby(by, observed=True)[col].apply(
                lambda s: _top_shares(s.value_counts()))
    return _segment_table(
        agg, n=len(df), total_value=df[value_col].clip(lower=0).sum(),
        known=df[value_col].notna().any(),
        total_margin=df["margin_total"].clip(lower=0).sum() if "margin_total" in df else None,
        min_customers=min_customers)


def _segment_table(agg: pd.DataFrame, *, n: int, total_value: float, known: bool,
                   total_margin: float | None, min_customers: int) -> pd.DataFrame:
    """:func:`segment_profile` from its sums per segment (``agg``, indexed by segment:
    ``n_customers``, ``value`` and, with margins, ``margin``, their sums of what is
    positive, and the averages, medians and main categories) and the totals."""
    agg = agg.copy()
    agg["customer_share"] = agg["n_customers"] / n
    # a value nobody's is known of (an export without revenue) has no share, not 0 %
    agg["value_share"] = (agg["value"] / total_value if total_value > 0
                          else 0.0 if known else np.nan)
    if "margin" in agg:
        agg["margin_share"] = agg["margin"] / total_margin if total_margin > 0 else 0.0
    sums = [c for c in agg.columns
            if c in ("n_customers", "value", "mean_value") or c.startswith("median_")]
    shares = [c for c in ("customer_share", "value_share", "margin_share") if c in agg]
    agg = agg[sums + shares + [c for c in agg.columns if c not in sums + shares]]
    out = agg.drop(columns=[c for c in ("value", "margin") if c in agg]).sort_values(
        "value_share", ascending=False)
    out["described"] = out["n_customers"] >= min_customers
    facts = ["n_customers", "customer_share", "value_share", "margin_share", "described"]
    for col in out.columns.difference(facts):
        numeric = pd.api.types.is_numeric_dtype(out[col])
        out[col] = out[col].astype("float64" if numeric else "object")
        out.loc[~out["described"], col] = np.nan if numeric else None
    out.index.name = "segment"
    first = ["n_customers", "customer_share", "value_share"]
    return out[first + [c for c in out.columns if c not in first]].reset_index()


# --------------------------------------------------------------------------- helpers


def _quintile(values: pd.Series) -> pd.Series:
    # values that agree to 12 significant digits tie: a sum taken in another order (on
    # another engine, or by DuckDB's threads in another run) differs in its last bits,
    # which moved two of CDNOW's customers between "Champions" and "Loyal" from one run
    # to the next
    values = pd.Series(_significant(values.to_numpy(dtype=float)), index=values.index)
    pct = values.rank(method="min") / len(values)
    return np.ceil(pct * 5).clip(1, 5).astype(int)


def _top_shares(counts: pd.Series, n: int = 3) -> str:
    """The ``n`` most common values, from their counts, with their shares; equal counts in
    the values' order (so that the same counts give the same text)."""
    counts = counts[counts > 0].sort_index(kind="stable").sort_values(ascending=False,
                                                                     kind="stable")
    shares = (counts / counts.sum()).head(n)
    return ", ".join(f"{k} ({v:.0%})" for k, v in shares.items())


def _describe_cluster(med: pd.Series, overall: pd.Series) -> tuple[str, str]:
    """A short name and a sentence for one cluster from its medians."""

    def rel(col: str) -> float:
        o = overall.get(col, np.nan)
        return float(med[col] / o) if col in med and o and np.isfinite(o) and o != 0 else 1.0

    freq = "Frequent" if rel("frequency") >= 1.5 else ("Occasional" if rel("frequency") >= 0.75
                                                       else "Infrequent")
    # a word only where the group differs from everyone (a typical basket or tenure
    # says nothing, and three "mid-basket" groups could not be told apart)
    basket = ("high-basket" if rel("monetary_mean_order") >= 1.3 else
              "low-basket" if rel("monetary_mean_order") <= 0.75 else "")
    recency = ("recent" if rel("recency_days") <= 0.6 else
               "lapsing" if rel("recency_days") >= 1.6 else "steady")
    tenure = "long-standing" if rel("tenure_days") >= 1.3 else (
        "newer" if rel("tenure_days") <= 0.7 else "established")
    name = ", ".join(w for w in (freq, basket, "" if tenure == "established" else tenure,
                                 recency) if w)
    sentence = (f"{tenure} customers with a median of {med.get('frequency', np.nan):.0f} "
                f"purchase days, {med.get('monetary_mean_order', np.nan):,.0f} per order, "
                f"last purchase {med.get('recency_days', np.nan):.0f} days ago")
    return name, sentence


def _describe_generic(med: pd.Series, overall: pd.Series) -> tuple[str, str]:
    """Name a cluster over arbitrary numeric columns by the two columns whose medians
    differ most from the population's (in units of the population's median)."""
    scale = overall.abs().replace(0, np.nan)
    gap = ((med - overall) / scale).replace([np.inf, -np.inf], np.nan).dropna()
    top = gap.abs().sort_values(ascending=False).index[:2]
    parts = [f"{'higher' if gap[c] > 0 else 'lower'} {FEATURE_LABELS.get(c, c)}"
             for c in top if abs(gap[c]) >= 0.15]
    name = ", ".join(parts).capitalize() if parts else "Typical"
    sentence = "; ".join(f"median {FEATURE_LABELS.get(c, c)} {med[c]:,.1f} "
                         f"(all customers: {overall[c]:,.1f})" for c in med.index
                         if pd.notna(med[c]) and pd.notna(overall[c]))
    return name, sentence


# --------------------------------------------------------------------------- the profile step


@dataclass(frozen=True)
class CustomerProfile:
    """Everything the profile step computes for one scoring date.

    Attributes
    ----------
    as_of : the scoring date (history is every record before it).
    customers : one row per customer: the features of :func:`analysis.features.
        build_features` plus ``segment`` (RFM), ``rfm_score``, ``value_tier``,
        ``lifecycle_stage``, ``rhythm_days``, ``cluster``, ``cluster_name``; None when
        it was left unread, or written by Spark's executors.
    segments, tiers, lifecycle, clusters, cohorts, pareto : summary frames.
    """

    as_of: dt.date
    customers: pd.DataFrame | None
    segments: pd.DataFrame
    tiers: pd.DataFrame
    lifecycle: pd.DataFrame
    clusters: pd.DataFrame
    cohorts: pd.DataFrame
    pareto: pd.DataFrame
    horizon_days: int | None = None

    @property
    def n_customers(self) -> int:
        """How many customers were profiled (every one has a lifecycle stage)."""
        return int(self.lifecycle["n_customers"].sum())

    def summary(self) -> dict:
        """Headline counts, JSON-friendly (from the summary frames: the customer table
        may be on Spark's executors, or left unread)."""
        return {
            "as_of": self.as_of.isoformat(),
            "customers": self.n_customers,
            "segments": int(len(self.segments)),
            "clusters": int(len(self.clusters)),
            "silhouette": float(self.clusters["silhouette"].iloc[0]),
            "tiers": {r.value_tier: int(r.n_customers) for r in self.tiers.itertuples()},
            "lifecycle": {r.lifecycle_stage: int(r.n_customers)
                          for r in self.lifecycle.itertuples()},
            **({} if self.horizon_days is None else {"horizon_days": int(self.horizon_days)}),
        }


def profile_customers(con: Connection, *, as_of: dt.date,
                      params: AnalysisParams, seed: int = 42,
                      exclude_attributes: tuple[str, ...] = (),
                      horizon_days: int | None = None,
                      table: str | Path | None = None) -> CustomerProfile:
    """Features at ``as_of`` and every segmentation of them.

    Value tiers are by ``monetary_total`` (history before ``as_of``) and the shares in
    ``params.tier_shares``; lifecycle thresholds come from ``params``. With the run's
    ``horizon_days`` the features are exactly those the models score the customers on
    (:func:`analysis.features.build_features` with that horizon, no labels), so the
    models step reads them rather than building them again.

    **On Spark** (``con`` a Spark engine) the executors build, segment and write the
    customer table to ``table`` (:meth:`analysis.store.RunStore.profile_table`), and
    the profile's ``customers`` is None: the driver receives the summaries, the numbers
    they are drawn with and the clustering sample (:func:`_profile_on_spark`).
    """
    eng = as_engine(con)
    if isinstance(eng, SparkEngine):
        if table is None:
            raise ValueError("on Spark the profile's customer table is written by the "
                             "executors: name its path (table=)")
        with features_on_spark(eng, cutoff=as_of, horizon_days=horizon_days, labels=False,
                               exclude_attributes=exclude_attributes) as feats:
            n = feats.count()
            _check_enough(n, as_of, params)
            return _profile_on_spark(eng, feats, n, as_of=as_of, params=params, seed=seed,
                                     horizon_days=horizon_days, table=table)
    feats = build_features(con, cutoff=as_of, horizon_days=horizon_days, labels=False,
                           exclude_attributes=exclude_attributes)
    _check_enough(len(feats), as_of, params)
    rfm = rfm_scores(feats)
    tiers = value_tiers(feats, shares=params.tier_shares)
    life = assign_lifecycle(feats, **lifecycle_thresholds(params))
    labels, clusters = cluster_customers(feats, max_k=params.max_clusters, seed=seed)
    customers = (feats
                 .merge(rfm.rename(columns={"rfm_segment": "segment"}), on="customer_id")
                 .merge(tiers[["customer_id", "value_rank", "value_tier"]], on="customer_id")
                 .merge(life, on="customer_id")
                 .merge(labels, on="customer_id"))
    first = ["customer_id", "segment", "value_tier", "lifecycle_stage", "cluster_name"]
    customers = customers[first + [c for c in customers.columns if c not in first]]
    tier_summary = tier_summary_of(customers)
    lifecycle = lifecycle_counts(customers)
    return CustomerProfile(
        as_of=as_of, customers=customers, horizon_days=horizon_days,
        segments=segment_profile(customers, by="segment",
                                 min_customers=params.min_segment_customers),
        tiers=tier_summary, lifecycle=lifecycle, clusters=clusters,
        cohorts=cohort_matrix(con, cutoff=as_of),
        pareto=pareto_curve(customers["monetary_total"]),
    )


def _check_enough(n: int, as_of: dt.date, params: AnalysisParams) -> None:
    if n < params.min_customers:
        raise InsufficientDataError(
            f"{n:,} customer(s) with a purchase before {as_of}: a customer strategy "
            f"needs at least {params.min_customers} (analysis.min_customers); segments, "
            f"tiers and models over fewer would mislead")


def _profile_on_spark(eng: SparkEngine, feats: Any, n: int, *, as_of: dt.date,
                      params: AnalysisParams, seed: int, horizon_days: int | None,
                      table: str | Path) -> CustomerProfile:
    """:func:`profile_customers` of the ``n`` customers of ``feats`` (a Spark DataFrame
    of their features) on Spark's executors, with this module's functions, and the
    customer table written there (``table``).

    What a segmentation needs of all customers comes to the driver as a few numbers:
    each score's quintile bounds as ranks (counts per value, summed in order by
    :meth:`analysis.engine.SparkEngine.running_sums`), the population's purchase rhythm
    (its median), the value tiers' running shares, the clustering features' means and
    spreads and the 20,000 customers the driver's own draw picks for the K-means fit
    (:func:`_cluster_sample`). Each partition is then segmented row by row (``mapInPandas``: the
    RFM names, :func:`assign_lifecycle`, the clusters' nearest centres), and the
    summaries are sums, medians and counts per group. The same table and summaries as on
    one machine, but for sums of doubles taken in another order (their last bits).
    """
    from pyspark.sql import functions as fn

    kept: list[Any] = []       # (what the executors keep: freed at the end)
    try:
        # RFM: each score's rank, the lowest of its ties, from counts per (rounded) value
        significant = _significant_udf()
        keys = {"r_score": -fn.col("recency_days"), "f_score": fn.col("frequency"),
                "m_score": fn.col("monetary_total")}
        missing = feats.where("recency_days IS NULL OR frequency IS NULL OR "
                              "monetary_total IS NULL OR isnan(monetary_total)").count()
        if missing:       # (as pandas' scores stop: build_features gives none)
            raise ValueError(f"{missing:,} customer(s) without a recency, frequency or "
                             "spend: no RFM score")
        # (on a narrow table of the ids and the three values, joined to the customers once)
        scores = eng.materialise(feats.select(
            "customer_id", *[significant(expr.cast("double")).alias(f"_key_{score}")
                             for score, expr in keys.items()]))
        kept.append(scores)
        for score in keys:
            key = f"_key_{score}"
            counts = scores.groupBy(key).agg(fn.count(fn.lit(1)).alias("_n"))
            running = eng.running_sums(counts, [fn.col(key).asc()],
                                       {"_upto": fn.col("_n")})
            kept.append(running)
            rank = fn.col("_upto") - fn.col("_n") + 1
            quintile = fn.least(fn.greatest(fn.ceil(rank / fn.lit(n) * 5), fn.lit(1)),
                                fn.lit(5)).cast("bigint")
            scores = scores.join(running.select(key, quintile.alias(score)), on=key,
                                 how="left").drop(key)
        rows = eng.materialise(feats.join(scores, on="customer_id"))
        kept.append(rows)
        # the rest of a customer's segments, row by row, with the population's rhythm
        gaps = feats.where(fn.col("gap_median_days").isNotNull())
        rhythm = gaps.agg(fn.percentile("gap_median_days", 0.5)).first()[0]
        cols = [c for c in CLUSTER_FEATURES if c in feats.columns]
        thresholds = lifecycle_thresholds(params)

        def segment(batches):
            for frame in batches:
                named = _rfm_named(frame["r_score"], frame["f_score"], frame["m_score"])
                life = assign_lifecycle(
                    frame, **thresholds,
                    population_rhythm=90.0 if rhythm is None else float(rhythm))
                value = frame["monetary_total"].clip(lower=0).fillna(0.0).to_numpy()
                out = frame.assign(
                    fm_score=named["fm_score"], rfm_score=named["rfm_score"],
                    segment=named["rfm_segment"], rhythm_days=life["rhythm_days"].to_numpy(),
                    recency_vs_rhythm=life["recency_vs_rhythm"].to_numpy(),
                    lifecycle_stage=life["lifecycle_stage"].to_numpy(),
                    _value=value, _value_key=_significant(value))
                inputs = _cluster_input(frame[cols])
                yield out.assign(**{f"_x{i}": inputs[:, i] for i in range(len(cols))})

        added = ("fm_score bigint, rfm_score string, segment string, rhythm_days double, "
                 "recency_vs_rhythm double, lifecycle_stage string, _value double, "
                 "_value_key double, " + ", ".join(f"_x{i} double" for i in range(len(cols))))
        rows = rows.mapInPandas(segment, _schema_with(rows, added))
        # value tiers: the share of value of the customers ranked above each
        rows = eng.running_sums(rows, [fn.col("_value_key").desc(), fn.col("customer_id")],
                                {"_upto": fn.col("_value"), "value_rank": fn.lit(1)})
        kept.append(rows)
        total = rows.agg(fn.sum("_value")).first()[0] or 0.0
        high, mid = params.tier_shares
        before = ((fn.col("_upto") - fn.col("_value")) / fn.lit(total) if total > 0
                  else fn.lit(0.0))
        rows = rows.withColumn("value_tier", fn.when(before < high, TIER_HIGH)
                               .when(before < high + mid, TIER_MID).otherwise(TIER_LOW))
        x, idx = _pareto_points(n)
        reached = dict(eng.collect(rows.where(fn.col("value_rank").isin(
            sorted({int(i) for i in idx if i > 0}))).select("value_rank", "_upto"))
            .itertuples(index=False, name=None))
        pareto = pd.DataFrame({"customer_share": x, "value_share": [
            reached[i] / total if i > 0 and total > 0 else 0.0 for i in idx]})
        # clusters: fitted on the driver's sample, each customer given its nearest
        customers, clusters = _clusters_on_spark(
            eng, rows, n, cols=cols, seed=seed, max_k=params.max_clusters, kept=kept)
        first = ["customer_id", "segment", "value_tier", "lifecycle_stage", "cluster_name"]
        rest = [c for c in feats.columns if c not in first] + [
            "r_score", "f_score", "m_score", "fm_score", "rfm_score", "value_rank",
            "rhythm_days", "recency_vs_rhythm", "cluster"]
        customers = customers.select(*[fn.col(f"`{c}`") for c in first + rest])
        eng.write_parquet(customers, table, order_by="customer_id")
        written = eng.session.read.parquet(eng.spark_path(table))
        return CustomerProfile(
            as_of=as_of, customers=None, horizon_days=horizon_days,
            segments=_segments_on_spark(eng, written, n, params=params),
            tiers=_tier_table(eng.collect(written.groupBy("value_tier").agg(
                fn.count(fn.lit(1)).alias("n_customers"),
                fn.coalesce(fn.sum(fn.greatest("monetary_total", fn.lit(0.0))),
                            fn.lit(0.0)).alias("value"),
                fn.min("monetary_total").alias("min_value"))).set_index("value_tier"), n=n),
            lifecycle=_lifecycle_table(eng.collect(written.groupBy("lifecycle_stage").count())
                                       .set_index("lifecycle_stage")["count"], n=n),
            clusters=clusters, cohorts=cohort_matrix(eng, cutoff=as_of), pareto=pareto)
    finally:
        eng.release(*kept)


def _clusters_on_spark(eng: SparkEngine, rows: Any, n: int, *, cols: list[str], seed: int,
                       max_k: int, kept: list[Any], sample_size: int = 20_000
                       ) -> tuple[Any, pd.DataFrame]:
    """:func:`cluster_customers` for the customers of ``rows`` (with their clustering
    inputs ``_x0``...): standardised by everyone's means and spreads, fitted on the
    sample the driver draws (the same customers: positions in id order), each customer
    given the nearest centre on the executors, the clusters numbered by size. Returns
    ``rows`` with ``cluster`` and ``cluster_name`` (without the inputs), and the
    clusters' summary."""
    from pyspark.sql import functions as fn

    inputs = [f"_x{i}" for i in range(len(cols))]
    moments = rows.agg(*[fn.avg(c) for c in inputs], *[fn.var_pop(c) for c in inputs]).first()
    mean = np.array(moments[: len(cols)], dtype=float)
    spread = np.sqrt(np.array(moments[len(cols):], dtype=float))
    # (a constant input is left unscaled, as StandardScaler leaves one)
    spread = np.where(spread < 10 * np.finfo(float).eps, 1.0, spread)
    drawn = _cluster_sample(n, sample_size, seed)
    sample = eng.rows_at(rows, "customer_id", drawn, inputs).to_numpy(dtype=float)
    km, k, scores = _fit_clusters((sample - mean) / spread, n=n, k=None, max_k=max_k,
                                  seed=seed)

    def nearest(batches):
        for frame in batches:
            yield frame.assign(_cluster=km.predict(
                (frame[inputs].to_numpy(dtype=float) - mean) / spread).astype("int64"))

    assigned = eng.materialise(
        rows.mapInPandas(nearest, _schema_with(rows, "_cluster bigint")).drop(*inputs))
    kept.append(assigned)
    sizes = eng.collect(assigned.groupBy("_cluster").count()).set_index("_cluster")["count"]
    relabel = _by_size(sizes.reindex(range(k), fill_value=0).to_numpy())
    numbers = eng.session.createDataFrame(pd.DataFrame({
        "_cluster": np.arange(k, dtype="int64"), "cluster": relabel.astype("int64")}))
    numbered = assigned.join(fn.broadcast(numbers), on="_cluster")
    medians = eng.collect(numbered.groupBy("cluster").agg(
        *[fn.percentile(c, 0.5).alias(c) for c in cols])).set_index("cluster").sort_index()
    overall = pd.Series(eng.collect(numbered.agg(
        *[fn.percentile(c, 0.5).alias(c) for c in cols])).iloc[0], dtype=float)
    counts = pd.Series(sizes.to_numpy(), index=relabel[sizes.index.to_numpy()])
    short, summary = _cluster_table(medians.astype(float), overall, counts, n=n, k=k,
                                    scores=scores, describe=_describe_cluster)
    names = eng.session.createDataFrame(pd.DataFrame({   # (a cluster left empty has none)
        "cluster": np.array(list(short), dtype="int64"), "cluster_name": list(short.values())}))
    return numbered.drop("_cluster").join(fn.broadcast(names), on="cluster"), summary


def _segments_on_spark(eng: SparkEngine, customers: Any, n: int, *,
                       params: AnalysisParams, value_col: str = "monetary_total"
                       ) -> pd.DataFrame:
    """:func:`segment_profile` by ``segment`` of the customers of a Spark DataFrame: its
    sums, averages and medians per segment on the executors, the main categories from
    the counts per segment and category."""
    from pyspark.sql import functions as fn

    columns = set(customers.columns)
    positive = fn.greatest(fn.col(value_col), fn.lit(0.0))
    aggs = [fn.count(fn.lit(1)).alias("n_customers"),
            fn.coalesce(fn.sum(positive), fn.lit(0.0)).alias("value"),
            fn.avg(value_col).alias("mean_value"),
            *[fn.percentile(c, 0.5).alias(f"median_{c}") for c in ("recency_days", "frequency")
              if c in columns]]
    if "margin_total" in columns:
        aggs.append(fn.coalesce(fn.sum(fn.greatest("margin_total", fn.lit(0.0))),
                                fn.lit(0.0)).alias("margin"))
    agg = eng.collect(customers.groupBy("segment").agg(*aggs)).set_index("segment")
    agg = agg.sort_index()                     # (pandas groups in the segments' order)
    for col, name in (("top_category", "top_categories"), ("top_channel", "top_channels")):
        if col in columns:
            counts = eng.collect(customers.where(fn.col(col).isNotNull())
                                 .groupBy("segment", col).count())
            # (a segment without any: "", as pandas' empty counts give)
            agg[name] = pd.Series({seg: _top_shares(part.set_index(col)["count"])
                                   for seg, part in counts.groupby("segment")},
                                  dtype=object).reindex(agg.index, fill_value="")
    totals = customers.agg(fn.coalesce(fn.sum(positive), fn.lit(0.0)),
                           fn.count(value_col),
                           *([fn.coalesce(fn.sum(fn.greatest("margin_total", fn.lit(0.0))),
                                          fn.lit(0.0))] if "margin_total" in columns
                             else [])).first()
    return _segment_table(agg, n=n, total_value=float(totals[0]), known=totals[1] > 0,
                          total_margin=float(totals[2]) if "margin_total" in columns
                          else None, min_customers=params.min_segment_customers)


def _significant_udf() -> Any:
    """:func:`_significant` as a Spark function of a column of doubles."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("double")
    def significant(values: pd.Series) -> pd.Series:
        return pd.Series(_significant(values.to_numpy(dtype=float)), index=values.index)

    return significant


def _schema_with(df: Any, added: str) -> Any:
    """``df``'s schema and the fields ``added`` (a DDL string), for ``mapInPandas``."""
    from pyspark.sql.types import StructType

    return StructType(df.schema.fields + StructType.fromDDL(added).fields)


def profile_step(config: Config, processed_dir: str | Path, *, as_of: str | None = None
                 ) -> CustomerProfile:
    """The profile step of an order-log run: resolve the scoring date (``as_of``, else the
    config's, else the day after the last order) and the horizon
    (:func:`analysis.features.resolve_horizon_days`) once, profile every customer at that
    date from the cleaned inputs (:func:`profile_customers`, protected and personal
    attributes left out) and write the profile (:func:`write_profile`), which records
    both for every later step."""
    a = config.analysis
    con = connect_run(processed_dir, config)
    scoring_date = resolve_as_of(con, as_of=as_of or a.as_of)
    horizon = resolve_horizon_days(con, horizon_days=a.horizon_days, cutoff=scoring_date,
                                   step_days=a.cutoff_step_days)
    profile = profile_customers(con, as_of=scoring_date, params=a, seed=config.seed,
                                exclude_attributes=config.protected + config.pii,
                                horizon_days=horizon,
                                table=RunStore(processed_dir).profile_table)
    write_profile(profile, processed_dir)
    return profile


def tier_summary_of(customers: pd.DataFrame, *, value_col: str = "monetary_total"
                    ) -> pd.DataFrame:
    """Customers, value and shares per value tier (high, mid, low)."""
    return _tier_table(customers.groupby("value_tier")
                       .agg(n_customers=("customer_id", "size"),
                            value=(value_col, lambda s: s.clip(lower=0).sum()),
                            min_value=(value_col, "min")), n=len(customers))


def _tier_table(agg: pd.DataFrame, *, n: int) -> pd.DataFrame:
    """:func:`tier_summary_of` from its sums per tier (indexed by tier)."""
    out = agg.reindex(list(VALUE_TIERS)).dropna(how="all").rename_axis(
        "value_tier").reset_index()
    out["customer_share"] = out["n_customers"] / n
    out["value_share"] = out["value"] / out["value"].sum()
    return out


def lifecycle_counts(customers: pd.DataFrame) -> pd.DataFrame:
    """Customers and share per lifecycle stage (every stage, zero when empty)."""
    return _lifecycle_table(customers["lifecycle_stage"].value_counts(), n=len(customers))


def _lifecycle_table(counts: pd.Series, *, n: int) -> pd.DataFrame:
    """:func:`lifecycle_counts` from the customers of each stage."""
    out = (counts.reindex(list(LIFECYCLE_STAGES), fill_value=0)
           .rename_axis("lifecycle_stage").reset_index(name="n_customers"))
    out["share"] = out["n_customers"] / n
    return out


def write_profile(profile: CustomerProfile, out_dir: str | Path) -> dict[str, Path]:
    """Write the profile step's customer table (:class:`analysis.store.RunStore`), the
    summary frames and ``profile.json`` (with the scoring date every later step reads);
    a profile made on Spark has its customer table written already.

    Returns
    -------
    dict of Path
        Paths written, by name.
    """
    out_dir = Path(out_dir)
    (out_dir / "segments").mkdir(parents=True, exist_ok=True)
    store = RunStore(out_dir)
    # (on Spark the executors wrote the customer table already)
    written = {"customers": store.profile_table if profile.customers is None
               else store.write_profile_table(profile.customers)}
    for name in ("segments", "tiers", "lifecycle", "clusters", "cohorts", "pareto"):
        path = out_dir / "segments" / f"{name}.parquet"
        getattr(profile, name).to_parquet(path, index=False)
        written[name] = path
    written["profile"] = out_dir / "profile.json"
    written["profile"].write_text(json.dumps(profile.summary(), indent=2))
    return written


def read_profile(out_dir: str | Path, *, with_customers: bool = True) -> CustomerProfile:
    """Read back what :func:`write_profile` wrote; ``with_customers=False`` leaves the
    customer table out (``customers`` is None), for readers that need only the summaries:
    on large bases it is the biggest table of a run."""
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "profile.json").read_text())
    frames = {name: pd.read_parquet(out_dir / "segments" / f"{name}.parquet")
              for name in ("segments", "tiers", "lifecycle", "clusters", "cohorts", "pareto")}
    customers = RunStore(out_dir).read_customers() if with_customers else None
    return CustomerProfile(as_of=dt.date.fromisoformat(summary["as_of"]),
                           customers=customers, horizon_days=summary.get("horizon_days"),
                           **frames)
