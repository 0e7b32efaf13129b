"""Snapshot (subscription) mode: churn, value and segments from one table per customer
with a churn flag, as telecom, SaaS, insurance and banking systems export them.

There is no order log, so no recency, rhythm or RFM. Instead:

- every other column becomes a feature by automatic typing (:func:`feature_types`):
  numeric, low-cardinality categorical (XGBoost's native categoricals), or excluded
  (ids, free text, constants, protected and personal columns), blanks counted;
- calibrated XGBoost, logistic regression and their blend are judged by stratified
  k-fold cross-validation with an out-of-fold prediction for every customer, against the
  best one-feature rule, all in the same folds; the one that scores the customers is
  chosen on held-out parts of the training folds (:func:`fit_churn_cv`);
- value is the recurring revenue times the expected remaining lifetime, from the churn
  probability per label period, discounted and capped (:func:`remaining_value`), with
  Kaplan-Meier tenure survival curves by segment as the descriptive view
  (:func:`kaplan_meier`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from analysis.config import DAYS_PER_MONTH, Config, SnapshotParams
from analysis.errors import InsufficientDataError
from analysis.explain import reason_codes
from analysis.models import (
    CHURN_CANDIDATES,
    ChurnModel,
    LogisticChurn,
    candidate_contributions,
    candidate_probabilities,
    choice_record,
    chosen_method,
    churn_metrics,
    churn_selection,
    read_choice,
)
from analysis.segments import (
    STAGE_ACTIVE,
    STAGE_LOST,
    STAGE_NEW,
    TIER_UNKNOWN,
    CustomerProfile,
    cluster_customers,
    lifecycle_counts,
    pareto_curve,
    segment_profile,
    tier_summary_of,
    value_tiers,
    write_profile,
)

__all__ = [
    "SnapshotRun",
    "feature_types",
    "fit_churn_cv",
    "horizon_days",
    "kaplan_meier",
    "model_step",
    "one_feature_rule",
    "profile_snapshot",
    "read_snapshot_run",
    "remaining_value",
    "scoring_date",
    "snapshot_matrix",
    "tenure_cohorts",
    "write_snapshot_run",
]

#: Contract columns that are labels or keys, never features.
NOT_FEATURES = {"customer_id", "churn", "signup_date"}


# --------------------------------------------------------------------------- typing


def feature_types(frame: pd.DataFrame, *, exclude: tuple[str, ...] = (),
                  max_levels: int = 30) -> pd.DataFrame:
    """How each column is used: ``numeric``, ``categorical`` or ``excluded`` (why).

    Text whose non-blank values are (almost all) numbers is numeric, with blanks such as
    ``" "`` as missing; text with at most ``max_levels`` distinct values (and fewer than
    half the rows) is categorical; text with nearly one value per row is an id, other
    many-valued text is free text; both are excluded, as are constants and the columns
    in ``exclude`` (protected attributes, PII).

    Returns
    -------
    DataFrame
        ``column``, ``kind``, ``reason``, ``n_blank``, ``n_levels``.
    """
    excluded = {c.casefold() for c in exclude}
    rows = []
    for col in frame.columns:
        s = frame[col]
        if col in NOT_FEATURES:
            rows.append((col, "excluded", "key or label", 0, 0))
            continue
        if col.casefold() in excluded:
            rows.append((col, "excluded", "protected or personal (never a model input)",
                         0, 0))
            continue
        if pd.api.types.is_bool_dtype(s) or isinstance(s.dtype, pd.BooleanDtype):
            rows.append((col, "categorical", "two values", int(s.isna().sum()), 2))
            continue
        if pd.api.types.is_numeric_dtype(s):
            if _running_number(s):
                rows.append((col, "excluded", RUNNING_NUMBER, int(s.isna().sum()),
                             int(s.nunique())))
                continue
            kind = "numeric" if s.nunique() > 1 else "excluded"
            rows.append((col, kind, "numbers" if kind == "numeric" else "a single value",
                         int(s.isna().sum()), int(s.nunique())))
            continue
        text = s.astype("string").str.strip()
        blank = text.isna() | (text == "")
        filled = int((~blank).sum())
        numbers = pd.to_numeric(text.where(~blank), errors="coerce")
        levels = int(text[~blank].nunique())
        if filled and numbers.notna().sum() == filled and _running_number(numbers):
            rows.append((col, "excluded", RUNNING_NUMBER, int(blank.sum()), levels))
        elif filled and numbers.notna().sum() >= 0.98 * filled and levels > 2:
            rows.append((col, "numeric", "numbers stored as text",
                         int(blank.sum() + (numbers.isna() & ~blank).sum()), levels))
        elif levels <= 1:
            rows.append((col, "excluded", "a single value", int(blank.sum()), levels))
        elif levels <= max_levels and levels < max(0.5 * filled, 3):
            rows.append((col, "categorical", f"{levels} values", int(blank.sum()), levels))
        elif levels >= 0.9 * filled:
            rows.append((col, "excluded", "id-like: almost every value is different",
                         int(blank.sum()), levels))
        else:
            rows.append((col, "excluded", f"free text: {levels} different values",
                         int(blank.sum()), levels))
    return pd.DataFrame(rows, columns=["column", "kind", "reason", "n_blank", "n_levels"])


RUNNING_NUMBER = "id-like: a running number (whole numbers, each once, nearly without gaps)"


def _running_number(values: pd.Series) -> bool:
    """Whether ``values`` count rows rather than measure anything: at least 50 whole
    numbers, each once, spanning at most one and a half times their count (a row number,
    a sequential account number). Fifty measured whole numbers (an age, a credit score)
    that are all different and that dense are not met by chance."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) < 50 or not np.isfinite(v).all() or not (v == np.round(v)).all():
        return False
    return len(np.unique(v)) == len(v) and v.max() - v.min() + 1 <= 1.5 * len(v)


def snapshot_matrix(frame: pd.DataFrame, types: pd.DataFrame) -> pd.DataFrame:
    """The model matrix: numeric columns as float (blanks missing), categoricals as
    pandas categoricals with the levels seen (sorted, so runs are reproducible)."""
    out = {}
    for row in types.itertuples():
        if row.kind == "numeric":
            s = frame[row.column]
            if not pd.api.types.is_numeric_dtype(s):
                s = pd.to_numeric(s.astype("string").str.strip(), errors="coerce")
            out[row.column] = s.astype("float64")
        elif row.kind == "categorical":
            text = frame[row.column].astype("string").str.strip()
            text = text.where(text.notna() & (text != ""), None).astype("object")
            out[row.column] = pd.Categorical(text, categories=sorted(text.dropna().unique()))
    return pd.DataFrame(out, index=frame.index)


# --------------------------------------------------------------------------- churn model


def one_feature_rule(X: pd.DataFrame, y: np.ndarray) -> tuple[str, dict]:
    """The single feature whose levels (quintiles for numbers) best separate churners in
    ``X, y``, with the churn rate per level: the rule a manager would write by hand.

    Returns
    -------
    (feature, rule) where ``rule`` has ``edges`` (numeric) or ``rates`` per level and
    ``default`` (the overall rate).
    """
    from sklearn.metrics import roc_auc_score

    best, best_auc, best_rule = None, -1.0, {}
    for col in X.columns:
        rule = _fit_rule(X[col], y)
        scores = _apply_rule(X[col], rule)
        auc = roc_auc_score(y, scores) if len(set(y)) == 2 else 0.5
        if auc > best_auc:
            best, best_auc, best_rule = col, auc, rule
    return best, best_rule


def _fit_rule(x: pd.Series, y: np.ndarray) -> dict:
    default = float(np.mean(y))
    if isinstance(x.dtype, pd.CategoricalDtype):
        keys = x.astype("object").fillna("(blank)")
        rates = pd.Series(y).groupby(keys.to_numpy()).mean()
        return {"rates": {str(k): float(v) for k, v in rates.items()}, "default": default}
    values = x.to_numpy(dtype=float)
    edges = np.unique(np.nanquantile(values, [0.2, 0.4, 0.6, 0.8])) if np.isfinite(
        values).any() else np.array([])
    bins = np.where(np.isnan(values), -1, np.searchsorted(edges, values, side="right"))
    rates = pd.Series(y).groupby(bins).mean()
    return {"edges": edges.tolist(), "rates": {int(k): float(v) for k, v in rates.items()},
            "default": default}


def _apply_rule(x: pd.Series, rule: dict) -> np.ndarray:
    if "edges" not in rule:
        keys = x.astype("object").fillna("(blank)").astype(str)
        return keys.map(rule["rates"]).fillna(rule["default"]).to_numpy(dtype=float)
    values = x.to_numpy(dtype=float)
    bins = np.where(np.isnan(values), -1, np.searchsorted(rule["edges"], values,
                                                         side="right"))
    return pd.Series(bins).map(rule["rates"]).fillna(rule["default"]).to_numpy(dtype=float)


@dataclass
class SnapshotRun:
    """The snapshot model step: cross-validated churn candidates and baselines, and the
    one chosen to score the customers.

    Attributes
    ----------
    churn : the XGBoost model refitted on every customer (saved; its calibration is
        reported).
    logistic : the logistic regression refitted on every customer.
    chosen : the method whose out-of-fold probabilities score the customers (one of
        :data:`analysis.models.CHURN_CANDIDATES`).
    selection : the inner held-out scores the choice was made on
        (:func:`analysis.models.churn_selection`).
    types : :func:`feature_types` of the input.
    evaluation : one row per customer: ``customer_id``, ``churned`` and the out-of-fold
        probability of each method (``churn_model``, ``churn_logistic``, ``churn_blend``,
        ``churn_rule``).
    churn_metrics : one row per method (out of fold).
    rule_feature : the feature of the one-feature rule (chosen in each fold; the most
        frequent choice).
    scores : ``customer_id``, ``churn_probability`` (out of fold, from the chosen
        method), ``churn_reasons``.
    churn_shap, score_features : SHAP values of the chosen method refitted on every
        customer (log-odds, see :func:`analysis.models.candidate_contributions`) and the
        model matrix (same rows).
    """

    churn: object
    types: pd.DataFrame
    evaluation: pd.DataFrame
    churn_metrics: pd.DataFrame
    rule_feature: str
    scores: pd.DataFrame
    churn_shap: pd.DataFrame
    score_features: pd.DataFrame
    folds: int
    logistic: object = None
    chosen: str = "model"
    selection: pd.DataFrame | None = None


def fit_churn_cv(customers: pd.DataFrame, *, params: SnapshotParams,
                 exclude: tuple[str, ...] = (), seed: int = 42, device: str = "cpu",
                 min_customers: int = 200, min_class: int = 20) -> SnapshotRun:
    """Stratified k-fold cross-validation of calibrated XGBoost, logistic regression and
    their blend against the one-feature rule, with the method that scores the customers
    chosen inside the training folds; every customer gets an out-of-fold probability
    from models that never saw them.

    In each outer fold the training part is used twice:

    - *inner*: a held-out quarter of it (stratified) is scored by the candidates fitted
      on the other three quarters; these inner predictions choose;
    - *outer*: the candidates fitted on the whole training part score the fold's test
      customers; these out-of-fold predictions give every method's reported metrics.

    Each fit splits its data again (75/25, stratified) for XGBoost's early stopping and
    calibration choice; the logistic regression uses all of it. The choice is made once,
    on the inner predictions of all folds pooled: the lowest log loss, Brier breaking
    ties (:func:`analysis.models.churn_selection`); the customers' probabilities are the
    chosen method's out-of-fold ones. No outer test customer is used to fit, stop,
    calibrate or choose within its own fold; pooled over folds, the choice has seen
    every customer's label once in an inner part, so the chosen method's out-of-fold
    figures carry the small optimism of picking the best of three, which is why every
    method's figures are reported beside it. The candidates refitted on everyone (the
    XGBoost model as before, on a 75/25 split) give the SHAP drivers and reason codes of
    the chosen method.

    Raises
    ------
    InsufficientDataError
        With fewer than ``min_customers`` labelled customers or ``min_class`` churners
        or stayers.
    """
    data = customers[customers["churn"].notna()].reset_index(drop=True)
    y = data["churn"].astype(bool).to_numpy().astype(int)
    n_pos = int(y.sum())
    if len(data) < min_customers or min(n_pos, len(y) - n_pos) < max(min_class,
                                                                     params.cv_folds):
        raise InsufficientDataError(
            f"{len(data):,} labelled customers ({n_pos:,} churned): at least "
            f"{min_customers} customers and {min_class} churners and {min_class} "
            f"customers who stayed are needed for a meaningful model")
    types = feature_types(data, exclude=exclude)
    X = snapshot_matrix(data, types)
    if X.empty:
        raise InsufficientDataError("no column can be used as a model feature "
                                    "(see the feature typing table)")
    oof = {m: np.zeros(len(y)) for m in (*CHURN_CANDIDATES, "rule")}
    inner = {m: [] for m in CHURN_CANDIDATES}
    inner_y, rule_choices = [], []
    folds = StratifiedKFold(params.cv_folds, shuffle=True, random_state=seed)
    for train, test in folds.split(X, y):
        rest, held = train_test_split(train, test_size=0.25, stratify=y[train],
                                      random_state=seed)
        p = candidate_probabilities(*_fit_candidates(X, y, rest, seed=seed, device=device),
                                    X.iloc[held])
        for m in CHURN_CANDIDATES:
            inner[m].append(p[m])
        inner_y.append(y[held])
        p = candidate_probabilities(*_fit_candidates(X, y, train, seed=seed, device=device),
                                    X.iloc[test])
        for m in CHURN_CANDIDATES:
            oof[m][test] = p[m]
        feature, rule = one_feature_rule(X.iloc[train], y[train])
        rule_choices.append(feature)
        oof["rule"][test] = _apply_rule(X.iloc[test][feature], rule)
    selection = churn_selection(np.concatenate(inner_y),
                                {m: np.concatenate(v) for m, v in inner.items()})
    chosen = chosen_method(selection)
    final, logistic = _fit_candidates(X, y, np.arange(len(y)), seed=seed, device=device)
    evaluation = pd.DataFrame({"customer_id": data["customer_id"], "churned": y,
                               **{f"churn_{m}": v for m, v in oof.items()}})
    metrics = pd.DataFrame([{"method": m, **churn_metrics(y, oof[m])} for m in oof])
    shap = candidate_contributions(chosen, final, logistic, X)
    readable = X.copy()
    for col in readable.columns:
        if isinstance(readable[col].dtype, pd.CategoricalDtype):
            readable[col] = readable[col].astype("object")
    scores = pd.DataFrame({
        "customer_id": data["customer_id"].to_numpy(),
        "churn_probability": oof[chosen],
        "churn_reasons": reason_codes(shap.reset_index(drop=True),
                                      readable.reset_index(drop=True)).to_numpy()})
    return SnapshotRun(churn=final, logistic=logistic, chosen=chosen, selection=selection,
                       types=types, evaluation=evaluation, churn_metrics=metrics,
                       rule_feature=pd.Series(rule_choices).mode().iloc[0],
                       scores=scores, churn_shap=shap, score_features=X,
                       folds=params.cv_folds)


def _fit_candidates(X: pd.DataFrame, y: np.ndarray, rows: np.ndarray, *, seed: int,
                    device: str):
    """Calibrated XGBoost (stopped early and calibrated on a stratified quarter of
    ``rows``) and the logistic regression (on all of ``rows``)."""
    fit_idx, stop_idx = train_test_split(rows, test_size=0.25, stratify=y[rows],
                                         random_state=seed)
    model = ChurnModel(seed=seed, device=device).fit(X.iloc[fit_idx], y[fit_idx],
                                                     X.iloc[stop_idx], y[stop_idx])
    return model, LogisticChurn().fit(X.iloc[rows], y[rows])


# --------------------------------------------------------------------------- value


def remaining_value(p_period: np.ndarray, revenue_month: np.ndarray, *,
                    params: SnapshotParams) -> tuple[np.ndarray, np.ndarray]:
    """Expected remaining months and value of each customer.

    With a churn probability ``p`` per label period of ``churn_period_months``, the
    monthly survival is ``s = (1 - p) ** (1 / period)``; the expected discounted months
    still paid over the next ``max_years`` are ``sum_{t=1..T} (s / (1 + d)) ** t`` with
    ``d`` the monthly discount rate. Value = months x monthly recurring revenue.

    Returns
    -------
    (months, value), both discounted.
    """
    p = np.clip(np.asarray(p_period, dtype=float), 1e-6, 1 - 1e-6)
    s = (1 - p) ** (1 / params.churn_period_months)
    d = (1 + params.discount_rate) ** (1 / 12) - 1
    q = s / (1 + d)
    horizon = params.max_years * 12
    months = q * (1 - q ** horizon) / (1 - q)
    return months, months * np.asarray(revenue_month, dtype=float)


def kaplan_meier(tenure: pd.Series, churned: pd.Series, *,
                 by: pd.Series | None = None) -> pd.DataFrame:
    """Kaplan-Meier survival over tenure (churn = event, still a customer = censored),
    overall and per group of ``by``.

    Returns
    -------
    DataFrame
        ``group``, ``tenure``, ``at_risk``, ``events``, ``survival``, and per group
        ``median_tenure`` (first tenure with survival <= 0.5, missing if never).
    """
    frame = pd.DataFrame({"t": pd.to_numeric(tenure, errors="coerce"),
                          "e": churned.astype(float)}).dropna()
    groups = [("all", frame)]
    if by is not None:
        keys = by.loc[frame.index].astype("object").fillna("(blank)")
        groups += [(str(g), frame[keys == g]) for g in sorted(keys.unique(), key=str)]
    rows = []
    for name, part in groups:
        if part.empty:
            continue
        table = part.groupby("t")["e"].agg(["size", "sum"]).sort_index()
        at_risk = table["size"][::-1].cumsum()[::-1]
        survival = np.cumprod(1 - table["sum"] / at_risk)
        median = survival.index[survival.to_numpy() <= 0.5]
        for t, n, ev, s in zip(table.index, at_risk, table["sum"], survival, strict=True):
            rows.append({"group": name, "tenure": float(t), "at_risk": int(n),
                         "events": int(ev), "survival": float(s),
                         "median_tenure": float(median[0]) if len(median) else np.nan})
    return pd.DataFrame(rows)


def tenure_cohorts(customers: pd.DataFrame, *, edges=(0, 6, 12, 24, 48, np.inf)
                   ) -> pd.DataFrame:
    """Customers, churn rate and revenue by tenure band (months).

    Returns
    -------
    DataFrame
        ``tenure_band``, ``customers``, ``churned``, ``churn_rate``, ``monthly_revenue``.
    """
    labels = [f"{a:.0f}-{b:.0f} months" if np.isfinite(b) else f"{a:.0f}+ months"
              for a, b in zip(edges[:-1], edges[1:], strict=True)]
    band = pd.cut(customers["tenure_months"], list(edges), labels=labels, right=False)
    out = (customers.assign(tenure_band=band, churned=customers["churn"].astype(float))
           .groupby("tenure_band", observed=False)
           .agg(customers=("customer_id", "size"), churned=("churned", "sum"),
                monthly_revenue=("revenue_month", "sum")).reset_index())
    if customers["revenue_month"].isna().all():      # an export without revenue: unknown,
        out["monthly_revenue"] = np.nan              # not 0
    out["churn_rate"] = out["churned"] / out["customers"].where(out["customers"] > 0)
    out["tenure_band"] = out["tenure_band"].astype(str)
    return out[["tenure_band", "customers", "churned", "churn_rate", "monthly_revenue"]]


# --------------------------------------------------------------------------- profile


def profile_snapshot(customers: pd.DataFrame, *, config: Config, as_of,
                     scores: pd.DataFrame | None = None):
    """The profile of a snapshot: a :class:`analysis.segments.CustomerProfile` whose
    customer table has the columns the strategy and the report share with the
    transactional mode, and whose ``cohorts`` are tenure bands (:func:`tenure_cohorts`).

    ``revenue_month`` (recurring revenue per month), ``spend_365d`` (12 of it: the
    annual run rate), ``tenure_months``, ``value_tier`` (by recurring revenue,
    ``analysis.tier_shares``), ``lifecycle_stage`` (``lost`` when the label says the
    customer left, ``new`` within ``snapshot.new_months``, else ``active``), ``segment``
    (behaviour cluster over the numeric features), ``churn_probability`` (from
    ``scores``; missing without a model), ``predicted_value`` (expected revenue over
    the horizon), ``remaining_months`` and ``remaining_value`` (discounted).
    """
    p = config.snapshot
    c = customers.reset_index(drop=True).copy()
    if len(c) < config.analysis.min_customers:
        raise InsufficientDataError(
            f"{len(c):,} customer(s): a customer strategy needs at least "
            f"{config.analysis.min_customers} (analysis.min_customers)")
    revenue = c["recurring_revenue"] if "recurring_revenue" in c else pd.Series(np.nan, c.index)
    tenure_m = (c["tenure"] * p.tenure_months_per_unit if "tenure" in c
                else pd.Series(np.nan, c.index))
    if revenue.isna().all() and "total_revenue" in c:
        revenue = c["total_revenue"] / tenure_m.where(tenure_m > 0) / p.revenue_periods_per_month
    # without any revenue, what customers bring is unknown, not zero: no money column is
    # filled in, and nobody is ranked by value
    known = bool(revenue.notna().any())
    c["revenue_month"] = ((revenue * p.revenue_periods_per_month).fillna(0.0).clip(lower=0)
                          if known else np.nan)
    c["tenure_months"] = tenure_m
    c["tenure_days"] = tenure_m * DAYS_PER_MONTH
    c["spend_365d"] = c["revenue_month"] * 12
    c["monetary_total"] = (c["total_revenue"] if "total_revenue" in c
                           else c["revenue_month"] * tenure_m).fillna(
        c["revenue_month"] * tenure_m.fillna(0))
    if known:
        tiers = value_tiers(c.assign(monetary_total=c["revenue_month"]),
                            shares=config.analysis.tier_shares)
        c = c.merge(tiers[["customer_id", "value_rank", "value_tier"]], on="customer_id")
    else:
        c["monetary_total"] = np.nan
        c["value_rank"], c["value_tier"] = np.nan, TIER_UNKNOWN
    churned = c["churn"].fillna(False).astype(bool)
    c["lifecycle_stage"] = np.where(churned, STAGE_LOST,
                                    np.where(tenure_m < p.new_months, STAGE_NEW, STAGE_ACTIVE))
    types = feature_types(customers, exclude=config.protected + config.pii)
    numeric = [r.column for r in types.itertuples() if r.kind == "numeric"]
    matrix = snapshot_matrix(c, types)[numeric]
    labels, clusters = cluster_customers(
        matrix.assign(customer_id=c["customer_id"].to_numpy()),
        columns=numeric, max_k=config.analysis.max_clusters, seed=config.seed)
    c = c.merge(labels, on="customer_id")
    c["segment"] = c["cluster_name"]
    if scores is not None:
        c = c.merge(scores.rename(columns={"churn_reasons": "reasons"}), on="customer_id",
                    how="left")
    else:
        c["churn_probability"], c["reasons"] = np.nan, ""
    horizon_months = _horizon_months(config)
    prob = c["churn_probability"].to_numpy(dtype=float)
    months, value = remaining_value(np.nan_to_num(prob, nan=0.0), c["revenue_month"],
                                    params=p)
    alive = ~churned.to_numpy()
    # expected months paid within the horizon: the same survival sum, undiscounted
    within, _ = remaining_value(np.nan_to_num(prob, nan=0.0), c["revenue_month"],
                                params=p.model_copy(update={
                                    "discount_rate": 0.0, "max_years": horizon_months / 12}))
    expected_months = np.where(np.isnan(prob), horizon_months, within)
    c["predicted_value"] = np.where(alive, c["revenue_month"] * expected_months, 0.0)
    c["remaining_months"] = np.where(alive & ~np.isnan(prob), months, np.nan)
    c["remaining_value"] = np.where(alive & ~np.isnan(prob), value, np.nan)
    c["value_reasons"] = ""
    first = ["customer_id", "segment", "value_tier", "lifecycle_stage", "churn_probability",
             "predicted_value", "reasons"]
    c = c[first + [col for col in c.columns if col not in first]]
    return CustomerProfile(
        as_of=as_of, customers=c,
        segments=segment_profile(c, by="segment", value_col="revenue_month",
                                 min_customers=config.analysis.min_segment_customers),
        tiers=tier_summary_of(c, value_col="revenue_month"),
        lifecycle=lifecycle_counts(c), clusters=clusters,
        cohorts=tenure_cohorts(c), pareto=pareto_curve(c["revenue_month"]))


def _horizon_months(config: Config) -> float:
    return horizon_days(config) / DAYS_PER_MONTH


#: The horizon of a snapshot run when the config says ``auto`` (days): a snapshot has
#: no purchase rhythm to suggest one.
DEFAULT_HORIZON_DAYS = 90


def horizon_days(config: Config) -> int:
    """The snapshot run's horizon: the config's, or :data:`DEFAULT_HORIZON_DAYS`."""
    h = config.analysis.horizon_days
    return DEFAULT_HORIZON_DAYS if h == "auto" else int(h)


def scoring_date(config: Config, as_of: str | dt.date | None = None) -> dt.date:
    """The date of the export: ``as_of``, else the config's, else today."""
    if as_of:
        return as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(as_of)
    return config.analysis.as_of or dt.date.today()


def model_step(config: Config, processed_dir: str | Path, *,
               as_of: str | dt.date | None = None, versions: dict | None = None
               ) -> tuple[SnapshotRun | None, CustomerProfile]:
    """The models and profile step of a snapshot run: fit and judge the churn model by
    k-fold cross-validation on the cleaned customer table (:func:`fit_churn_cv`) and
    write it (:func:`write_snapshot_run`), then profile the customers with its scores
    (:func:`profile_snapshot`) and write the profile (which records the scoring date).

    When there are too few customers or churners for a model, the reason is recorded and
    the customers are profiled without a churn probability (missing, so no decision uses
    a made-up risk); the run is then None.
    """
    date, horizon = scoring_date(config, as_of), horizon_days(config)
    clean = pd.read_parquet(Path(processed_dir) / "clean" / "customers.parquet")
    try:
        run = fit_churn_cv(clean, params=config.snapshot, exclude=config.protected + config.pii,
                           seed=config.seed, device=config.analysis.device)
    except InsufficientDataError as exc:
        (Path(processed_dir) / "models.json").write_text(json.dumps(
            {"mode": "snapshot", "skipped": str(exc), "horizon_days": horizon}, indent=2))
        profile = profile_snapshot(clean, config=config, as_of=date)
        write_profile(profile, processed_dir)
        return None, profile
    write_snapshot_run(run, processed_dir, horizon_days=horizon, versions=versions)
    profile = profile_snapshot(clean, config=config, as_of=date, scores=run.scores)
    write_profile(profile, processed_dir)
    return run, profile


# --------------------------------------------------------------------------- files


def write_snapshot_run(run: SnapshotRun, out_dir: str | Path, *, horizon_days: int,
                       versions: dict | None = None) -> dict:
    """The models (JSON booster + metadata, the logistic regression as JSON), their
    tables and ``models.json``, whose ``churn`` holds each method's out-of-fold metrics
    under its name, ``chosen`` and ``selection`` (the inner scores of the choice)."""
    out_dir = Path(out_dir)
    folder = out_dir / "models"
    folder.mkdir(parents=True, exist_ok=True)
    churn = {**run.churn_metrics.set_index("method").to_dict(orient="index"),
             **choice_record(run.chosen, run.selection)}
    summary = {"mode": "snapshot", "horizon_days": int(horizon_days), "folds": run.folds,
               "rule_feature": run.rule_feature, "churn": churn,
               "churn_calibration": run.churn.calibration_["method"]}
    run.churn.save(folder, "churn", {"calibration": run.churn.calibration_,
                                     "cross_validation": summary, "versions": versions or {}})
    if run.logistic is not None:
        (folder / "logistic.json").write_text(json.dumps(
            {**run.logistic.to_dict(), "versions": versions or {}}, indent=2, default=str))
    for name in ("types", "evaluation", "churn_metrics", "scores", "churn_shap",
                 "score_features"):
        getattr(run, name).to_parquet(folder / f"{name}.parquet", index=False)
    (out_dir / "models.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def read_snapshot_run(out_dir: str | Path) -> SnapshotRun:
    """Read back what :func:`write_snapshot_run` wrote."""
    import xgboost as xgb

    out_dir = Path(out_dir)
    folder = out_dir / "models"
    summary = json.loads((out_dir / "models.json").read_text())
    meta = json.loads((folder / "churn.meta.json").read_text())
    model = ChurnModel(**meta["params"])
    model.booster_ = xgb.Booster()
    model.booster_.load_model(str(folder / "churn.json"))
    model.best_iteration_ = meta["best_iteration"]
    model.features_, model.categories_ = meta["features"], meta["categories"]
    model.calibration_ = meta["calibration"]
    tables = {name: pd.read_parquet(folder / f"{name}.parquet")
              for name in ("types", "evaluation", "churn_metrics", "scores", "churn_shap",
                           "score_features")}
    logistic = folder / "logistic.json"
    chosen, selection = read_choice(summary["churn"])
    return SnapshotRun(churn=model, rule_feature=summary["rule_feature"],
                       folds=summary["folds"], chosen=chosen, selection=selection,
                       logistic=LogisticChurn.from_dict(json.loads(logistic.read_text()))
                       if logistic.is_file() else None, **tables)
