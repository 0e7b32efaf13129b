"""Charts. Each function takes a computed frame, draws it, and returns the figure.

Nothing here computes a number the report relies on, and nothing saves a file. One
theme for every chart (:func:`set_theme`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

__all__ = [
    "PALETTE",
    "TIER_COLORS",
    "plot_cohort_heatmap",
    "plot_lifecycle",
    "plot_monthly_orders",
    "plot_pareto",
    "plot_quarantine",
    "plot_segments",
    "plot_tiers",
    "set_theme",
]

PALETTE = ["#1f4e79", "#2e86c1", "#85c1e9", "#f39c12", "#c0392b", "#7f8c8d", "#27ae60",
           "#8e44ad", "#16a085", "#d35400", "#34495e"]
TIER_COLORS = {"high": "#1f4e79", "mid": "#2e86c1", "low": "#aed6f1"}
STAGE_COLORS = {"new": "#27ae60", "active": "#1f4e79", "at risk": "#f39c12",
                "lapsed": "#d35400", "lost": "#7f8c8d"}


def set_theme() -> None:
    """The one look of every chart."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE,
                  rc={"figure.dpi": 96, "savefig.dpi": 96, "axes.titleweight": "bold",
                      "axes.titlesize": 12, "axes.spines.right": False,
                      "axes.spines.top": False, "figure.autolayout": True})


def _axes(ax=None, size=(7, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
    return ax.figure, ax


def plot_pareto(curve: pd.DataFrame, *, value_label: str = "revenue", ax=None) -> Figure:
    """Pareto curve from :func:`analysis.segments.pareto_curve`."""
    fig, ax = _axes(ax)
    ax.plot(curve["customer_share"] * 100, curve["value_share"] * 100, color=PALETTE[0], lw=2)
    ax.plot([0, 100], [0, 100], color=PALETTE[5], ls="--", lw=1, label="equal shares")
    ax.fill_between(curve["customer_share"] * 100, curve["value_share"] * 100,
                    alpha=0.08, color=PALETTE[0])
    ax.set_xlabel("share of customers, highest value first (%)")
    ax.set_ylabel(f"share of {value_label} (%)")
    ax.set_title(f"How concentrated is {value_label}?")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.legend(loc="lower right", frameon=False)
    return fig


def plot_tiers(tiers: pd.DataFrame, ax=None) -> Figure:
    """Customer share and value share per tier; ``tiers`` has value_tier,
    customer_share, value_share."""
    fig, ax = _axes(ax, (7, 3))
    order = [t for t in ("high", "mid", "low") if t in set(tiers["value_tier"])]
    t = tiers.set_index("value_tier").loc[order]
    y = np.arange(len(order))
    ax.barh(y - 0.2, t["customer_share"] * 100, height=0.38, color=PALETTE[5],
            label="share of customers")
    ax.barh(y + 0.2, t["value_share"] * 100, height=0.38,
            color=[TIER_COLORS[o] for o in order], label="share of value")
    ax.set_yticks(y, [f"{o} value" for o in order])
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title("Value tiers: customers against the value they bring")
    ax.legend(frameon=False, loc="lower right")
    return fig


def plot_segments(profile: pd.DataFrame, *, top: int = 12, ax=None) -> Figure:
    """Customer and value share per segment from :func:`analysis.segments.segment_profile`."""
    fig, ax = _axes(ax, (7, 0.42 * min(len(profile), top) + 1.2))
    p = profile.head(top)
    y = np.arange(len(p))
    ax.barh(y - 0.2, p["customer_share"] * 100, height=0.38, color=PALETTE[5],
            label="share of customers")
    ax.barh(y + 0.2, p["value_share"] * 100, height=0.38, color=PALETTE[0],
            label="share of value")
    ax.set_yticks(y, p["segment"].astype(str))
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title("Segments: size against value")
    ax.legend(frameon=False, loc="lower right")
    return fig


def plot_lifecycle(counts: pd.DataFrame, ax=None) -> Figure:
    """Customers per lifecycle stage; ``counts`` has lifecycle_stage, n_customers."""
    fig, ax = _axes(ax, (7, 2.8))
    c = counts.set_index("lifecycle_stage")["n_customers"]
    stages = [s for s in STAGE_COLORS if s in c.index]
    ax.bar(stages, c.loc[stages], color=[STAGE_COLORS[s] for s in stages])
    ax.yaxis.set_major_formatter(mticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("customers")
    ax.set_title("Where customers are in their lifecycle")
    return fig


def plot_cohort_heatmap(cohorts: pd.DataFrame, *, max_months: int = 12, ax=None) -> Figure:
    """Retention by acquisition month and months since first purchase."""
    pivot = cohorts[cohorts["months_since"].between(1, max_months)].pivot(
        index="cohort", columns="months_since", values="retention")
    pivot.index = pd.to_datetime(pivot.index).strftime("%Y-%m")
    height = max(3.0, 0.16 * len(pivot) + 1.2)
    fig, ax = _axes(ax, (8, height))
    sns.heatmap(pivot * 100, ax=ax, cmap="Blues", vmin=0, cbar_kws={"label": "% buying"},
                linewidths=0)
    ax.set_xlabel("months since first purchase")
    ax.set_ylabel("first purchase in")
    ax.set_title("Cohort retention: share of each month's new customers buying again")
    return fig


def plot_monthly_orders(monthly: pd.DataFrame, ax=None) -> Figure:
    """Orders and revenue per month; ``monthly`` has month, orders, revenue."""
    fig, ax = _axes(ax, (8, 3))
    ax.plot(pd.to_datetime(monthly["month"]), monthly["revenue"], color=PALETTE[0], lw=2)
    ax.yaxis.set_major_formatter(mticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("revenue")
    ax.set_title("Revenue per month")
    return fig


def plot_quarantine(by_rule: pd.DataFrame, ax=None) -> Figure:
    """Quarantined rows per table and rule; ``by_rule`` has table, rule, rows."""
    fig, ax = _axes(ax, (7, 0.4 * max(len(by_rule), 1) + 1.2))
    if by_rule.empty:
        ax.text(0.5, 0.5, "no row was set aside", ha="center", va="center")
        ax.set_axis_off()
        return fig
    labels = by_rule["table"].astype(str) + ": " + by_rule["rule"].astype(str)
    ax.barh(labels, by_rule["rows"], color=PALETTE[4])
    ax.invert_yaxis()
    ax.set_xlabel("rows set aside")
    ax.set_title("Rows quarantined, by rule")
    return fig
