"""The pandas reference of the project's feature build, outside the package.

:func:`pandas_features` computes the transaction features of
:func:`analysis.features.build_features` in idiomatic pandas (boolean masks, groupby
aggregations), with the same definitions and the same output columns. It is not part of
the pipeline: the tests check the DuckDB build against it (``tests/test_features.py``),
and ``python -m analysis bench features`` times the two against each other and checks
that their results are identical (:func:`same_features`).
"""

from __future__ import annotations

import datetime as dt
import sys

import numpy as np
import pandas as pd

from analysis.features import WINDOWS_DAYS

__all__ = ["pandas_features", "same_features"]


def pandas_features(tx: pd.DataFrame, *, cutoff: dt.date) -> pd.DataFrame:
    """The transaction features of :func:`analysis.features.build_features`, in pandas.

    The reference implementation for the benchmark and the tests: idiomatic pandas
    (boolean masks, groupby aggregations), same definitions, same output columns.
    """
    c = pd.Timestamp(cutoff)
    hist = tx[tx["order_date"] < c]
    if "order_id" in hist:
        hist = hist.assign(order_key=hist["order_id"])
    else:
        hist = hist.assign(order_key=hist["customer_id"] + "|"
                           + hist["order_date"].dt.strftime("%Y-%m-%d"))
    done = hist[hist["status"] == "completed"]
    buy = done[done["amount"] >= 0]
    g = buy.groupby("customer_id")
    out = pd.DataFrame({
        "recency_days": (c - g["order_date"].max()).dt.days,
        "frequency": g["order_date"].nunique(),
        "n_orders": g["order_key"].nunique(),
    })
    net = done.groupby("customer_id").agg(monetary_total=("amount", "sum"),
                                          margin_total=("margin", "sum"))
    out["monetary_total"] = net["monetary_total"]
    out["tenure_days"] = (c - g["order_date"].min()).dt.days
    orders = buy.groupby(["customer_id", "order_key"])["amount"].sum().groupby(level=0)
    out["monetary_mean_order"] = orders.mean()
    out["monetary_max_order"] = orders.max()
    out["margin_total"] = net["margin_total"]
    out["margin_rate"] = out["margin_total"] / out["monetary_total"].replace(0, np.nan)
    days = buy[["customer_id", "order_date"]].drop_duplicates().sort_values(
        ["customer_id", "order_date"])
    gap = days.groupby("customer_id")["order_date"].diff().dt.days
    gaps = gap.groupby(days["customer_id"])
    out["gap_mean_days"] = gaps.mean()
    out["gap_median_days"] = gaps.median()
    out["gap_std_days"] = gaps.std()
    out["recency_vs_gap"] = out["recency_days"] / out["gap_median_days"].replace(0, np.nan)
    for w in WINDOWS_DAYS:
        recent = done[done["order_date"] >= c - pd.Timedelta(days=w)]
        before = done[(done["order_date"] < c - pd.Timedelta(days=w))
                      & (done["order_date"] >= c - pd.Timedelta(days=2 * w))]
        out[f"orders_{w}d"] = (recent[recent["amount"] >= 0].groupby("customer_id")["order_key"]
                               .nunique().reindex(out.index, fill_value=0))
        spend = recent.groupby("customer_id")["amount"].sum().reindex(out.index, fill_value=0.0)
        prev = before.groupby("customer_id")["amount"].sum().reindex(out.index, fill_value=0.0)
        a, b = spend.clip(lower=0), prev.clip(lower=0)
        out[f"spend_{w}d"] = spend
        out[f"trend_{w}d"] = ((a - b) / (a + b).replace(0, np.nan)).fillna(0.0)
    out["cancel_rate"] = hist["status"].eq("cancelled").groupby(hist["customer_id"]).mean()
    out["return_rate"] = (hist["status"].eq("returned") | hist["amount"].lt(0)).groupby(
        hist["customer_id"]).mean()
    out["cutoff_month"] = c.month
    by_cat = buy.groupby(["customer_id", "category"])["amount"].sum().round(6).reset_index()
    by_cat = by_cat.sort_values(["customer_id", "amount", "category"],
                                ascending=[True, False, True])
    top = by_cat.groupby("customer_id")
    out["n_categories"] = top.size()
    out["top_category"] = top["category"].first()
    by_ch = buy.groupby(["customer_id", "channel"])["order_key"].nunique().rename("n")
    by_ch = by_ch.reset_index().sort_values(["customer_id", "n", "channel"],
                                            ascending=[True, False, True])
    ch = by_ch.groupby("customer_id")
    out["n_channels"] = ch.size()
    out["top_channel"] = ch["channel"].first()
    out["top_channel_share"] = ch["n"].first() / ch["n"].sum()
    return out.reset_index().sort_values("customer_id", ignore_index=True)


def same_features(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two feature frames hold the same values (to 1e-9), column by column
    of ``a``; a difference is printed to stderr."""
    try:
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b[a.columns].reset_index(
            drop=True), check_dtype=False, check_exact=False, rtol=1e-9, atol=1e-9)
    except (AssertionError, KeyError) as exc:
        print(f"results differ: {exc}", file=sys.stderr)
        return False
    return True
