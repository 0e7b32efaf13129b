"""Explanations: global drivers and per-customer reason codes in plain words.

SHAP values come from XGBoost's own exact TreeSHAP (``pred_contribs``; identical to
shap's TreeExplainer for these models, so the ``shap`` package is not needed). Reason
codes turn a customer's largest contributions into phrases through
:data:`FEATURE_PHRASES`, with the customer's own values ("no order for 140 days;
usually orders every 35 days").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["FEATURE_LABELS", "FEATURE_PHRASES", "global_drivers", "reason_codes"]

#: Short readable names of features, for charts and tables.
FEATURE_LABELS: dict[str, str] = {
    "tenure": "tenure",
    "tenure_months": "tenure (months)",
    "recurring_revenue": "recurring charges",
    "total_revenue": "total charges to date",
    "recency_days": "days since last order",
    "frequency": "purchase days",
    "n_orders": "orders",
    "monetary_total": "total spend",
    "tenure_days": "days since first order",
    "monetary_mean_order": "average order value",
    "monetary_max_order": "largest order",
    "margin_total": "total margin",
    "margin_rate": "margin rate",
    "gap_mean_days": "mean days between orders",
    "gap_median_days": "usual days between orders",
    "gap_std_days": "irregularity of orders",
    "recency_vs_gap": "time since last order vs own rhythm",
    "cancel_rate": "share of lines cancelled",
    "return_rate": "share of lines returned",
    "n_categories": "categories bought",
    "top_category": "main category",
    "n_channels": "channels used",
    "top_channel": "main channel",
    "top_channel_share": "share of orders in main channel",
    "n_complaints": "complaints",
    "complaints_90d": "complaints in last 90 days",
    "days_since_complaint": "days since last complaint",
    "n_unresolved_complaints": "unresolved complaints",
    "n_tickets": "support tickets",
    "satisfaction_last": "last satisfaction score",
    "satisfaction_mean": "mean satisfaction score",
    "days_since_signup": "days since sign-up",
    "cutoff_month": "month of the year",
    "season_index": "seasonality of the coming period",
}
for _w in (30, 90, 180, 365):
    FEATURE_LABELS[f"orders_{_w}d"] = f"orders in last {_w} days"
    FEATURE_LABELS[f"spend_{_w}d"] = f"spend in last {_w} days"
    FEATURE_LABELS[f"trend_{_w}d"] = f"spend trend, last {_w} days vs the {_w} before"

#: Phrase per feature for a reason code, formatted with the customer's row (``v`` is the
#: feature's value). Features not listed fall back to "<label>: <value>".
FEATURE_PHRASES: dict[str, str] = {
    "recency_days": "no order for {v:.0f} days",
    "recency_vs_gap": "{v:.1f} times their usual gap since the last order",
    "gap_median_days": "usually orders every {v:.0f} days",
    "frequency": "{v:.0f} purchase days so far",
    "n_orders": "{v:.0f} orders so far",
    "tenure_days": "customer for {v:.0f} days",
    "monetary_total": "spent {v:,.0f} in total",
    "monetary_mean_order": "average order {v:,.0f}",
    "n_complaints": "{v:.0f} complaint(s)",
    "complaints_90d": "{v:.0f} complaint(s) in the last 90 days",
    "n_unresolved_complaints": "{v:.0f} unresolved complaint(s)",
    "days_since_complaint": "last complaint {v:.0f} days ago",
    "satisfaction_last": "last satisfaction score {v:.0f} of 5",
    "satisfaction_mean": "mean satisfaction {v:.1f} of 5",
    "return_rate": "returns {v:.0%} of lines",
    "cancel_rate": "cancels {v:.0%} of lines",
    "gap_std_days": "irregular rhythm (gaps vary by {v:.0f} days)",
    "gap_mean_days": "orders every {v:.0f} days on average",
    "cutoff_month": "season (month {v:.0f})",
    "season_index": "coming period is {v:.1f} times an average one (last year)",
    "monetary_max_order": "largest order {v:,.0f}",
    "days_since_signup": "signed up {v:.0f} days ago",
    "region": "region {v}",
    "top_channel_share": "{v:.0%} of orders in the main channel",
    "n_categories": "buys in {v:.0f} categories",
    "top_category": "mostly buys {v}",
    "top_channel": "mostly orders via {v}",
}
for _w in (30, 90, 180, 365):
    FEATURE_PHRASES[f"orders_{_w}d"] = f"{{v:.0f}} orders in the last {_w} days"
    FEATURE_PHRASES[f"spend_{_w}d"] = f"spent {{v:,.0f}} in the last {_w} days"
    FEATURE_PHRASES[f"trend_{_w}d"] = (f"spend {{direction}} over the last {_w} days "
                                       f"(trend {{v:+.2f}})")


def global_drivers(contributions: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """Features ranked by mean absolute SHAP value.

    Returns
    -------
    DataFrame
        ``feature``, ``label``, ``mean_abs_shap``, ``share`` (of the total),
        ``direction`` (for numeric features, whether higher values push the prediction
        up or down: the sign of the rank correlation of value and SHAP).
    """
    shap = contributions.drop(columns="bias", errors="ignore")
    mean_abs = shap.abs().mean()
    rows = []
    for col, value in mean_abs.sort_values(ascending=False).items():
        direction = ""
        x = features[col]
        if pd.api.types.is_numeric_dtype(x) and x.notna().sum() > 2 and x.nunique() > 1:
            rho = pd.Series(x.to_numpy()).rank().corr(pd.Series(shap[col].to_numpy()).rank())
            if rho == rho:
                direction = "higher raises it" if rho > 0.1 else (
                    "higher lowers it" if rho < -0.1 else "mixed")
        rows.append({"feature": col, "label": FEATURE_LABELS.get(col, col),
                     "mean_abs_shap": float(value), "direction": direction})
    out = pd.DataFrame(rows)
    out["share"] = out["mean_abs_shap"] / out["mean_abs_shap"].sum()
    return out[["feature", "label", "mean_abs_shap", "share", "direction"]]


def reason_codes(contributions: pd.DataFrame, features: pd.DataFrame, *, top: int = 3,
                 direction: str = "up") -> pd.Series:
    """Plain-language reasons per customer: the ``top`` features pushing the prediction
    ``up`` (or ``down``) the most, as phrases joined by "; ".

    When the reasons mention recency, the customer's usual rhythm is added to it.
    Vectorised over customers: phrases are built one feature at a time for the customers
    it is a reason for (a million customers take seconds, not minutes).
    """
    shap = contributions.drop(columns="bias", errors="ignore")
    values = shap.to_numpy()
    if direction == "down":
        values = -values
    n, k = len(values), min(top, values.shape[1])
    order = np.argsort(-values, axis=1)[:, :k]
    cols = np.asarray(shap.columns)
    # a customer's reasons stop at the first feature that does not push the right way
    keep = np.cumprod(np.take_along_axis(values, order, axis=1) > 0, axis=1).astype(bool)
    phrases = np.full((n, k), "", dtype=object)
    for j, name in enumerate(cols):
        rows, pos = np.nonzero((order == j) & keep)
        if not len(rows):
            continue
        vals = (features[name].iloc[rows].tolist() if name in features
                else [None] * len(rows))
        phrases[rows, pos] = [_phrase(name, v) for v in vals]
    if "recency_days" in cols and "gap_median_days" in features:
        names = cols[order]
        gap = features["gap_median_days"].to_numpy(dtype=float)
        add = ((names == "recency_days").any(axis=1) & ~(names == "gap_median_days").any(axis=1)
               & ~np.isnan(gap))
        for i in np.flatnonzero(add):
            phrases[i] = [p + f"; usually orders every {gap[i]:.0f} days"
                          if p.startswith("no order for") else p for p in phrases[i]]
    texts = ["; ".join(p for p in row if p) for row in phrases]
    return pd.Series(texts, index=features.index, name="reasons")


def _phrase(feature: str, value) -> str:
    template = FEATURE_PHRASES.get(feature)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if feature.startswith("gap_") or feature == "recency_vs_gap":
            return "has bought on one day only"
        if feature == "days_since_complaint":
            return "no complaint recorded"
        if feature.startswith("satisfaction"):
            return "no satisfaction survey answered"
        return f"{FEATURE_LABELS.get(feature, feature)}: not known"
    if template is None:
        label = FEATURE_LABELS.get(feature, feature)
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        return f"{label}: {shown}"
    direction = "rising" if isinstance(value, int | float) and value > 0 else "falling"
    try:
        return template.format(v=value, direction=direction)
    except (ValueError, TypeError):
        return f"{FEATURE_LABELS.get(feature, feature)}: {value}"
