"""The executive page: every number, table, chart and sentence of it, read from a run.

The executive notebooks call one function per section and display what it returns:
a list of *blocks*, each an HTML string (escaped by :func:`analysis.report.paragraph`
and :func:`analysis.report.html_table`) or a chart (:mod:`analysis.plots`). Nothing here
computes a model or a decision: it reads what the steps wrote to the run's folder
(:func:`load_page`) and puts it into words.

Terms:

* *bottom line*: the three or four sentences above everything (:func:`bottom_line`),
  whose numbers are the decision table's totals (:func:`bottom_line_numbers`);
* *decision period*: the one period over which the decision table values every action
  (``strategy/retention.json``'s ``decision_period_days``);
* *lists*: one CSV per action and one of early warnings, written into the published
  report folder (:func:`write_lists`) so that they travel with the page.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from IPython.display import HTML, display
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from analysis import (
    data,
    explain,
    features,
    models,
    monitor,
    plots,
    segments,
    snapshot,
    strategy,
)
from analysis.config import Config, load_config
from analysis.markup import absent_note, heading, html_table, kpi_cards, link_list, paragraph
from analysis.store import (
    ORDER_COLUMNS,
    SCAN_ORDER,
    STREAM_ROWS,
    CustomerView,
    RunStore,
    duck_connection,
    parquet_scan,
    sql_text,
)

__all__ = [
    "LISTS_DIR",
    "Page",
    "actions",
    "bottom_line",
    "bottom_line_numbers",
    "changes",
    "churn",
    "data_and_assumptions",
    "for_analysts",
    "key_numbers",
    "lists",
    "list_name",
    "load_page",
    "money",
    "phaseout",
    "portfolio",
    "show",
    "title",
    "trust",
    "value",
    "write_lists",
]

#: The folder of the lists, inside the published report folder.
LISTS_DIR = "lists"

#: The columns of an action list (those the run has), in this order.
LIST_COLUMNS = ("customer_id", "action", "action_reason", "reasons", "churn_probability",
                "lifecycle_stage", "value_tier", "segment", "top_channel", "predicted_value",
                "expected_next_order", "predicted_clv", "incremental_profit")

#: The customer columns the executive page queries (a large base's table has dozens more),
#: where they lie (:class:`analysis.store.CustomerView`): it receives the aggregates and
#: the few customers its tables show, texts (reasons in words) only for those.
PAGE_COLUMNS = ["customer_id", "segment", "value_tier", "lifecycle_stage", "cluster_name",
                "frequency", "spend_90d", "spend_365d", "churn_probability", "predicted_value",
                "reasons", "action", "expected_revenue", "cost_to_serve", "expected_profit",
                "phaseout_candidate", "phaseout_reasons", "spend_last_horizon",
                # snapshot mode
                "churn", "revenue_month", "remaining_value", "remaining_months",
                "tenure_months", "expected_next_order", "predicted_clv"]

Block = str | Figure


@dataclass
class Page:
    """What the executive page reads from one run."""

    config: Config
    run_id: str
    processed_dir: Path
    report_dir: Path
    previous_processed_dir: Path | None
    processed_href: str
    quality: dict
    profile: Any                      # segments.CustomerProfile
    customers: Any                    # store.CustomerView: queried where the table lies
    decisions: strategy.StrategyRun
    horizon: int
    skipped: str | None
    fallback: dict | None
    inputs: dict[str, bool]
    run: Any = None                   # models.ModelRun or snapshot.SnapshotRun
    extras: dict = field(default_factory=dict)

    @property
    def snapshot(self) -> bool:
        return self.config.mode == "snapshot"

    @property
    def currency(self) -> str:
        return self.config.report.currency

    @property
    def active(self) -> str:
        """Customers still buying: new or active (the population churn risk is about,
        with 'at risk' in order-log mode: past their rhythm but not yet lapsed), as a
        condition on the customer table (SQL)."""
        stages = ((segments.STAGE_NEW, segments.STAGE_ACTIVE) if self.snapshot
                  else segments.ACTIVE_STAGES)
        return f"lifecycle_stage IN ({', '.join(sql_text(s) for s in stages)})"

    @property
    def at_risk(self) -> str:
        """Active customers with a churn probability of ``high_risk`` or more (SQL)."""
        return (f"(churn_probability >= {float(self.config.strategy.high_risk)!r} "
                f"AND {self.active})")

    @cached_property
    def counts(self) -> dict:
        """What the page counts and sums over every customer, in one pass: ``customers``,
        ``active``, ``at_risk``, ``risk_scored`` (customers with a churn probability),
        ``spend`` and ``spend_at_risk`` (last-12-month revenue, of all and of those at
        risk), ``predicted`` (predicted revenue) and, for a snapshot, ``revenue_scored``."""
        sums = {"spend": "spend_365d", "predicted": "predicted_value"}
        row = self.customers.frame(
            f"SELECT count(*) AS customers, count_if({self.active}) AS active, "
            f"count_if({self.at_risk}) AS at_risk, "
            "count(churn_probability) AS risk_scored, "
            + "".join(f"coalesce(fsum({c}), 0) AS {k}, " for k, c in sums.items())
            + f"coalesce(fsum(spend_365d) FILTER (WHERE {self.at_risk}), 0) AS spend_at_risk, "
            + ("count(revenue_month)" if self.snapshot else "NULL") + " AS revenue_scored "
            "FROM customers").iloc[0]
        return {k: (int(v) if k in ("customers", "active", "at_risk", "risk_scored")
                    else v) for k, v in row.items()}

    @property
    def risk_known(self) -> bool:
        return self.counts["risk_scored"] > 0

    @property
    def revenue_known(self) -> bool:
        """False for a snapshot without any revenue: then what customers bring, and every
        profit, is unknown (an order log always knows its revenue)."""
        return not self.snapshot or self.counts["revenue_scored"] > 0


def load_page(config_path: str | Path, processed_dir: str | Path, *, run_id: str,
              report_dir: str | Path, previous_processed_dir: str | Path = "",
              processed_href: str = "") -> Page:
    """Read a run's folder for the executive page (the notebook's parameters)."""
    config = load_config(config_path)
    processed_dir = Path(processed_dir)
    snap = config.mode == "snapshot"
    skipped = models.skipped_reason(processed_dir)
    if snap:
        run = None if skipped else snapshot.read_snapshot_run(processed_dir)
    else:
        run = None if skipped else models.read_model_run(processed_dir, tables=(
            "evaluation", "churn_metrics", "churn_metrics_active", "value_metrics", "drift",
            "churn_drivers"))
    return Page(
        config=config, run_id=run_id, processed_dir=processed_dir,
        report_dir=Path(report_dir),
        previous_processed_dir=Path(previous_processed_dir) if previous_processed_dir else None,
        processed_href=processed_href,
        quality=json.loads((processed_dir / "data_quality.json").read_text()),
        profile=segments.read_profile(processed_dir, with_customers=False),
        customers=CustomerView(RunStore(processed_dir), PAGE_COLUMNS,
                               memory_limit=config.analysis.duckdb_memory_limit),
        decisions=strategy.read_strategy(processed_dir, customers=False),
        horizon=RunStore(processed_dir).horizon_days(), skipped=skipped,
        fallback=models.label_free_fallback(processed_dir),
        inputs=data.available_inputs(processed_dir), run=run)


def show(blocks: list[Block]) -> None:
    """Display the blocks in order in a notebook (HTML as HTML, charts as images); a chart
    is closed once shown, so that it is not shown twice."""
    for block in blocks:
        if isinstance(block, Figure):
            display(block)
            plots.close(block)
        else:
            display(HTML(block))


def money(value: float, page: Page, *, decimals: int = 0) -> str:
    """A money figure with the config's currency (``report.currency``), if any:
    ``"EUR 12,345"``, or ``"12,345"`` without one; ``"unknown"`` for a missing one."""
    if value != value:
        return "unknown"
    text = f"{value:,.{decimals}f}"
    return f"{page.currency} {text}" if page.currency else text


# --------------------------------------------------------------------------- the top


def title(page: Page) -> list[Block]:
    """The page's heading and what the situation is."""
    if page.snapshot:
        intro = paragraph("Subscription customers as exported on {date}: one row per customer "
                          "with a churn flag. Run {run}.", date=page.profile.as_of.isoformat(),
                          run=page.run_id)
    else:
        intro = paragraph("Situation on {date}, from every record before that day. Run {run}.",
                          date=page.profile.as_of.isoformat(), run=page.run_id)
    return [heading(f"Customer strategy report: {page.config.name}", 1), intro]


def bottom_line_numbers(page: Page) -> dict:
    """The numbers of the bottom line, each read from the decision table or the profile.

    Returns
    -------
    dict
        ``active``, ``at_risk``, ``revenue_at_risk`` (their last-12-month revenue),
        ``revenue_12m``, ``period_days``, ``campaign`` (customers in the retention
        campaign), ``campaign_high_risk``, ``campaign_cost``, ``incremental_profit``,
        ``roi``, ``ordinary_profit``, ``total_profit``, ``actions`` (customers per action),
        ``changes`` (KPI deltas against the previous run, or None).
    """
    r, n = page.decisions.retention, page.counts
    acts = page.decisions.actions.set_index("action")
    changes = None
    if page.previous_processed_dir is not None:
        changes = monitor.kpi_deltas(monitor.run_kpis(page.processed_dir),
                                     monitor.run_kpis(page.previous_processed_dir))
    # without revenue (a snapshot that has none) every sum of money is unknown, not 0
    total = (lambda v: float(np.sum(v))) if page.revenue_known else (lambda v: np.nan)
    return {"active": n["active"], "at_risk": n["at_risk"],
            "revenue_at_risk": total(n["spend_at_risk"]), "revenue_12m": total(n["spend"]),
            "period_days": int(r.get("decision_period_days", 0)),
            "campaign": int(r["campaign_size"]), "campaign_high_risk":
                int(r.get("campaign_high_risk", 0)),
            "campaign_cost": float(r["campaign_cost"]),
            "incremental_profit": total(acts["incremental_profit"]),
            "roi": float(r["roi"]) if page.revenue_known else np.nan,
            "ordinary_profit": total(acts["ordinary_profit"]),
            "total_profit": total(acts["total_profit"]),
            "actions": acts["customers"].astype(int).to_dict(), "changes": changes,
            "campaign_range": campaign_range(page)}


def campaign_range(page: Page) -> tuple[float, float] | None:
    """The campaign's extra profit at the two ends of the measured effect's 95 % interval
    (the extra margin at each end, less the cost, which does not change), or None when
    the effect was assumed rather than measured. With the hazard effect the strategy step
    computed the margin at both ends (``expected_margin_saved_range``); otherwise the
    extra margin scales with the measured uplift rate."""
    d, r = page.decisions, page.decisions.retention
    if r.get("method") not in ("measured", "learned"):
        return None
    if r.get("expected_margin_saved_range"):
        low, high = r["expected_margin_saved_range"]
        cost = float(r["campaign_cost"])
        return (float(low) - cost, float(high) - cost)
    if not len(d.margin_uplift) or not r.get("uplift_rate_used"):
        return None
    u = d.margin_uplift.set_index("group").loc["all"]
    margin, cost = float(r["expected_margin_saved"]), float(r["campaign_cost"])
    scale = margin / float(r["uplift_rate_used"])
    return (float(u["ci_low"]) * scale - cost, float(u["ci_high"]) * scale - cost)


def bottom_line(page: Page) -> list[Block]:
    """Three or four sentences above everything: who and how much is at risk, what to do
    (with counts, cost, extra profit and ROI), what the plan is worth in total, and what
    changed since the last run."""
    n = bottom_line_numbers(page)
    m = lambda v: money(v, page)    # noqa: E731
    period = f"the next {n['period_days']} days"
    sentences = []
    if page.risk_known and page.snapshot:
        sentences.append(
            f"<b>{n['at_risk']:,} of {n['active']:,} current customers are likely to leave</b> "
            f"within a {page.config.snapshot.churn_period_months:g}-month period; "
            + (f"they bring {m(n['revenue_at_risk'])} a year in recurring revenue "
               f"({_share(n['revenue_at_risk'], n['revenue_12m'])} of all)."
               if page.revenue_known else "what they bring is unknown: the export has no "
               "revenue column."))
    elif page.risk_known:
        sentences.append(
            f"<b>{n['at_risk']:,} of {n['active']:,} active customers are likely to stop "
            f"buying</b> in the next {page.horizon} days; they spent {m(n['revenue_at_risk'])} "
            f"in the last 12 months ({_share(n['revenue_at_risk'], n['revenue_12m'])} of all "
            "revenue).")
    else:
        sentences.append(f"Churn risk is not estimated in this run ({page.skipped}); "
                         f"{n['active']:,} customers are active.")
    others = [f"{k:,} {strategy_words(a)}" for a, k in n["actions"].items()
              if not a.startswith(strategy.RETAIN_PREFIX) and a in _LISTED and k]
    if n["campaign"] and not page.revenue_known:
        sentences.append(
            f"<b>Recommended: a retention contact to {n['campaign']:,} customers at high "
            f"churn risk</b>, costing {m(n['campaign_cost'])}; what it brings cannot be "
            "valued without revenue" + (f"; also {_join(others)}." if others else "."))
    elif n["campaign"] and n["incremental_profit"] < 0:
        # a policy row that contacts customers whatever a contact is worth (personal
        # outreach of the valuable at risk) can make the campaign lose money: not a
        # recommendation, a cost the policy chooses, said as such
        sentences.append(
            f"<b>The policy contacts {n['campaign']:,} customers to retain them</b> "
            f"({n['campaign_high_risk']:,} of them at high churn risk), costing "
            f"{m(n['campaign_cost'])}; on this run's evidence the contacts are expected to "
            f"<b>lose {m(-n['incremental_profit'])}</b> over {period} after their cost "
            f"(ROI {n['roi']:.0%})"
            + (_range_words(n["campaign_range"], m) if n["campaign_range"] else
               " — an assumed effect: the data has no past campaign with a control group "
               "to measure what a contact does")
            + ", so the policy rows that contact customers whatever it pays (section 6) "
            "are worth a second look" + (f"; also {_join(others)}." if others else "."))
    elif n["campaign"]:
        sentences.append(
            f"<b>Recommended: a retention campaign to {n['campaign']:,} customers</b> "
            f"({n['campaign_high_risk']:,} of them at high churn risk), costing "
            f"{m(n['campaign_cost'])} and expected to bring {m(n['incremental_profit'])} of "
            f"extra profit over {period} after its cost (ROI {n['roi']:.0%})"
            + (_range_words(n["campaign_range"], m) if n["campaign_range"] else
               " — an assumed effect: the data has no past campaign with a control group "
               "to measure what a contact does")
            + (f"; also {_join(others)}." if others else "."))
    else:
        sentences.append("No retention contact is expected to pay for itself, so no campaign "
                         "is recommended" + (f"; {_join(others)}." if others else "."))
    if page.revenue_known:
        sentences.append(
            f"Following the plan, expected profit over {period} is {m(n['total_profit'])}: "
            f"{m(n['ordinary_profit'])} from ordinary business and "
            f"{m(n['incremental_profit'])} extra from the actions.")
    sentences.append(_change_sentence(n["changes"], page))
    return [heading("The bottom line", 2),
            '<div class="bottom-line"><p>' + " ".join(sentences) + "</p></div>"]


#: The actions the bottom line names besides the campaign (a policy's own actions with
#: these names are named too).
_LISTED = (strategy.WIN_BACK, strategy.PHASEOUT_REVIEW, strategy.GROW)


def _range_words(bounds: tuple[float, float] | None, m) -> str:
    """How sure the campaign's return is, in words, from :func:`campaign_range`."""
    if bounds is None:
        return ""
    low, high = bounds
    if low >= 0:
        return f" (between {m(low)} and {m(high)} with 95 % confidence)"
    return (f" — <b>uncertain</b>: the measured effect of a contact could be nil, and at the "
            f"low end of its 95 % interval the campaign would lose {m(-low)} "
            f"(at the high end it would bring {m(high)})")


def strategy_words(action: str) -> str:
    """How the bottom line names the customers of an action."""
    return {strategy.WIN_BACK: "lapsed high-value customers to win back",
            strategy.PHASEOUT_REVIEW: "customers for a phase-out review",
            strategy.GROW: "customers to develop"}.get(action, f"for '{action}'")


def _change_sentence(changes: pd.DataFrame | None, page: Page) -> str:
    if changes is None or not len(changes):
        return ("This is the first run with this configuration; from the next one on, this "
                "line says what changed.")
    d = changes.set_index("kpi")
    parts = []
    for kpi, words, is_money in (("active_customers", "active customers", False),
                                 ("revenue_12m", "revenue over 12 months", True),
                                 ("at_risk_customers", "customers likely to churn", False)):
        if kpi in d.index and pd.notna(d.loc[kpi, "change"]):
            v = float(d.loc[kpi, "change"])
            amount = money(abs(v), page) if is_money else f"{abs(v):,.0f}"
            parts.append(f"{words} {'up' if v > 0 else 'down' if v < 0 else 'unchanged'}"
                         + (f" {amount}" if v else ""))
    return ("Since the previous run: " + "; ".join(parts) + ".") if parts else ""


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] \
        if items else ""


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"


def key_numbers(page: Page) -> list[Block]:
    """Section 1: the key numbers as cards."""
    h, r, n = page.horizon, page.decisions.retention, page.counts
    m = lambda v: money(v, page)    # noqa: E731
    known = page.risk_known
    period = r.get("decision_period_days", h)
    total = float(page.decisions.actions["total_profit"].sum())
    if page.snapshot:
        # (sums of nothing known are unknown: NULL, read as NaN)
        s = page.customers.frame(
            "SELECT favg(CASE WHEN churn::BOOLEAN THEN 1.0 ELSE 0.0 END) AS churned, "
            f"fsum(revenue_month) FILTER (WHERE {page.active}) AS revenue_month, "
            "fsum(predicted_value) AS predicted_value, "
            f"fsum(spend_365d) FILTER (WHERE {page.at_risk}) AS spend_at_risk, "
            "fsum(remaining_value) AS remaining_value FROM customers").iloc[0]
        if not page.revenue_known:        # no money to sum: each figure says "unknown"
            s = s.copy()
            s[["revenue_month", "predicted_value", "spend_at_risk", "remaining_value"]] = np.nan
            total = np.nan
        cards = [
            (f"{n['customers']:,}", "customers in the export"),
            (f"{n['active']:,}", "current customers"),
            (f"{s['churned']:.1%}", "left in the last period (the churn flag)"),
            (m(s["revenue_month"]), "recurring revenue per month, current customers"),
            (m(s["predicted_value"]), f"expected revenue, next {h} days"),
            (f"{n['at_risk']:,}" if page.run else "not estimated",
             "current customers likely to leave (50 %+ per period)"),
            (m(s["spend_at_risk"]) if page.run
             else "not estimated", "yearly recurring revenue of those customers"),
            (m(s["remaining_value"]) if page.run else "not estimated",
             "expected remaining value of current customers (discounted)"),
            (m(total), f"expected profit with the recommended actions, next {period} days")]
        if not page.revenue_known:       # the money cards would each read "unknown"
            cards = [card for card in cards if card[0] != money(np.nan, page)]
        out = [heading("1. Key numbers"), kpi_cards(cards)]
        if not page.revenue_known:
            out.append(absent_note("revenue", page.config))
        if page.skipped:
            out.append(paragraph("There is too little data for a churn model in this run, so "
                                 "churn risk and remaining value are not estimated: {reason}.",
                                 reason=page.skipped))
        return out
    top20 = page.profile.pareto.loc[
        page.profile.pareto["customer_share"].sub(0.2).abs().idxmin(), "value_share"]
    cards = [
        (f"{n['customers']:,}", "customers with a purchase"),
        (f"{n['active']:,}", "active customers (new, active or past their rhythm)"),
        (m(n["spend"]), "revenue, last 12 months"),
        (m(n["predicted"]), f"predicted revenue, next {h} days"
         + ("" if known else " (recent spending rate)")),
        (f"{n['at_risk']:,}" if known else "not estimated",
         f"active customers likely to churn ({page.config.strategy.high_risk:.0%}+ chance of "
         f"no order in {h} days)"),
        (m(n["spend_at_risk"]) if known else "not estimated",
         "last-12-month revenue of those customers"),
        (f"{top20:.0%}", "of all revenue to date from the top 20 % of customers"),
        (m(total), f"expected profit with the recommended actions, next {period} days"),
    ]
    out = [heading("1. Key numbers"), kpi_cards(cards), paragraph(
        "Churn means no order in the next {h} days. Customers likely to churn are counted "
        "among those still active (new, active or past their usual rhythm), not those already "
        "lapsed or lost; revenue at risk is what they spent in the last 12 months.", h=h)]
    if page.skipped and page.fallback:
        out.append(paragraph(
            "There is too little labelled history for a trained model ({reason}), so churn "
            "risk and predicted revenue come from a statistical model of each customer's "
            "purchase rhythm ({method}), which needs no labels; section 8 says how well it did.",
            reason=page.skipped, method=_plain_method(page.fallback["method"])))
    elif page.skipped:
        out.append(paragraph(
            "There is too little data for the churn and value models in this run, so churn "
            "risk is not estimated and value forecasts continue each customer's recent "
            "spending rate (last 12 months, or all the history when shorter): {reason}.",
            reason=page.skipped))
    return out


# --------------------------------------------------------------------------- sections


def changes(page: Page) -> list[Block]:
    """Section 2: what changed since the last run, and how an earlier run turned out."""
    out: list[Block] = [heading("2. What changed since the last run")]
    prev = page.previous_processed_dir
    if prev is not None:
        before, now = monitor.run_kpis(prev), monitor.run_kpis(page.processed_dir)
        if not page.snapshot:
            out.append(paragraph("Compared with the previous successful run (situation on {d}):",
                                 d=before["as_of"]))
        out.append(html_table(_kpi_table(monitor.kpi_deltas(now, before), page),
                              formats={"change_share": "+.1%"},
                              labels={"kpi": "Measure", "previous": "Previous run",
                                      "current": "This run", "change": "Change",
                                      "change_share": "Change (%)"}))
        old = RunStore(prev)
        tiered = page.customers.frame(
            f"SELECT count_if(value_tier IS DISTINCT FROM {sql_text(segments.TIER_UNKNOWN)}) "
            f"AS n FROM ({old.joined_sql(['value_tier'])})").iloc[0, 0]
        if page.revenue_known and tiered:
            out += [paragraph("Value-tier migration: rows are the tier in the previous run, "
                              "columns the tier now."),
                    html_table(monitor.migration_matrix(page.customers, old,
                                                       column="value_tier").reset_index())]
        if page.snapshot:
            return out
        segs = monitor.migration_matrix(page.customers, old, column="segment")
        moved = int(segs.to_numpy().sum()
                    - sum(segs.loc[s, s] for s in segs.index if s in segs.columns))
        out += [paragraph("{m:,} customers changed RFM segment (or arrived or left) since the "
                          "previous run.", m=moved), html_table(segs.reset_index())]
        fresh = monitor.new_alerts(prev, page.processed_dir)
        out.append(paragraph("{n:,} new early warnings since the previous run ({rules}).",
                             n=int(fresh["alerts"].sum()), rules=", ".join(
                                 f"{k}: {v:,}" for k, v in zip(fresh["rule"], fresh["alerts"],
                                                               strict=True))
                             or "none"))
    elif page.snapshot:
        out.append(paragraph("This is the first successful run with this configuration: there "
                             "is nothing to compare with yet."))
    else:
        out.append(paragraph(
            "This is the first successful run with this configuration: there is nothing to "
            "compare with yet. From the next run on, this section shows the changes in the key "
            "numbers, who moved between tiers and segments, and new alerts."))
    if page.snapshot:
        return out
    out += _trend(page) + _movement(page)
    history = monitor.read_history(page.processed_dir.parent / "history.parquet",
                                   config=page.config.name)
    if len(history) >= 2:
        out.append(plots.plot_history(history))
    out += _turned_out(page, history)
    return out


#: The run KPIs (:func:`analysis.monitor.run_kpis`) in words, with how to show them.
KPI_WORDS = {
    "customers": ("Customers with a purchase", "{:,.0f}"),
    "active_customers": ("Active customers", "{:,.0f}"),
    "revenue_12m": ("Revenue, last 12 months", "money"),
    "top20_revenue_share": ("Revenue share of the top 20 % of customers, last 12 months",
                            "{:.1%}"),
    "high_value_customers": ("High-value customers", "{:,.0f}"),
    "complaint_rate": ("Customers with a complaint in 90 days", "{:.1%}"),
    "predicted_value": ("Predicted revenue over the horizon", "money"),
    "at_risk_customers": ("Active customers likely to churn", "{:,.0f}"),
    "revenue_at_risk": ("Their revenue, last 12 months", "money"),
    "churn_auc": ("Churn model accuracy (AUC, active customers)", "{:.3f}"),
    "value_mae": ("Spend forecast error per customer", "money"),
    "phaseout_customers": ("Proposed for a phase-out review", "{:,.0f}"),
    "campaign_profit": ("Extra profit of the retention campaign", "money"),
}


def _kpi_table(deltas: pd.DataFrame, page: Page) -> pd.DataFrame:
    """The KPI changes with their names in words and each value in its own format."""
    rows = []
    for r in deltas.itertuples():
        label, fmt = KPI_WORDS.get(r.kpi, (r.kpi.replace("_", " "), "{:,.3g}"))

        def show(v, sign=False, fmt=fmt):
            if fmt == "money":
                text = money(abs(v) if sign else v, page)
                return (("+" if v >= 0 else "-") + text) if sign else text
            return (fmt.replace("{:", "{:+") if sign else fmt).format(v)
        rows.append({"kpi": label, "previous": show(r.previous), "current": show(r.current),
                     "change": show(r.change, sign=True), "change_share": r.change_share})
    return pd.DataFrame(rows, columns=["kpi", "previous", "current", "change",
                                       "change_share"])


def _trend(page: Page) -> list[Block]:
    """The key numbers month by month over the last year, from the order log."""
    con = features.connect_run(page.processed_dir, page.config)
    trend = monitor.monthly_trend(con, as_of=page.profile.as_of, horizon_days=page.horizon)
    if len(trend) < 2:
        return []
    first, last = trend.iloc[0], trend.iloc[-1]
    return [paragraph(
        "Over the last 12 months (to {end}, against {start}): revenue over the previous 12 "
        "months went from {r0} to {r1} ({rc:+.0%}); buying customers from {b0:,} to {b1:,}"
        + ("; the share of the year's buyers who made no purchase in the following {h} days "
           "from {c0:.0%} to {c1:.0%}." if pd.notna(first["churn_rate"])
           and pd.notna(last["churn_rate"]) else "."),
        end=last["as_of"].isoformat(), start=first["as_of"].isoformat(),
        r0=money(first["revenue_12m"], page), r1=money(last["revenue_12m"], page),
        rc=(last["revenue_12m"] / first["revenue_12m"] - 1) if first["revenue_12m"] else 0.0,
        b0=int(first["buying_customers"]), b1=int(last["buying_customers"]), h=page.horizon,
        c0=first["churn_rate"], c1=last["churn_rate"]),
        plots.plot_trend(trend)]


def lifecycle_movement(page: Page) -> pd.DataFrame | None:
    """Customers by lifecycle stage at the evaluation cutoff (rows, one horizon ago) and
    now (columns); customers new since then in the row ``new since then (or not scored)``. None
    without a trained model (the evaluation cutoff's stages come from it). When the
    evaluation is a sample of the customers (:func:`analysis.models.evaluation_sample`),
    the sampled customers only, and no row of new ones (who is new cannot be told)."""
    if page.run is None or "lifecycle_stage" not in page.run.evaluation:
        return None
    new = "new since then (or not scored)"
    page.customers.register("_then", page.run.evaluation[["customer_id", "lifecycle_stage"]])
    table = page.customers.crosstab(
        f"SELECT coalesce(t.lifecycle_stage, {sql_text(new)}) AS then, "
        "c.lifecycle_stage AS now, count(*) AS n FROM customers AS c "
        + ("INNER" if models.evaluation_sample(page.run) else "LEFT")
        + " JOIN _then AS t ON t.customer_id = c.customer_id "
        "WHERE c.lifecycle_stage IS NOT NULL GROUP BY ALL")
    order = [*segments.LIFECYCLE_STAGES, new]
    table = table.reindex(index=[s for s in order if s in table.index],
                          columns=[s for s in order if s in table.columns])
    table.columns.name = None
    return table.rename_axis("Stage then")


def _movement(page: Page) -> list[Block]:
    table = lifecycle_movement(page)
    if table is None or not len(table):
        return []
    cut = page.run.cutoffs["eval"]
    active = list(segments.ACTIVE_STAGES)
    was = table.reindex(index=active).fillna(0)
    lapsed = int(was[[c for c in table.columns if c not in active]].to_numpy().sum())
    return [paragraph(
        "Movement between lifecycle stages since {cut} ({h} days ago): of the {n:,} customers "
        "active then{sample}, {lapsed:,} have since lapsed or been lost. Rows are the stage "
        "then, columns the stage now (customers):", cut=cut, h=page.horizon,
        n=int(was.to_numpy().sum()), lapsed=lapsed,
        sample=models.evaluation_sample(page.run)),
        html_table(table.reset_index(), formats={c: "," for c in table.columns})]


def _turned_out(page: Page, history: pd.DataFrame) -> list[Block]:
    """How the latest earlier run whose horizon has passed turned out."""
    root, h = page.processed_dir.parent, page.horizon
    if not len(history):
        return []
    done = history[pd.to_datetime(history["as_of"]) + pd.Timedelta(days=h)
                   <= pd.Timestamp(page.profile.as_of)]
    done = done[[(root / r / "customers.parquet").is_file() for r in done["run_id"]]]
    done = done[[RunStore(root / r).known("churn_probability") > 0
                 for r in done["run_id"]]] if len(done) else done
    if not len(done):
        return []
    earlier = done.sort_values("as_of").iloc[-1]
    con = features.connect_run(page.processed_dir, page.config)
    # the labels since that run's date, written where the engine works (Spark's
    # executors: a folder the run's driver reads) and compared where they lie
    with tempfile.TemporaryDirectory(dir=page.processed_dir, prefix=".outcomes-") as tmp:
        actual = Path(tmp) / "actual.parquet"
        features.write_features(con, actual, cutoff=pd.Timestamp(earlier["as_of"]).date(),
                                horizon_days=h)
        real = monitor.realized_outcomes(RunStore(root / earlier["run_id"]), actual,
                                         memory_limit=page.config.analysis.duckdb_memory_limit)
    return [paragraph(
        "How the run of {d} turned out, now that its {h} days have passed: it expected {pc:.0%} "
        "of its {n:,} customers to churn and {oc:.0%} did (AUC {auc:.3f}, Brier {b:.3f}); it "
        "predicted {pt} of revenue and {at} came in (error per customer {mae}).",
        d=earlier["as_of"], h=h, pc=real["predicted_churn_rate"], n=real["customers"],
        oc=real["observed_churn_rate"], auc=real["churn_auc"], b=real["brier"],
        pt=money(real["predicted_total"], page), at=money(real["actual_total"], page),
        mae=money(real["value_mae"], page, decimals=1))]


def portfolio(page: Page) -> list[Block]:
    """Section 3: who brings the value (tiers, segments, behaviour groups, lifecycle; in
    snapshot mode tenure bands and survival)."""
    if page.snapshot:
        return _snapshot_portfolio(page)
    profile, inputs = page.profile, page.inputs
    high = profile.tiers.set_index("value_tier").loc[segments.TIER_HIGH]
    top20 = profile.pareto.loc[profile.pareto["customer_share"].sub(0.2).abs().idxmin(),
                               "value_share"]
    out: list[Block] = [heading("3. Portfolio: who brings the value"), paragraph(
        "{n:,} high-value customers ({cs:.0%} of all) bring {vs:.0%} of revenue to date; the top "
        "20 % bring {t:.0%}.", n=int(high["n_customers"]), cs=high["customer_share"],
        vs=high["value_share"], t=top20),
        plots.plot_pareto(profile.pareto), plots.plot_tiers(profile.tiers)]
    lead = profile.segments.iloc[0]
    buying = [f"buying mostly {{{c}}}" if i == 0 else f"through {{{c}}}" for i, c in enumerate(
        c for c, n in (("cats", "category"), ("chans", "channel")) if inputs[n])]
    if lead.get("described", True):
        out.append(paragraph(
            "The largest segment by value is <b>{name}</b>: {cs:.0%} of customers and {vs:.0%} "
            "of revenue" + (", " + " ".join(buying) if buying else "") + ".",
            name=lead["segment"], cs=lead["customer_share"], vs=lead["value_share"],
            cats=lead.get("top_categories"), chans=lead.get("top_channels")))
    out += [absent_note(name, page.config) for name in ("category", "channel")
            if not inputs[name]]
    out.append(plots.plot_segments(profile.segments))
    columns = [c for c in ["segment", "n_customers", "customer_share", "value_share",
                           "mean_value", "median_recency_days"] if c in profile.segments] + (
        ["top_categories"] if inputs["category"] else [])
    out.append(html_table(profile.segments[columns], formats={
        "customer_share": ".1%", "value_share": ".1%", "mean_value": ",.0f", "n_customers": ",",
        "median_recency_days": ",.0f"}, labels={
        "segment": "Segment", "n_customers": "Customers", "customer_share": "% of customers",
        "value_share": "% of revenue", "mean_value": "Revenue per customer",
        "median_recency_days": "Days since last order (median)",
        "top_categories": "Main categories"}))
    share = profile.lifecycle.set_index("lifecycle_stage")["share"]
    out += [heading("Behaviour groups and lifecycle", 3),
            paragraph("Customers fall into {k} behaviour groups:", k=len(profile.clusters)),
            html_table(profile.clusters[["cluster_name", "description", "n_customers", "share"]],
                       formats={"share": ".0%", "n_customers": ","},
                       labels={"cluster_name": "Group", "description": "Description",
                               "n_customers": "Customers", "share": "Share"}),
            paragraph("{a:.0%} of customers are active or new, {r:.0%} are past their usual "
                      "rhythm, {l:.0%} have lapsed and {x:.0%} are lost.",
                      a=share[segments.STAGE_ACTIVE] + share[segments.STAGE_NEW],
                      r=share[segments.STAGE_AT_RISK], l=share[segments.STAGE_LAPSED],
                      x=share[segments.STAGE_LOST]),
            plots.plot_lifecycle(profile.lifecycle)]
    return out


def _snapshot_portfolio(page: Page) -> list[Block]:
    profile = page.profile
    cohorts = profile.cohorts
    worst = cohorts.loc[cohorts["churn_rate"].idxmax()]
    by = page.config.snapshot.survival_by
    # (a snapshot is one row per customer, loaded whole by every stage: its survival
    # curves read their columns for everyone)
    store = RunStore(page.processed_dir)
    by = by if by and by != "customer_id" and store.wanted([by]) else None
    c = store.read_customers(["churn", "tenure_months", *([by] if by else [])])
    churned = c["churn"].fillna(False).astype(bool)
    km = snapshot.kaplan_meier(c["tenure_months"], churned, by=c[by] if by else None)
    medians = km.groupby("group", sort=False)["median_tenure"].first()
    return [
        heading("3. Portfolio: who brings the value"),
        paragraph("This data has one row per customer and no orders, so there are no "
                  "purchase-based segments (RFM), rhythms or order cohorts: {tiers}segments "
                  "are behaviour groups over the numeric columns, and cohorts are tenure bands.",
                  tiers="value tiers are by recurring revenue, " if page.revenue_known else ""),
        *(_revenue_shares(page) if page.revenue_known
          else [absent_note("revenue", page.config)]),
        html_table(profile.clusters[["cluster_name", "description", "n_customers", "share"]],
                   formats={"share": ".0%", "n_customers": ","},
                   labels={"cluster_name": "Group", "description": "Description",
                           "n_customers": "Customers", "share": "Share"}),
        paragraph("Churn is highest among customers with {band} of tenure: {rate:.0%} of them "
                  "left.", band=worst["tenure_band"], rate=worst["churn_rate"]),
        plots.plot_tenure_cohorts(cohorts),
        paragraph("Survival over tenure (Kaplan-Meier: customers who left count as events, "
                  "current customers as still running){by}. {m}",
                  by=f", by {by}" if by else "",
                  m="; ".join(f"{g}: half gone after {t:.0f} months" if t == t
                              else f"{g}: more than half still with us"
                              for g, t in medians.items())),
        plots.plot_survival(km)]


def _revenue_shares(page: Page) -> list[Block]:
    """How a snapshot's recurring revenue is shared among its customers."""
    high = page.profile.tiers.set_index("value_tier").loc[segments.TIER_HIGH]
    return [paragraph("{n:,} high-value customers ({cs:.0%} of all) bring {vs:.0%} of the "
                      "recurring revenue.", n=int(high["n_customers"]),
                      cs=high["customer_share"], vs=high["value_share"]),
            plots.plot_pareto(page.profile.pareto, value_label="recurring revenue")]


def churn(page: Page) -> list[Block]:
    """Section 4: who is at risk and why."""
    n = page.counts
    out: list[Block] = [heading("4. Churn: who is at risk and why")]
    if not page.risk_known or (page.snapshot and page.run is None):
        return out + [paragraph("Churn risk is not estimated in this run: {reason}.",
                                reason=page.skipped)]
    if page.snapshot:
        drivers = explain.global_drivers(page.run.churn_shap, page.run.score_features)
        out.append(paragraph(
            "{n:,} current customers ({share:.0%}) are more likely than not to leave within a "
            "period. The main drivers are: {d}.", n=n["at_risk"],
            share=n["at_risk"] / max(n["active"], 1), d=_drivers(drivers)))
        out.append(plots.plot_drivers(drivers, top=10, **_DRIVER_WORDS))
        base, leave, value_col = page.active, "Likely to leave", "remaining_value"
    else:
        out.append(paragraph(
            "{n:,} active customers ({share:.0%} of all) are likely to churn in the next {h} "
            "days.", n=n["at_risk"], share=n["at_risk"] / n["customers"], h=page.horizon))
        if page.run is not None:
            out += [paragraph("What moves churn risk most: {d}.",
                              d=_drivers(page.run.churn_drivers)),
                    plots.plot_drivers(page.run.churn_drivers, top=10,
                                      **_DRIVER_WORDS)]
        else:
            out.append(paragraph(
                "Without a trained model the risk follows each customer's own purchase "
                "rhythm: how long since the last purchase, against how often they used to buy."))
        base, leave, value_col = "TRUE", "Likely to churn", "spend_365d"
    by_segment = (page.customers.frame(
        f"SELECT segment, count(*) AS customers, count_if({page.at_risk})::BIGINT AS likely, "
        "favg(churn_probability) AS mean_churn_probability, "
        f"coalesce(fsum(spend_365d) FILTER (WHERE {page.at_risk}), 0) AS revenue_at_risk "
        f"FROM customers WHERE ({base}) AND segment IS NOT NULL GROUP BY segment "
        "ORDER BY segment").set_index("segment")
                  .sort_values(["revenue_at_risk", "likely"] if page.revenue_known
                               else "likely", ascending=False).reset_index())
    if not page.revenue_known:
        by_segment = by_segment.drop(columns="revenue_at_risk")
    out.append(html_table(by_segment, formats={
        "customers": ",", "likely": ",", "mean_churn_probability": ".0%",
        "revenue_at_risk": ",.0f"}, labels={
        "segment": "Segment", "customers": "Customers", "likely": leave,
        "mean_churn_probability": "Mean churn chance",
        "revenue_at_risk": _money_label("Revenue at risk (last 12 months)", page)}))
    if not page.revenue_known:       # none is known to be more valuable: the likeliest first
        value_col = "churn_probability"
    spend = "revenue_month" if page.snapshot else "spend_365d"
    shown = [c for c in ["customer_id", "segment"] + [spend] * page.revenue_known
             + ["churn_probability", "reasons", "action"] if c in page.customers]
    valuable = page.customers.frame(
        f"SELECT {', '.join(shown)} FROM customers WHERE {page.at_risk} "
        f"ORDER BY {value_col} DESC NULLS LAST, customer_id LIMIT 8")
    out += [paragraph("The {who} likely to churn, with the reasons behind their risk (every "
                      "one of them, with their action, is in the lists below):",
                      who="most valuable customers" if page.revenue_known
                      else "customers most"),
            html_table(valuable,
                formats={spend: ",.0f", "churn_probability": ".0%"},
                labels={"customer_id": "Customer", "segment": "Segment",
                        spend: _money_label("Monthly revenue" if page.snapshot
                                            else "Spend, last 12 months", page),
                        "churn_probability": "Churn chance", "reasons": "Why",
                        "action": "Action"})]
    return out


def _plain_method(name: str) -> str:
    """A method named in models.json, in the executive page's words."""
    return (models.PLAIN_METHOD_NAMES["bgnbd_gg"] if name == models.LABEL_FREE_METHOD
            else name)


#: The driver chart's words on the executive page.
_DRIVER_WORDS = {"title": "What moves churn risk most",
                 "xlabel": "share of the model's explanation (%)"}


def _drivers(drivers: pd.DataFrame) -> str:
    top = drivers.head(5)
    return "; ".join(f"{label} ({d})" if d else label
                     for label, d in zip(top["label"], top["direction"], strict=True))


def _money_label(label: str, page: Page) -> str:
    return f"{label}, {page.currency}" if page.currency else label


def value(page: Page) -> list[Block]:
    """Section 5: what customers will bring."""
    h = page.horizon
    out: list[Block] = [heading("5. Value: what customers will bring")]
    if page.snapshot:
        if page.run is None:
            return out + [paragraph("The remaining value needs a churn model, which this run "
                                    "does not have: {reason}.", reason=page.skipped)]
        if not page.revenue_known:
            return out + [absent_note("revenue", page.config), paragraph(
                "Current customers are expected to stay {m:,.1f} months on average (of the "
                "next {y:g} years), from their churn chance per period.",
                m=page.customers.frame(f"SELECT favg(remaining_months) FROM customers "
                                       f"WHERE {page.active}").iloc[0, 0],
                y=page.config.snapshot.max_years)]
        p = page.config.snapshot
        by_tier = (page.customers.frame(
            "SELECT value_tier, count(*) AS customers, "
            "coalesce(fsum(revenue_month), 0) AS monthly, favg(remaining_months) AS months, "
            "coalesce(fsum(remaining_value), 0) AS remaining FROM customers "
            f"WHERE {page.active} AND value_tier IS NOT NULL GROUP BY value_tier")
            .set_index("value_tier").reindex(list(segments.VALUE_TIERS)).dropna(how="all").reset_index()
            .astype({"customers": int}))
        return out + [paragraph(
            "Each current customer's expected remaining value is their monthly recurring "
            "revenue times the months they are expected to stay: with a churn chance p per "
            "{per:g}-month period, a share (1 - p) stays each period; months are discounted at "
            "{d:.0%} a year and counted for at most {y:g} years. Together: {total}, {hs:.0%} of "
            "it from the high-value tier.", per=p.churn_period_months, d=p.discount_rate,
            y=p.max_years, total=money(by_tier["remaining"].sum(), page),
            hs=by_tier.set_index("value_tier").loc[segments.TIER_HIGH, "remaining"]
            / by_tier["remaining"].sum()),
            html_table(by_tier, formats={"customers": ",", "monthly": ",.0f",
                                         "months": ",.1f", "remaining": ",.0f"},
                       labels={"value_tier": "Value tier", "customers": "Current customers",
                               "monthly": _money_label("Monthly revenue", page),
                               "months": "Expected months still to come (mean)",
                               "remaining": _money_label("Expected remaining value", page)})]
    by_tier = (page.customers.frame(
        "SELECT value_tier, count(*) AS customers, coalesce(fsum(predicted_value), 0) "
        "AS predicted FROM customers WHERE value_tier IS NOT NULL GROUP BY value_tier")
        .set_index("value_tier").reindex(list(segments.VALUE_TIERS)).dropna(how="all")
        .reset_index())
    who = ("the model expects" if page.run else "the purchase-rhythm model expects"
           if page.fallback else "the recent rate of spending suggests")
    # (the typical mid-value customer's prediction: the median, halfway between the two
    # middle ones of an even count, as pandas has it)
    threshold, growth = page.customers.frame(
        "WITH t AS (SELECT median(predicted_value) FILTER (WHERE value_tier = "
        f"{sql_text(segments.TIER_MID)}) AS m FROM customers) "
        f"SELECT any_value(t.m), count_if(c.value_tier = {sql_text(segments.TIER_LOW)} "
        "AND c.predicted_value >= t.m) FROM customers AS c, t").iloc[0]
    return out + [
        paragraph("Over the next {h} days {who} {total} of revenue from today's customers; "
                  "{hs:.0%} of it from the high-value tier.", h=h, who=who,
                  total=money(page.counts["predicted"], page),
                  hs=by_tier.set_index("value_tier").loc[segments.TIER_HIGH, "predicted"]
                  / by_tier["predicted"].sum()),
        html_table(by_tier, formats={"customers": ",", "predicted": ",.0f"},
                   labels={"value_tier": "Value tier", "customers": "Customers",
                           "predicted": _money_label(f"Predicted revenue, next {h} days",
                                                     page)}),
        paragraph("{n:,} low-value customers are predicted to spend at least as much as the "
                  "typical mid-value customer ({t}) over the next {h} days.",
                  n=int(growth), t=money(float(threshold) if threshold is not None
                                         and threshold == threshold else np.nan, page),
                  h=h)] + _outlook(page)


def _outlook(page: Page) -> list[Block]:
    """The per-customer next-order date and lifetime value, where the run has them."""
    if "predicted_clv" not in page.customers:
        return []
    until = pd.Timestamp(page.profile.as_of) + pd.Timedelta(days=page.horizon)
    o = page.customers.frame(
        "SELECT count(predicted_clv) AS valued, coalesce(fsum(predicted_clv), 0) AS total, "
        "count(expected_next_order) AS dated, count(*) - count(expected_next_order) AS never, "
        "count_if(expected_next_order <= $until) AS soon FROM customers",
        {"until": until.to_pydatetime()}).iloc[0]
    if not o["valued"]:
        return []
    return [paragraph(
        "Each customer's expected date of next order and lifetime value are in the lists and "
        "the customer table, from a model of each customer's purchase rhythm and basket "
        "size: the lifetime value is the expected spend over the next {m} months (discounted "
        "{d:.0%} a month), {total} in all; the date is when the customer has more likely than "
        "not ordered again. {soon:,} customers are expected to order within the next {h} days; "
        "{never:,} are not expected to order again within two years.",
        m=models.CLV_MONTHS, d=models.CLV_MONTHLY_DISCOUNT,
        total=money(float(o["total"]), page), soon=int(o["soon"]), h=page.horizon,
        never=int(o["never"]))]


def actions(page: Page) -> list[Block]:
    """Section 6: the decision table per action, the campaign and why its targets are who
    they are, the segment x action view, and the policy in words."""
    d, r, cfg = page.decisions, page.decisions.retention, page.config
    period = r.get("decision_period_days", page.horizon)
    if not page.revenue_known:
        return [heading("6. Recommended actions"), paragraph(
            "Every customer gets exactly one action from the policy below. The retention "
            "contact goes to the {n:,} current customers at high churn risk: it costs {cost}; "
            "what it brings cannot be valued, and no profit is computed, because the export "
            "has no revenue.", n=r["campaign_size"], cost=money(r["campaign_cost"], page)),
            html_table(d.actions[["action", "customers", "action_cost"]],
                       formats={"customers": ",", "action_cost": ",.0f"},
                       labels={"action": "Action", "customers": "Customers",
                               "action_cost": _money_label("Cost of the action", page)}),
            *_segments_and_policy(page)]
    if r.get("method") in ("measured", "learned") and r.get("hazard_effect"):
        how = paragraph(hazard_effect_sentence(r["hazard_effect"]))
    elif r.get("method") in ("measured", "learned") and len(d.margin_uplift):
        u = d.margin_uplift.set_index("group").loc["all"]
        how = paragraph(
            "A contact was valued with {which}: contacted customers brought "
            "extra margin worth {uplift:.1%} of what they were expected to bring over the "
            "{window} days after it, compared with customers not contacted (95 % interval {lo:.1%} "
            "to {hi:.1%}), so a contact is worth that share of a customer's expected margin over "
            "{window} days, less its cost.{why}", uplift=r["uplift_rate_used"],
            which=("the past randomized campaign" if len(r.get("effect_campaigns", [])) < 2
                   else f"the {len(r['effect_campaigns'])} past randomized campaigns whose "
                   f"{r['value_window_days']} days have passed, pooled"),
            window=r["value_window_days"], lo=u["ci_low"], hi=u["ci_high"],
            why="" if (r.get("uplift_model") or {}).get("used") else (
                " That is why the campaign favours valuable customers: the measured effect is "
                "a share of what a customer brings, whatever their churn risk."))
    else:
        rate = r.get("retention_rate_used") or 0.0
        how = paragraph(
            data.absent_input_sentence("campaign", retention_rate=rate)
            + " Each kept customer is worth {months} months of margin, so a contact pays where "
            "churn risk x {rate:.0%} x that margin exceeds its cost.",
            months=cfg.strategy.retention_value_months, rate=rate)
    learned = _learned_sentence(r.get("uplift_model"), page)
    if learned:
        how += learned
    out: list[Block] = [heading("6. Recommended actions"), paragraph(
        "Every customer gets exactly one action from the policy below. The retention campaign is "
        "the {n:,} customers whose action is a retention contact ({hr:,} of them at high churn "
        "risk; {t:,} chosen because a contact is expected to pay for itself, the peak of the "
        "curve below): it costs {cost}, is expected to bring {margin} of extra margin and "
        "{profit} of extra profit after its cost over the next {p} days (ROI {roi:.0%}).",
        n=r["campaign_size"], hr=r.get("campaign_high_risk", 0),
        t=r.get("targeted_by_profit", r["campaign_size"]), cost=money(r["campaign_cost"], page),
        margin=money(r["expected_margin_saved"], page),
        profit=money(r.get("expected_incremental_profit", r["max_expected_profit"]), page),
        p=period, roi=r["roi"]), how]
    if not page.snapshot:
        out += [absent_note(name, cfg) for name in ("margin", "channel")
                if not page.inputs.get(name, True)]
    acts = d.actions
    total = acts[["customers", "revenue_12m", "action_cost", "ordinary_profit",
                  "incremental_profit", "total_profit"]].sum()
    table = pd.concat([acts, pd.DataFrame([{"action": "Total", **total.to_dict()}])],
                      ignore_index=True)
    out += [paragraph("Per action, over the next {p} days: ordinary profit is what the "
                      "customers are expected to bring less the cost to serve them; extra "
                      "profit is what the action adds after its own cost (only retention "
                      "contacts have an estimated effect); they add up to the total.", p=period),
            html_table(table, formats={c: ",.0f" for c in table.columns if c != "action"},
                       labels={"action": "Action", "customers": "Customers",
                               "revenue_12m": _money_label("Revenue, last 12 months", page),
                               "action_cost": _money_label("Cost of the action", page),
                               "ordinary_profit": _money_label("Ordinary profit", page),
                               "incremental_profit": _money_label("Extra profit", page),
                               "total_profit": _money_label("Total profit", page)}),
            plots.plot_profit_curve(d.profit_curve, r.get("targeted_by_profit",
                                                          r["campaign_size"]))]
    if len(d.margin_uplift):
        out.append(html_table(d.margin_uplift, formats={
            "n_treated": ",", "n_control": ",", "margin_treated": ",.1f",
            "margin_control": ",.1f", "uplift": ",.2f", "uplift_rate": ".1%", "ci_low": ".1%",
            "ci_high": ".1%"}, labels={
            "group": "Value tier", "n_treated": "Contacted", "n_control": "Not contacted",
            "margin_treated": "Margin per customer (contacted)",
            "margin_control": "Margin per customer (not contacted)",
            "uplift": "Extra margin per contact (adjusted)",
            "uplift_rate": "Share of expected margin added", "ci_low": "95 % interval from",
            "ci_high": "to"}))
    if len(d.retention_effect):
        out.append(html_table(d.retention_effect, formats={
            "n_treated": ",", "n_control": ",", "churn_treated": ".1%", "churn_control": ".1%",
            "retention_rate": ".1%", "ci_low": ".1%", "ci_high": ".1%"}, labels={
            "group": "Value tier", "n_treated": "Contacted", "n_control": "Not contacted",
            "churn_treated": "Churned (contacted)", "churn_control": "Churned (not contacted)",
            "retention_rate": "Would-be churners kept", "ci_low": "95 % interval from",
            "ci_high": "to"}))
    return out + _segments_and_policy(page)


def _segments_and_policy(page: Page) -> list[Block]:
    """Who gets which action by segment, and the policy in words."""
    return [paragraph("Who gets which action, by segment (customers):"),
            html_table(segment_by_action(page).reset_index(),
                       formats={c: "," for c in page.decisions.actions["action"]}),
            *_policy(page)]


def _policy(page: Page) -> list[Block]:
    """The policy in words. Where revenue is known, without the row for customers of
    unknown value (no one); where it is not, without the rows that need a value tier."""
    policy = page.config.strategy.policy or strategy.DEFAULT_POLICY
    unknown = [segments.TIER_UNKNOWN]
    shown = [row for row in policy if "value_tier" not in row
             or (row["value_tier"] == unknown) != page.revenue_known]
    return [paragraph("The policy: rows are tried in order and the first that matches names the "
                      "customer's action" + ("." if page.revenue_known else
                                             " (the rows that need a customer's value are left "
                                             "out: it is unknown).")),
            html_table(strategy.policy_table(shown), labels={
                "action": "Action", "conditions": "When", "why": "Why"})]


def hazard_effect_sentence(fit: dict) -> str:
    """How a contact is valued when its effect was measured as a lowered chance of
    stopping (``retention["hazard_effect"]``, :func:`analysis.uplift.
    estimate_hazard_effect`), in plain words with the numbers."""
    n = int(fit["n_campaigns"])
    which = ("the past randomized campaign" if n == 1 else
             f"the {n} past randomized campaigns")
    low, high = float(fit["ci_low"]), float(fit["ci_high"])
    window = int(fit["value_window_days"])
    return (
        f"A contact was valued with {which}, each followed for as long as the data allows "
        f"(up to {int(fit['window_days'])} days): customers who were contacted kept buying "
        f"longer than those who were not, as if a contact made a customer who still buys "
        f"{float(fit['effect']):.0%} less likely to stop at any time (95 % interval "
        f"{low:.0%} to {high:.0%}" + ("; it could be nil" if low <= 0 else "") + "). "
        f"A contact is worth the margin of that longer expected stay over the next {window} "
        "days, less its cost: most for a valuable customer at a real risk of stopping within "
        "that time, little for one who has already stopped or who would stay anyway.")


RANKINGS = {"model": "the learned gain of each customer",
            "pooled": "the measured effect for everyone", "churn": "churn risk"}


def _learned_sentence(summary: dict | None, page: Page) -> str:
    """What the uplift learner found on the company's own campaigns, and whether the
    campaign uses it (``retention["uplift_model"]``); "" when there was nothing to learn."""
    if not summary:
        return ""
    ev = summary.get("evaluation") or {}
    auuc = ev.get("auuc") or {}
    out = []
    if auuc:
        ranks = "; ".join(f"ranking by {RANKINGS.get(k, k)}: {money(v, page, decimals=2)}"
                          for k, v in auuc.items())
        held = ev.get("held_out_campaigns") or [ev.get("latest_campaign", "")]
        out.append(paragraph(
            "Who gains most from a contact was learned from the earlier campaigns with a "
            "control group and checked on {which} ({nt:,} contacted, {nc:,} not), which the "
            "learner never saw. Extra margin per contacted customer above contacting at "
            "random (the area under the Qini curve{avg}): {ranks}. Best: ranking by "
            "{winner}.", which=(f"the latest one, {held[0]}" if len(held) == 1 else
                                f"the {len(held)} latest ones, {_join(held)}"),
            avg="" if len(held) == 1 else ", averaged over them",
            nt=ev.get("n_treated", 0), nc=ev.get("n_control", 0), ranks=ranks,
            winner=RANKINGS.get(ev.get("winner"), ev.get("winner"))))
    fit = summary.get("fit") or {}
    weight = float(fit.get("shrinkage_weight") or 0.0)
    if summary.get("used") and weight > 0:
        out.append(paragraph(
            "The campaign values each contact by the customer's learned gain: the learner's "
            "differences between customers, kept at {w:.0%} of their size (the share the "
            "evidence supports; 0 % would be one effect for everyone).", w=weight))
    elif summary.get("used"):
        out.append(paragraph(
            "The campaigns do not show differences between customers beyond what the "
            "measured effect for everyone gives them, so each contact is valued by it."))
    elif summary.get("why"):
        out.append(paragraph("The learned gain is not used: {why}.", why=summary["why"]))
    return "".join(out)


def segment_by_action(page: Page) -> pd.DataFrame:
    """Customers per segment (rows) and action (columns)."""
    table = page.customers.crosstab(
        "SELECT segment, action, count(*) AS n FROM customers "
        "WHERE segment IS NOT NULL AND action IS NOT NULL GROUP BY ALL")
    table.columns.name = None
    return table.rename_axis("Segment")


def phaseout(page: Page) -> list[Block]:
    """Section 7: the phase-out review with its guardrails, and the fairness audit."""
    d, cfg = page.decisions, page.config
    listed = page.customers.frame(
        "SELECT count(*) AS n, coalesce(fsum(expected_revenue), 0) AS revenue, "
        "coalesce(fsum(expected_profit), 0) AS profit FROM customers "
        "WHERE phaseout_candidate").iloc[0]
    g = d.guardrails
    single = int(g["customers_remaining"].iloc[0])
    out: list[Block] = [heading("7. Phase-out review")]
    if not page.revenue_known:
        return out + [paragraph("No customer is proposed for a phase-out review: whether a "
                                "customer is unprofitable cannot be judged without revenue.")
                      ] + _fairness(page)
    if page.snapshot:
        out.append(paragraph(
            "{n:,} customers are proposed for a phase-out review (a list for a person to decide "
            "on, never an automatic termination). Without an order history, 'unprofitable over "
            "time' means that the customer's lifetime average margin is below the monthly cost "
            "to serve. On a single snapshot {single:,} customers look unprofitable.",
            n=int(listed["n"]), single=single))
    else:
        out.append(paragraph(
            "{n:,} customers are proposed for a phase-out review: a list with reasons for a "
            "person to decide on, never an automatic termination. They bring {rev} of expected "
            "revenue over the next {h} days and cost {cost} more to serve than they bring in "
            "margin. On a single snapshot {single:,} customers look unprofitable; requiring it "
            "over {k} periods, low potential, tenure and no recent complaint keeps {kept:,} of "
            "them off the list.", n=int(listed["n"]), rev=money(float(listed["revenue"]), page),
            h=page.horizon, cost=money(-float(listed["profit"]) + 0.0, page),
            single=single, k=cfg.strategy.phaseout_periods, kept=single - int(listed["n"])))
        if not page.inputs["interactions"]:
            out.append(absent_note("interactions", cfg))
    out.append(html_table(g, formats={"customers_remaining": ",", "kept_off": ","}, labels={
        "step": "Guardrail", "customers_remaining": "Customers still on the list",
        "kept_off": "Kept off by this step"}))
    if not page.snapshot:
        first = page.customers.frame(
            "SELECT customer_id, expected_profit, phaseout_reasons FROM customers "
            f"WHERE phaseout_candidate ORDER BY {', '.join(ORDER_COLUMNS)} LIMIT 10")
        out.append(html_table(first,
                              formats={"expected_profit": ",.2f"},
                              labels={"customer_id": "Customer",
                                      "expected_profit": _money_label("Expected profit", page),
                                      "phaseout_reasons": "Reasons"}))
    return out + _fairness(page)


def _fairness(page: Page) -> list[Block]:
    cfg, audit = page.config, page.decisions.fairness
    if not page.snapshot and not page.inputs["customers"]:
        return [absent_note("customers", cfg)]
    if not cfg.protected:
        return [paragraph("No protected attributes are named in the configuration, so there is "
                          "no fairness audit by group.")]
    if not len(audit):
        return []
    out: list[Block] = [paragraph(
        "Fairness audit: protected attributes ({attrs}) are not used by any model or rule. "
        "Comparing each group's rate of every action with everyone else's, a disparity is "
        "flagged when the ratio is outside {lo:.2f}-{hi:.2f} and significant after correcting "
        "for the number of comparisons.", attrs=", ".join(cfg.protected),
        lo=cfg.strategy.fairness_ratio, hi=1 / cfg.strategy.fairness_ratio)]
    flagged, rest = strategy.fairness_summary(audit, min_group=cfg.strategy.fairness_min_group)
    if len(flagged):
        out.append(html_table(
            flagged[["attribute", "group", "action", "n_group", "rate", "rate_others", "ratio"]],
            formats={"n_group": ",", "rate": ".2%", "rate_others": ".2%", "ratio": ".2f"},
            labels={"attribute": "Attribute", "group": "Group", "action": "Action",
                    "n_group": "Customers", "rate": "Rate in group",
                    "rate_others": "Rate in others", "ratio": "Ratio"}))
    return out + [paragraph("{rest}", rest=rest)]


def trust(page: Page) -> list[Block]:
    """Section 8: how well the models did, out of time (or out of fold), on the customers
    the decisions are about."""
    out: list[Block] = [heading("8. How much to trust this")]
    out += _snapshot_trust(page) if page.snapshot else _order_log_trust(page)
    profile = page.profile
    small = (profile.segments[~profile.segments["described"]] if "described" in profile.segments
             else profile.segments.iloc[:0])
    if len(small):
        out.append(paragraph(
            "{n} segment(s) have fewer than {m} customers ({names}): they are counted, but not "
            "described, as any average over so few customers would be noise.", n=len(small),
            m=page.config.analysis.min_segment_customers,
            names=", ".join(small["segment"].astype(str))))
    return out


def _snapshot_trust(page: Page) -> list[Block]:
    run = page.run
    if run is None:
        return [paragraph("No model was trained: {reason}. The numbers that would need one are "
                          "left out rather than guessed.", reason=page.skipped)]
    churn_m = run.churn_metrics.set_index("method")
    return [paragraph(
        "The churn model was tested by {k}-fold cross-validation: each customer was scored by a "
        "model that never saw them. {choice} The best single-column rule ({f}) reaches "
        "{rule:.3f}. Its average calibration error is {ece:.1%}. Enough data for this: {n:,} "
        "customers, of whom {pos:,} left.", k=run.folds,
        choice=models.describe_choice(run.chosen, churn_m, candidates=models.CHURN_CANDIDATES,
                                      names=models.PLAIN_METHOD_NAMES),
        rule=churn_m.loc["rule", "roc_auc"],
        f=explain.FEATURE_LABELS.get(run.rule_feature, run.rule_feature),
        ece=churn_m.loc[run.chosen, "ece"], n=len(run.evaluation),
        pos=int(run.evaluation["churned"].sum())),
        plots.plot_gain_curves(run.evaluation, target="churned",
                               methods=["model", "logistic", "blend", "rule"], prefix="churn_",
                               names=models.PLAIN_METHOD_NAMES),
        plots.plot_calibration(models.calibration_table(run.evaluation["churned"],
                                                        run.evaluation[f"churn_{run.chosen}"]))]


def _order_log_trust(page: Page) -> list[Block]:
    run, fallback, h = page.run, page.fallback, page.horizon
    if run is None and fallback and fallback.get("check"):
        chk = fallback["check"]
        return [paragraph(
            "No model could be trained ({reason}), so customers were scored by {method}, a model "
            "of each customer's purchase rhythm that needs no labels. Checked the one way this "
            "history allows, fitted on the data before {cut} and compared with what {n:,} "
            "customers did in the next {h} days: it told churners from stayers with an AUC of "
            "{auc} (1 is perfect, 0.5 is chance) and a Brier score of {b:.3f}; its revenue "
            "forecast was off by {mae:,.1f} per customer on average, against {lp:,.1f} for 'next "
            "period = last period', and it predicted {pt} where {at} happened.",
            reason=page.skipped, method=_plain_method(fallback["method"]), cut=chk["cutoff"],
            n=chk["n"], h=h,
            auc="n/a" if chk["churn_auc"] is None else f"{chk['churn_auc']:.3f}",
            b=chk["brier"], mae=chk["value_mae"], lp=chk["value_mae_last_period"],
            pt=money(chk["total_predicted"], page), at=money(chk["total_actual"], page))]
    if run is None and fallback:
        return [paragraph(
            "No model could be trained ({reason}), so customers were scored by {method}, which "
            "needs no labels; the history is too short to check it ({why}).",
            reason=page.skipped, method=_plain_method(fallback["method"]),
            why=fallback.get("check_skipped", ""))]
    if run is None:
        return [paragraph(
            "No model was trained: {reason}. The numbers that would need one (churn risk, model "
            "accuracy, calibration, drift) are left out rather than guessed; they appear once "
            "the data covers enough history and customers.", reason=page.skipped)]
    churn_m = (run.churn_metrics if run.churn_metrics_active is None
               else run.churn_metrics_active).set_index("method")
    value_m = run.value_metrics.set_index("method")
    tested = models.active_rows(run.evaluation)
    ev = run.cutoffs["eval"]
    population = (f"the {len(tested):,} customers still active on {ev}"
                  f"{models.evaluation_sample(run)}"
                  if len(tested) < len(run.evaluation) else None)
    out: list[Block] = [paragraph(
        "The models were tested on customers as they were on {ev}, using only what was known "
        "then, and compared with what they actually did in the next {h} days; churn risk is "
        "judged on the customers still active then, as lapsed and lost customers are easy to "
        "call and are the win-back population. {choice} A model of each customer's purchase "
        "rhythm reaches {bg:.3f} and a lookup by recency, frequency and spend {rfm:.3f}. "
        "When it says a customer has a 70 % chance of churning, the observed rate is close "
        "to that: its average "
        "calibration error is {ece:.1%}.", ev=ev, h=h,
        choice=models.describe_choice(run.churn_chosen, churn_m,
                                      candidates=models.CHURN_CANDIDATES, population=population,
                                      names=models.PLAIN_METHOD_NAMES),
        bg=churn_m.loc["bgnbd", "roc_auc"], rfm=churn_m.loc["rfm", "roc_auc"],
        ece=churn_m.loc[run.churn_chosen, "ece"]),
        paragraph("{choice} It predicted {pred} in total where {act} happened.",
                  choice=models.describe_choice(run.value_chosen, value_m,
                                                candidates=models.VALUE_CANDIDATES,
                                                kind="value", names=models.PLAIN_METHOD_NAMES),
                  pred=money(value_m.loc[run.value_chosen, "total_predicted"], page),
                  act=money(value_m.loc[run.value_chosen, "total_actual"], page)),
        plots.plot_gain_curves(tested, target="churned",
                               methods=["model", "logistic", "blend", "bgnbd", "rfm"],
                               prefix="churn_", names=models.PLAIN_METHOD_NAMES),
        plots.plot_calibration(models.calibration_table(tested["churned"],
                                                        tested[f"churn_{run.churn_chosen}"]))]
    out += _win_back_accuracy(page)
    groups = models.metrics_by_group(tested, by="frequency", churn_method=run.churn_chosen,
                                     value_method=run.value_chosen)
    one = groups.set_index("group")
    if "1 purchase day" in one.index:
        out.append(paragraph(
            "Trust it least for customers who have bought on a single day ({n:,} in the test): "
            "they have no rhythm of their own yet; the churn AUC for them is {auc:.2f}.",
            n=int(one.loc["1 purchase day", "n"]), auc=one.loc["1 purchase day", "churn_auc"]))
    out.append(html_table(groups, formats={
        "n": ",", "churn_rate": ".0%", "churn_auc": ".3f", "value_mae": ",.1f",
        "value_mae_last_period": ",.1f"}, labels={
        "group": "History", "n": "Customers", "churn_rate": "Churned", "churn_auc": "Churn AUC",
        "value_mae": "Value error (forecast used)",
        "value_mae_last_period": "Value error (last period)"}))
    if run.drift is not None and len(run.drift):
        shifted = run.drift[run.drift["level"] != "stable"]
        out.append(paragraph(
            "Data drift between the training snapshots and today: {n} of {m} features moved "
            "noticeably{who}.", n=len(shifted), m=len(run.drift),
            who=(": " + ", ".join(explain.FEATURE_LABELS.get(f, f) for f in shifted["feature"]))
            if len(shifted) else ""))
    out.append(paragraph(
        "Enough data for this: the models learned from {n_train:,} customer snapshots and were "
        "tested on {n_eval:,} customers{sample}; {n_active:,} of them were still active, and "
        "{pos:,} of those churned.", n_train=run.sizes["train"], n_eval=len(run.evaluation),
        sample=models.evaluation_sample(run),
        n_active=len(tested), pos=int(tested["churned"].sum())))
    return out


#: The strategy parameters as the assumptions table names them: (name, unit, meaning).
ASSUMPTION_WORDS = {
    "margin_rate": ("Margin rate", "share of revenue",
                    "kept as margin where the data has no margin"),
    "cost_per_order": ("Cost per order", "money", "to serve one order (other channels)"),
    "cost_per_order_by_channel": ("Cost per order by channel", "money",
                                  "to serve one order through each channel"),
    "cost_per_complaint": ("Cost per complaint", "money", "to handle one complaint"),
    "cost_per_account_year": ("Cost per account", "money a year", "to keep an account open"),
    "contact_cost": ("Cost of a retention contact", "money", "per customer contacted"),
    "offer_cost": ("Cost of the retention offer", "money", "per customer contacted"),
    "retention_rate": ("Would-be churners kept by a contact", "share",
                       "assumed when the data has no past campaign"),
    "retention_value_months": ("Worth of a kept customer", "months of margin",
                               "when the data has no past campaign"),
    "high_risk": ("High churn risk from", "probability",
                  "'likely to churn' and the high-risk band"),
    "growth_ratio": ("Growth potential from", "times last period's value",
                     "predicted value over past value"),
    "phaseout_periods": ("Phase-out: unprofitable periods", "periods",
                         "in a row before a review is proposed"),
    "phaseout_max_tenure_days": ("Phase-out: longest tenure", "days",
                                 "longer-standing customers are kept off the list"),
    "phaseout_large_loss": ("Phase-out: large loss", "money per period",
                            "above which tenure does not keep a customer off"),
    "phaseout_min_loss": ("Phase-out: smallest loss", "money per period",
                          "smaller forecast losses are noise, not a reason"),
    "phaseout_complaint_days": ("Phase-out: after a complaint", "days",
                                "no review this soon after a complaint"),
    "warning_gap_multiple": ("Warning: overdue at", "times the usual gap",
                             "no order for this long"),
    "warning_spend_drop": ("Warning: spend drop of", "share", "last 90 days against the 90 before"),
    "warning_satisfaction": ("Warning: satisfaction at or below", "score", "last survey answer"),
    "warning_churn": ("Warning: churn risk at or above", "probability", ""),
    "warning_churn_rise": ("Warning: churn risk risen by", "points of probability",
                           "since the previous run"),
    "fairness_ratio": ("Fairness: flag a rate ratio below", "ratio",
                       "or above its inverse (the four-fifths rule)"),
    "fairness_p_value": ("Fairness: significance", "p-value", "after correcting for many tests"),
    "fairness_min_group": ("Fairness: smallest group judged", "customers",
                           "smaller groups are listed, not tested"),
}


def _win_back_accuracy(page: Page) -> list[Block]:
    """The win-back population's own estimate: how well the scoring method's chance of
    ordering again (one minus the churn probability) told, among the customers lapsed or
    lost at the evaluation cutoff, who came back."""
    run = page.run
    ev = run.evaluation
    if "lifecycle_stage" not in ev:
        return []
    gone = ev[ev["lifecycle_stage"].isin(segments.WIN_BACK_STAGES)]
    back = 1 - gone["churned"].astype(float)
    if len(gone) < 50 or back.sum() < 10 or (1 - back).sum() < 10:
        return []
    chance = 1 - gone[f"churn_{run.churn_chosen}"]
    return [paragraph(
        "The win-back population is judged on its own: of the {n:,} customers already lapsed "
        "or lost on {ev}{sample}, {r:.1%} ordered again within {h} days, against {p:.1%} "
        "expected; the chance of ordering again told who would with an AUC of {auc:.3f}.",
        n=len(gone), ev=run.cutoffs["eval"], sample=models.evaluation_sample(run),
        r=back.mean(), p=chance.mean(), h=page.horizon,
        auc=roc_auc_score(back, chance))]


def assumptions(page: Page) -> pd.DataFrame:
    """Every assumption of the run as a labelled table: name, value, unit, meaning."""
    cfg = page.config
    unit = lambda u: u.replace("money", page.currency or "money")   # noqa: E731
    if page.snapshot:
        p = cfg.snapshot
        rows = [("Export date", page.profile.as_of.isoformat(), "date", "the data's situation"),
                ("Churn label: value meaning 'left'", p.churn_positive, "", ""),
                ("Churn label period", p.churn_period_months, "months", ""),
                ("Tenure unit", p.tenure_unit, "", ""),
                ("Recurring revenue per", p.revenue_period, "", ""),
                ("Discount rate", p.discount_rate, "share a year", "for the remaining value"),
                ("Remaining value counted for at most", p.max_years, "years", "")]
    else:
        a = cfg.analysis
        rows = [("Scoring date", page.profile.as_of.isoformat(), "date",
                 "every record before this day is used"),
                ("Lifecycle: at risk beyond", a.lifecycle_at_risk_gap_multiple,
                 "times the own rhythm", "without an order"),
                ("Lifecycle: lapsed beyond", a.lifecycle_lapsed_gap_multiple,
                 "times the own rhythm", "without an order"),
                ("Lifecycle: new within", a.lifecycle_new_days, "days",
                 "of the first purchase")]
    rows += [("Value tiers", ", ".join(f"{s:.0%}" for s in cfg.analysis.tier_shares),
              "share of value", "held by the high and the mid tier"),
             ("Protected attributes", ", ".join(cfg.protected) or "none", "",
              "never used in a decision; audited for fairness")]
    for key, raw in cfg.strategy.table().itertuples(index=False):
        name, u, meaning = ASSUMPTION_WORDS.get(key, (key.replace("_", " "), "", ""))
        shown = (", ".join(f"{k} {v:g}" for k, v in raw.items()) if isinstance(raw, dict)
                 else raw)
        rows.append((name, shown, unit(u), meaning))
    return pd.DataFrame(rows, columns=["assumption", "value", "unit", "meaning"]).astype(
        {"value": "object"})


def data_and_assumptions(page: Page) -> list[Block]:
    """Section 9: what was read and set aside, what the data lacks, and every assumption."""
    out: list[Block] = [heading("9. Data quality and assumptions")]
    for t in page.quality["tables"]:
        out.append(paragraph("{table}: {read:,} rows read, {ok:,} used, {bad:,} set aside with "
                             "a reason (see the quarantine files).", table=t["table"],
                             read=t["rows_read"], ok=t["rows_processed"],
                             bad=t["rows_quarantined"]))
        matched = t.get("customers_in_order_log")
        if matched is not None and t["customers"] and matched < 0.5 * t["customers"]:
            out.append(paragraph(
                "<b>Only {m:,} of the {n:,} customers in the {table} table have an order in "
                "the order log.</b> When the two files write customer ids differently "
                "(leading zeros, a prefix, spaces), that table's rows concern no customer "
                "here: check the ids.", m=matched, n=t["customers"], table=t["table"]))
    if page.snapshot:
        missing = [m for m in page.quality.get("missing", []) if m["n_missing"] > 0]
        if missing:
            out.append(paragraph("Blank values (counted as missing, not guessed): {m}.",
                                 m=", ".join(
                f"{m['column']} {m['n_missing']:,}" for m in missing)))
        types = page.run.types if page.run is not None else snapshot.feature_types(
            pd.read_parquet(page.processed_dir / "clean" / "customers.parquet"),
            exclude=page.config.protected + page.config.pii)
        out += [paragraph("How each column of the export is used:"),
                html_table(types[["column", "kind", "reason", "n_blank"]],
                           formats={"n_blank": ","},
                           labels={"column": "Column", "kind": "Used as", "reason": "Why",
                                   "n_blank": "Blank"})]
    else:
        absent = [name for name, present in page.inputs.items() if not present]
        if absent:
            out.append(paragraph("What the data did not include, and what that means here:"))
            out += [absent_note(name, page.config) for name in absent]
    return out + [paragraph("The assumptions of this run (set in the configuration):"),
                  html_table(assumptions(page), labels={
                      "assumption": "Assumption", "value": "Value", "unit": "Unit",
                      "meaning": "Meaning"})]


def for_analysts(page: Page) -> list[Block]:
    """Links to the analyst notebooks (inside the report folder) and where the full
    customer table is."""
    pages = ([("Data quality", "01_data_quality"), ("Churn model", "snapshot_02_churn_model"),
              ("Portfolio and value", "snapshot_03_portfolio"),
              ("Strategy", "snapshot_05_strategy")] if page.snapshot else
             [("Data quality", "01_data_quality"), ("Customer profile", "02_customer_profile"),
              ("Churn model", "03_churn_model"), ("Value model", "04_value_model"),
              ("Strategy", "05_strategy")])
    return [heading("For analysts"),
            link_list([(f"{name} notebook (with code)", f"notebooks/{stem}.html")
                       for name, stem in pages]),
            paragraph("The full customer table (every column, one row per customer) is "
                      "customers.csv in the run's data folder, {where}.",
                      where=page.processed_href or "beside the report")]


# --------------------------------------------------------------------------- lists


def list_name(action: str) -> str:
    """The file name of an action's list: ``"Retain - personal outreach"`` ->
    ``"retain-personal-outreach.csv"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", action.lower()).strip("-") or "action"
    return f"{slug}.csv"


def write_lists(processed_dir: str | Path, out_dir: str | Path, *,
                memory_limit: str | None = None) -> dict[str, int]:
    """One CSV per action (its customers, best expected extra profit first, then highest
    churn risk) and ``alerts.csv`` (every early warning with the rule that fired and the
    customer's action), written for spreadsheets (:func:`analysis.data.write_csv`). Each
    list is streamed from the run store (:meth:`RunStore.stream`, DuckDB within
    ``memory_limit``, in one pass), so no list is held whole, whatever the number of
    customers.

    Returns
    -------
    dict
        File name -> rows.
    """
    processed_dir, out_dir = Path(processed_dir), Path(out_dir)
    store = RunStore(processed_dir)
    columns = store.wanted(LIST_COLUMNS)
    # (one pass: the customers sorted by action, then as each list has them, a part at a
    # time; each action's parts go to its file)
    parts = ((str(action), part)
             for frame in store.stream(columns, grouped_by="action", memory_limit=memory_limit,
                                       largest_first=("incremental_profit", "churn_probability"))
             for action, part in frame.groupby("action", sort=False))
    written = {}
    for action, group in itertools.groupby(parts, key=lambda pair: pair[0]):
        counted = []
        data.write_csv_frames(out_dir / list_name(action),
                              (counted.append(len(part)) or part for _, part in group))
        written[list_name(action)] = sum(counted)
    # every warning with its customer's action, in the warnings' order, a part at a time
    con = duck_connection(memory_limit)
    try:
        reader = con.sql(
            f"SELECT a.* EXCLUDE ({', '.join(SCAN_ORDER)}), c.action "
            f"FROM {parquet_scan(store.alerts_table, ordered=True)} AS a "
            f"LEFT JOIN ({store.joined_sql(['action'])}) AS c ON c.customer_id = a.customer_id "
            f"ORDER BY {', '.join('a.' + c for c in SCAN_ORDER)}").to_arrow_reader(STREAM_ROWS)
        counted = []
        data.write_csv_frames(out_dir / "alerts.csv", _at_least_one(
            counted.append(batch.num_rows) or batch.to_pandas() for batch in reader))
    finally:
        con.close()
    written["alerts.csv"] = sum(counted)
    return written


def _at_least_one(frames):
    """``frames``, or one empty frame when there is none (a CSV's header alone)."""
    sent = False
    for frame in frames:
        sent = True
        yield frame
    if not sent:
        yield pd.DataFrame(columns=["customer_id", "rule", "detail", "action"])


def lists(page: Page) -> list[Block]:
    """Links to the lists in the report folder, with what each holds."""
    folder = page.report_dir / LISTS_DIR
    acts = page.decisions.actions.set_index("action")["customers"]
    items = [(f"{action}: {n:,} customer{'s' if n != 1 else ''}",
              f"{LISTS_DIR}/{list_name(action)}")
             for action, n in acts.items() if (folder / list_name(action)).is_file()]
    if (folder / "alerts.csv").is_file():
        counted = strategy.alert_counts(page.processed_dir)
        rules = counted["by_rule"]
        said = ", ".join(f"{k} {v:,}" for k, v in zip(rules["rule"], rules["alerts"],
                                                       strict=True))
        items.append((f"Early warnings: {counted['alerts']:,} on {counted['customers']:,} "
                      "customers" + (f" ({said})" if len(rules) else ""),
                      f"{LISTS_DIR}/alerts.csv"))
    if not items:
        return []
    return [heading("Lists to act on", 3),
            paragraph("One file per action, with each customer's reasons, churn chance, "
                      "expected value and expected extra profit (open in a spreadsheet):"),
            link_list(items), *_whose_reasons(page)]


def _whose_reasons(page: Page) -> list[Block]:
    """Which customers carry their own reasons in words, when not all of them do."""
    sizes = getattr(page.run, "sizes", None) or {}
    if models.customers_with_reasons(sizes) >= sizes.get("score", 0):
        return []
    n = RunStore(page.processed_dir).known("reasons")
    return [paragraph(
        "Reasons in words are given for {n:,} of the {total:,} customers: everyone a person "
        "reads about (the retention, win-back and phase-out review lists, early warnings, the "
        "{top} highest churn chances and values) and a random sample of {sample:,}, which "
        "also gives the overall drivers; any other customer's reasons are computed on "
        "request. The reasons behind a customer's predicted value are given for the "
        "phase-out review and the {top} highest values.",
        n=n, top=strategy.TOP_OF_TABLE, sample=sizes["explained"], total=sizes["score"])]
