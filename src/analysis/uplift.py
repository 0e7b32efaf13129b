"""Uplift: what a retention contact adds, per customer, learned from the company's own
randomised campaigns and judged out of time on the latest one.

Terms
-----
campaign
    One ``campaign_date`` of the ``campaign`` table. Its ``treated`` rows were contacted,
    its other rows (the control group) were not, at random among the customers eligible
    that day; the control group may be the same customers month after month.
outcome
    Margin realised in the ``window_days`` after the campaign date (``future_margin`` of
    :func:`analysis.features.build_features` with that cutoff; revenue x the margin rate
    without margins), for the customers active at it (a purchase within one horizon
    before it). Features are the same call's history: strictly before the campaign date.
propensity
    The campaign's treated share among its active rows (known: it is an experiment).
baseline
    E[outcome | not contacted, x]: the expected margin without a contact.
uplift (CATE)
    E[outcome | contacted, x] - E[outcome | not contacted, x]: the incremental margin a
    contact adds for a customer with pre-campaign features x.
pooled effect
    One uplift *rate* for everyone: a contact adds the share ``pooled_rate_`` of the
    baseline, so a customer's pooled uplift is ``pooled_rate_ x baseline`` (the
    assumption of the measured contact value in :func:`analysis.strategy.
    retention_targeting`).
meta-learner
    econml's X-learner (Künzel et al., 2019) over XGBoost regressors: an outcome model
    per arm, the imputed effects of each arm, an effect model per arm, combined by the
    propensity.
shrinkage
    Out-of-fold predictions (folds by customer, so a control customer seen in several
    campaigns is never on both sides) give each row a learned uplift ``S`` and a baseline
    ``B``. Regressing the outcome on ``1, B, (T - e) B, (T - e) (S - r B)`` (``T`` the
    contact, ``e`` the propensity, ``r`` the pooled rate, itself the coefficient of
    ``(T - e) B`` without the last term) gives the best linear predictor of the uplift
    (Chernozhukov et al., "generic machine learning inference on heterogeneous
    effects"): the loading ``b`` of the learner's departure from the pooled effect is 1
    when the departures are right and 0 when they are noise. The weight kept is
    ``clip(b, 0, 1) x max(0, 1 - (se_b / b) ** 2)`` (an empirical-Bayes, positive-part
    discount by the loading's own noise); the shrunk uplift is
    ``r B + weight x (S - r B)``. Where the campaigns do not identify heterogeneity the
    weight is about 0 and every customer gets the pooled effect.
Qini curve
    Customers of one campaign sorted by a score, best first; at each depth ``k`` the
    incremental outcome of the top ``k`` is ``Y_T(k) - Y_C(k) N_T(k) / N_C(k)``
    (Radcliffe's Qini: treated outcome sum less the control outcome sum scaled to the
    treated count), divided here by the campaign's treated count ``N_T``: incremental
    margin per contacted customer, 0 at depth 0 and the average effect at full depth.
AUUC (normalised)
    The mean, over depths ``k = 1..N``, of the Qini curve less the random-targeting
    line (``k / N`` x the average effect): the area between them, in margin per
    contacted customer. 0 for a random ranking; larger is better.
uplift at depth
    Mean outcome of the treated less that of the controls among the top share of a
    ranking.
hazard effect
    What a contact does, as one number that does not depend on how long one looks: the
    share ``e`` of a still-active customer's dropout hazard it takes off. In BG/NBD terms
    (:meth:`analysis.clv.BetaGeoModel.rates_if_alive`) an active customer buys at rate
    ``lambda`` and stays for an exponential time with hazard ``h``; a contact lowers ``h``
    to ``h (1 - e)``, so over a window ``w`` it adds ``P(alive) lambda [A(h (1 - e), w) -
    A(h, w)]`` purchase days, with ``A`` the expected time alive
    (:func:`analysis.clv.expected_alive_time`), and the same stretch of margin
    (:func:`contact_value`). A contact is worth little to a customer who is gone, and
    little to one who would stay anyway; most to a valuable one at a real risk of
    leaving within the window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from analysis.clv import (
    BGNBD_FIT_CUSTOMERS,
    expected_alive_time,
    fit_bgnbd,
    fit_positions,
    rfm_summaries,
)
from analysis.engine import as_engine
from analysis.features import Connection, snapshots_by_cutoff
from analysis.models import categories_of, feature_columns, prepare_matrix

__all__ = [
    "BGNBD_FIT_CUSTOMERS",
    "HAZARD_ROW_COLUMNS",
    "UPLIFT_ROWS",
    "UpliftLearner",
    "UpliftResult",
    "auuc",
    "campaign_outcomes",
    "compare_rankings",
    "contact_value",
    "customer_share",
    "estimate_hazard_effect",
    "full_window_dates",
    "hazard_effect_rows",
    "last_coefficient",
    "learn_uplift",
    "qini_curve",
    "recent_campaign_customers",
    "uplift_at_depth",
    "uplift_matrix",
]

LEARNERS = ("x", "t")


# --------------------------------------------------------------------------- data


def full_window_dates(campaign: pd.DataFrame, *, as_of: dt.date, window_days: int
                      ) -> list[dt.date]:
    """Campaign dates whose outcome window ``[date, date + window_days)`` ends by
    ``as_of`` and that have both contacted and control rows, oldest first."""
    arms = campaign.assign(day=pd.to_datetime(campaign["campaign_date"]).dt.date).groupby(
        "day")["treated"].agg(["min", "max"])
    both = arms[(arms["min"] == False) & (arms["max"] == True)].index  # noqa: E712
    return sorted(d for d in both if d + dt.timedelta(days=window_days) <= as_of)


def recent_campaign_customers(con: Connection, campaign: pd.DataFrame, *,
                              dates: list[dt.date], horizon_days: int
                              ) -> dict[dt.date, np.ndarray]:
    """Per campaign date, the ids of its customers with an order line in the
    ``horizon_days`` before it: every customer active at the campaign (an order within
    one horizon before it) is among them, so features need be built for them only."""
    days = pd.to_datetime(campaign["campaign_date"]).dt.date
    eng = as_engine(con)
    eng.register("_campaign_rows", pd.DataFrame({
        "customer_id": campaign["customer_id"].astype(str).to_numpy(),
        "campaign_date": pd.to_datetime(days).to_numpy()}))
    try:
        found = eng.frame(f"""
            SELECT DISTINCT c.customer_id, CAST(c.campaign_date AS DATE) AS day
            FROM _campaign_rows c
            SEMI JOIN lines l ON l.customer_id = c.customer_id
                 AND l.order_date < CAST(c.campaign_date AS DATE)
                 AND l.order_date >= CAST(c.campaign_date AS DATE) - {int(horizon_days)}
            WHERE CAST(c.campaign_date AS DATE) IN
                  ({", ".join(f"DATE '{d.isoformat()}'" for d in dates) or "NULL"})
            """)
    finally:
        eng.unregister("_campaign_rows")
    day = pd.to_datetime(found["day"]).dt.date
    return {d: found.loc[day == d, "customer_id"].to_numpy() for d in dates}


def campaign_outcomes(con: Connection, campaign: pd.DataFrame, *,
                      dates: list[dt.date], window_days: int, horizon_days: int,
                      margin_rate: float, exclude_attributes: tuple[str, ...] = ()
                      ) -> pd.DataFrame:
    """One row per active customer of each campaign: features at its date, the contact,
    the propensity and the outcome.

    Returns
    -------
    DataFrame
        The features of :func:`analysis.features.build_features` at each campaign date
        (history before it, labels over ``window_days`` after it), plus
        ``campaign_date``, ``treated`` (bool), ``propensity`` (the campaign's treated
        share among these rows) and ``outcome`` (margin in the window).
    """
    days = pd.to_datetime(campaign["campaign_date"]).dt.date
    # each campaign's contacts and controls who may be active at its date, in one pass
    # over the log
    at_dates = snapshots_by_cutoff(
        con, cutoffs=dates, horizon_days=window_days, exclude_attributes=exclude_attributes,
        customers=recent_campaign_customers(con, campaign, dates=dates,
                                            horizon_days=horizon_days))
    parts = []
    for date in dates:
        arm = campaign.loc[days == date, ["customer_id", "treated"]]
        feats = at_dates.pop(date)
        active = feats[feats["recency_days"] <= horizon_days].merge(arm, on="customer_id")
        if active.empty:
            continue
        treated = active["treated"].astype(bool)
        rate = (active["margin_rate"].clip(0, 1) if "margin_rate" in active
                else pd.Series(np.nan, index=active.index)).fillna(margin_rate)
        outcome = (active["future_margin"] if "future_margin" in active
                   else active["future_spend"] * rate).fillna(0.0)
        parts.append(active.assign(campaign_date=pd.Timestamp(date), treated=treated,
                                   propensity=float(treated.mean()), outcome=outcome))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def uplift_matrix(frame: pd.DataFrame, columns: list[str],
                  categories: dict[str, list[str]]) -> np.ndarray:
    """The learner's input: numeric columns as floats, text columns as the codes of
    their fixed levels (unseen or missing: NaN, which XGBoost routes)."""
    m = prepare_matrix(frame, columns, categories)
    cols = [m[c].cat.codes.replace(-1, np.nan).astype(float) if c in categories
            else m[c].astype(float) for c in columns]
    return np.column_stack(cols) if cols else np.empty((len(frame), 0))


# --------------------------------------------------------------------------- the learner


@dataclass
class UpliftLearner:
    """Per-customer uplift from randomised campaigns: an econml meta-learner over
    XGBoost, shrunk towards the pooled effect by the out-of-fold best linear predictor
    (see the module docstring).

    Parameters
    ----------
    learner : ``"x"`` (X-learner) or ``"t"`` (T-learner).
    n_folds : folds of the cross-fit that sets the shrinkage (by ``groups``).
    n_estimators, max_depth, learning_rate, min_child_weight : of each XGBoost model.
    random_state : seed of the folds and the models.

    Attributes
    ----------
    learner_ : the econml estimator fitted on all rows.
    pooled_rate_ : the pooled uplift rate (uplift per unit of baseline).
    loading_, loading_se_ : the BLP loading of the learner's departure from the pooled
        effect and its HC1 standard error.
    weight_ : the share of that departure kept, in [0, 1].
    mean_pooled_uplift_ : ``pooled_rate_`` x the mean out-of-fold baseline (per row).
    n_rows_, n_treated_ : rows fitted on, contacted among them.
    """

    learner: Literal["x", "t"] = "x"
    n_folds: int = 3
    n_estimators: int = 150
    max_depth: int = 3
    learning_rate: float = 0.05
    min_child_weight: float = 20.0
    random_state: int = 0

    def _fit_learner(self, X: np.ndarray, t: np.ndarray, y: np.ndarray):
        from econml.metalearners import TLearner, XLearner  # heavy: loaded when used
        from sklearn.dummy import DummyClassifier
        from xgboost import XGBRegressor

        model = XGBRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                             learning_rate=self.learning_rate,
                             min_child_weight=self.min_child_weight, subsample=0.8,
                             tree_method="hist", random_state=self.random_state, n_jobs=2)
        if self.learner == "x":
            # randomised: the propensity is the treated share, whatever x is
            est = XLearner(models=model, propensity_model=DummyClassifier(strategy="prior"),
                           allow_missing=True)
        else:
            est = TLearner(models=model, allow_missing=True)
        return est.fit(y, t.astype(int), X=X)

    def fit(self, X: np.ndarray, treated, outcome, *, propensity=None, groups=None
            ) -> UpliftLearner:
        """Fit on stacked campaign rows.

        Parameters
        ----------
        X : features (rows x columns), NaN allowed.
        treated : contacted or not, per row.
        outcome : the outcome per row.
        propensity : each row's campaign treated share (default: the overall share).
        groups : customer of each row; rows of one customer share a fold.
        """
        if self.learner not in LEARNERS:
            raise ValueError(f"learner={self.learner!r}: expected one of {LEARNERS}")
        X = np.asarray(X, dtype=float)
        t = np.asarray(treated, dtype=bool)
        y = np.asarray(outcome, dtype=float)
        if t.sum() < 2 * self.n_folds or (~t).sum() < 2 * self.n_folds:
            raise ValueError("UpliftLearner needs contacted and control rows in every fold")
        e = (np.full(len(y), t.mean()) if propensity is None
             else np.asarray(propensity, dtype=float))
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        _, gid = np.unique(groups, return_inverse=True)
        fold_of_group = np.random.default_rng(self.random_state).integers(
            0, self.n_folds, gid.max() + 1)
        fold = fold_of_group[gid]
        S, B = np.empty(len(y)), np.empty(len(y))
        for k in range(self.n_folds):
            test = fold == k
            est = self._fit_learner(X[~test], t[~test], y[~test])
            S[test] = est.effect(X[test])
            B[test] = est.models[0].predict(X[test])
        B = np.clip(B, 0, None)
        ones, d = np.ones(len(y)), t - e
        rate, _ = _ols_coef(np.column_stack([ones, B, d * B]), y, 2)
        loading, se = _ols_coef(np.column_stack([ones, B, d * B, d * (S - rate * B)]), y, 3)
        self.pooled_rate_ = rate
        self.loading_, self.loading_se_ = loading, se
        self.weight_ = _shrinkage_weight(loading, se)
        self.mean_pooled_uplift_ = float(rate * B.mean())
        self.n_rows_, self.n_treated_ = int(len(y)), int(t.sum())
        self.learner_ = self._fit_learner(X, t, y)
        return self

    def _check(self) -> None:
        if not hasattr(self, "learner_"):
            raise RuntimeError("UpliftLearner is not fitted: call fit first")

    def predict_baseline(self, X: np.ndarray) -> np.ndarray:
        """Expected outcome without a contact (at least 0)."""
        self._check()
        return np.clip(self.learner_.models[0].predict(np.asarray(X, dtype=float)), 0, None)

    def predict_unshrunk(self, X: np.ndarray) -> np.ndarray:
        """The meta-learner's uplift, before shrinkage."""
        self._check()
        return np.asarray(self.learner_.effect(np.asarray(X, dtype=float)), dtype=float)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Shrunk uplift per row: ``r B + weight x (S - r B)``."""
        pooled = self.pooled_rate_ * self.predict_baseline(X)
        return pooled + self.weight_ * (self.predict_unshrunk(X) - pooled)

    def predict_heterogeneity(self, X: np.ndarray) -> np.ndarray:
        """The part of each row's uplift kept beyond the pooled effect:
        ``weight x (S - r B)`` (0 everywhere when the weight is 0)."""
        pooled = self.pooled_rate_ * self.predict_baseline(X)
        return self.weight_ * (self.predict_unshrunk(X) - pooled)

    def summary(self) -> dict:
        """The fitted numbers, for a run's JSON."""
        self._check()
        return {"learner": f"econml {self.learner.upper()}-learner over XGBoost",
                "pooled_rate": round(self.pooled_rate_, 6),
                "heterogeneity_loading": round(self.loading_, 4),
                "heterogeneity_loading_se": round(self.loading_se_, 4),
                "shrinkage_weight": round(self.weight_, 4),
                "n_rows": self.n_rows_, "n_treated": self.n_treated_}


def last_coefficient(X: np.ndarray, y: np.ndarray, *, clusters: np.ndarray | None = None
                     ) -> tuple[float, float]:
    """Least-squares coefficient of the last column of ``X`` and its robust standard
    error: HC1, or clustered by ``clusters`` (a customer in several campaigns' rows, such
    as a persistent control group, is one cluster: its rows are not independent). A
    caller fitting repeatedly on the same rows passes ``pd.factorize(ids)[0]``: integer
    clusters cost a fraction of text ones."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    bread = np.linalg.pinv(X.T @ X)
    n, k = X.shape
    codes, groups = pd.factorize(clusters) if clusters is not None else (None, ())
    if clusters is not None and len(groups) < n:
        g = len(groups)
        scores = np.column_stack([np.bincount(codes, weights=column, minlength=g)
                                  for column in (X * resid[:, None]).T])
        meat = scores.T @ scores * (g / max(g - 1, 1)) * ((n - 1) / max(n - k, 1))
        cov = bread @ meat @ bread
    else:
        meat = (X * resid[:, None] ** 2).T @ X
        cov = bread @ meat @ bread * n / max(n - k, 1)
    return float(beta[-1]), float(np.sqrt(max(cov[-1, -1], 0.0)))


def _ols_coef(X: np.ndarray, y: np.ndarray, j: int) -> tuple[float, float]:
    """Least-squares coefficient ``j`` and its HC1 standard error (NaN if not
    identified)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    bread = np.linalg.pinv(X.T @ X)
    meat = (X * resid[:, None] ** 2).T @ X
    n, k = X.shape
    cov = bread @ meat @ bread * n / max(n - k, 1)
    se = float(np.sqrt(cov[j, j])) if cov[j, j] > 0 else float("nan")
    return float(beta[j]), se


def _shrinkage_weight(loading: float, se: float) -> float:
    """``clip(b, 0, 1) x max(0, 1 - (se / b)^2)``; 0 when ``b`` is not positive or
    its error is unknown."""
    if not np.isfinite(loading) or not np.isfinite(se) or loading <= 0:
        return 0.0
    return float(min(loading, 1.0) * max(0.0, 1.0 - (se / loading) ** 2))


# --------------------------------------------------------------------------- evaluation


def qini_curve(score, treated, outcome) -> pd.DataFrame:
    """The Qini curve of a ranking on one randomised campaign (module docstring).

    Ties keep the input order (a stable sort on the score, best first).

    Returns
    -------
    DataFrame
        ``n_targeted`` (0..N), ``share`` (of the campaign's rows), ``n_treated``,
        ``n_control`` (in the top), ``qini`` (incremental outcome of the top per
        contacted customer of the campaign).
    """
    s = np.asarray(score, dtype=float)
    t = np.asarray(treated, dtype=bool)
    y = np.asarray(outcome, dtype=float)
    order = np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")
    t, y = t[order], y[order]
    nt, nc = np.cumsum(t), np.cumsum(~t)
    yt, yc = np.cumsum(np.where(t, y, 0.0)), np.cumsum(np.where(t, 0.0, y))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(nc > 0, yt - yc * nt / nc, yt) / max(int(t.sum()), 1)
    n = len(y)
    return pd.DataFrame({"n_targeted": np.arange(n + 1), "share": np.arange(n + 1) / max(n, 1),
                         "n_treated": np.r_[0, nt], "n_control": np.r_[0, nc],
                         "qini": np.r_[0.0, q]})


def auuc(curve: pd.DataFrame) -> float:
    """Normalised area under a :func:`qini_curve`: the mean over depths 1..N of the
    curve less the random-targeting line (module docstring)."""
    c = curve[curve["n_targeted"] > 0]
    if c.empty:
        return 0.0
    end = float(c["qini"].iloc[-1])
    return float((c["qini"] - c["share"] * end).mean())


def uplift_at_depth(score, treated, outcome, *, share: float) -> float:
    """Mean outcome of the contacted less that of the controls in the top ``share``
    of the ranking (NaN when one arm is absent there)."""
    s = np.asarray(score, dtype=float)
    t = np.asarray(treated, dtype=bool)
    y = np.asarray(outcome, dtype=float)
    k = max(int(round(share * len(y))), 1)
    top = np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")[:k]
    tt, yy = t[top], y[top]
    if tt.all() or not tt.any():
        return float("nan")
    return float(yy[tt].mean() - yy[~tt].mean())


def compare_rankings(scores: dict[str, np.ndarray], treated, outcome, *,
                     depth_share: float) -> dict:
    """AUUC and uplift at depth of each ranking on one campaign, and the winner (the
    largest AUUC).

    Returns
    -------
    dict
        ``auuc`` and ``uplift_at_depth`` (by ranking name), ``winner``,
        ``depth_share``, ``n_treated``, ``n_control``.
    """
    t = np.asarray(treated, dtype=bool)
    areas = {name: auuc(qini_curve(s, t, outcome)) for name, s in scores.items()}
    at_depth = {name: uplift_at_depth(s, t, outcome, share=depth_share)
                for name, s in scores.items()}
    return {"auuc": {k: round(v, 4) for k, v in areas.items()},
            "uplift_at_depth": {k: (round(v, 4) if np.isfinite(v) else None)
                                for k, v in at_depth.items()},
            "winner": max(areas, key=areas.get) if areas else None,
            "depth_share": round(float(depth_share), 4),
            "n_treated": int(t.sum()), "n_control": int((~t).sum())}


# --------------------------------------------------------------------------- the step


@dataclass
class UpliftResult:
    """What :func:`learn_uplift` learned.

    Attributes
    ----------
    model : the learner fitted on every campaign with a full outcome window.
    columns, categories : its input columns and text levels (for :func:`uplift_matrix`).
    evaluation : out-of-time comparison on the held-out campaigns (the keys of
        :func:`compare_rankings`, AUUC and uplift at depth averaged over them, plus
        ``auuc_by_campaign``, ``latest_campaign``, ``held_out_campaigns``,
        ``train_campaigns``, ``window_days``), or None when no earlier campaign's window
        closes before them.
    curves : the Qini curve of each ranking on each held-out campaign (``ranking``,
        ``campaign_date`` columns).
    dates : the campaign dates the model was fitted on.
    """

    model: UpliftLearner
    columns: list[str]
    categories: dict[str, list[str]]
    evaluation: dict | None
    dates: list[dt.date]
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)

    def heterogeneity(self, features: pd.DataFrame) -> pd.Series:
        """What the learner adds to the pooled effect, over the outcome window, by the rows
        of ``features`` (:meth:`UpliftLearner.predict_heterogeneity`)."""
        return pd.Series(self.model.predict_heterogeneity(uplift_matrix(
            features, self.columns, self.categories)), index=features.index)

    def predict(self, features: pd.DataFrame) -> pd.Series:
        """Shrunk uplift over the outcome window, by the rows of ``features``."""
        return pd.Series(self.model.predict(uplift_matrix(features, self.columns,
                                                          self.categories)),
                         index=features.index)


#: The most campaign rows (a customer at a campaign date) :func:`learn_uplift` learns
#: from and judges on: beyond it, the same share of customers is kept in every campaign.
#: A learner of depth-3 trees gains nothing from millions of rows that a few hundred
#: thousand do not give it, and its 32 XGBoost fits grow with the rows.
UPLIFT_ROWS = 400_000


def customer_share(campaign: pd.DataFrame, *, share: float) -> pd.DataFrame:
    """The rows of about ``share`` of the customers of ``campaign`` (all their rows), chosen
    by a hash of the id: the same customers whatever the campaign or the run, so that a
    control customer seen month after month stays in one fold."""
    if share >= 1:
        return campaign
    h = pd.util.hash_pandas_object(campaign["customer_id"].astype(str), index=False,
                                   hash_key="customer-share-1")
    return campaign[(h.to_numpy() % 1_000_000) < int(share * 1_000_000)]


def learn_uplift(con: Connection, campaign: pd.DataFrame, *,
                 as_of: dt.date, horizon_days: int, window_days: int, margin_rate: float,
                 exclude_attributes: tuple[str, ...] = (), depth_share: float = 0.2,
                 baselines=None, learner: Literal["x", "t"] = "x", seed: int = 0,
                 n_held_out: int = 2, max_rows: int | None = UPLIFT_ROWS,
                 refit_beaten: bool = True) -> UpliftResult | None:
    """Learn per-customer uplift from the campaigns and judge it out of time.

    The ``n_held_out`` latest campaigns whose windows close by ``as_of`` are held out
    (one when there are too few campaigns to train on otherwise); the learner is fitted
    on the campaigns whose windows close by the first of them (no outcome overlaps
    them), and its ranking is compared on each of them with the pooled-effect ranking and
    any ``baselines``; the winner has the largest AUUC averaged over the held-out
    campaigns (one campaign of a few hundred contacts is a noisy judge; on a tie, the
    simpler ranking). The returned
    model is then refitted on every full-window campaign.

    Parameters
    ----------
    baselines : optional function of a held-out campaign's rows (features at its date,
        with ``campaign_date``) returning ``{name: score}`` rankings to compare with, e.g.
        churn probability. A ``"pooled"`` score in it is the pooled uplift per customer
        over the outcome window (the run's own valuation without the learner); it
        replaces the default (the learner's baseline: one rate for everyone ranks by
        expected margin), and the learned
        ranking is then that score plus the learner's shrunk departure from the pooled
        effect (:meth:`UpliftLearner.predict_heterogeneity`), as the run composes it.
    depth_share : the share of the campaign at which ``uplift_at_depth`` is read.
    max_rows : with more campaign rows than this on the full-window dates, the learner
        learns from and is judged on about this many, those of a fixed share of the
        customers (:func:`customer_share`); None: every row.
    refit_beaten : False: when the judgement prefers another ranking, the model judged
        (fitted on the training campaigns) is returned as it is, not refitted on every
        campaign (for a caller who then does not use it).

    Returns
    -------
    UpliftResult, or None with fewer than two full-window campaigns.
    """
    dates = full_window_dates(campaign, as_of=as_of, window_days=window_days)
    if len(dates) < 2:
        return None
    on_dates = pd.to_datetime(campaign["campaign_date"]).dt.date.isin(dates)
    if max_rows is not None and on_dates.sum() > max_rows:
        campaign = customer_share(campaign[on_dates], share=max_rows / on_dates.sum())
    rows = campaign_outcomes(con, campaign, dates=dates, window_days=window_days,
                             horizon_days=horizon_days, margin_rate=margin_rate,
                             exclude_attributes=exclude_attributes)
    if rows.empty:
        return None
    columns = [c for c in feature_columns(rows, exclude=exclude_attributes)
               if c not in ("campaign_date", "treated", "propensity", "outcome")]
    categories = categories_of(rows, columns)
    X = uplift_matrix(rows, columns, categories)
    day = rows["campaign_date"].dt.date.to_numpy()
    window = dt.timedelta(days=window_days)
    evaluation, curves = None, pd.DataFrame()

    def fit(mask: np.ndarray) -> UpliftLearner:
        return UpliftLearner(learner=learner, random_state=seed).fit(
            X[mask], rows.loc[mask, "treated"], rows.loc[mask, "outcome"],
            propensity=rows.loc[mask, "propensity"], groups=rows.loc[mask, "customer_id"])

    def enough(mask: np.ndarray) -> bool:
        t = rows.loc[mask, "treated"].to_numpy()
        return min(int(t.sum()), int((~t).sum())) >= 2 * UpliftLearner().n_folds

    held_dates: list[dt.date] = []
    for k in range(min(n_held_out, len(dates) - 1), 0, -1):
        if enough(day + window <= dates[-k]):
            held_dates = dates[-k:]
            break
    judged = [d for d in held_dates
              if rows.loc[day == d, "treated"].any() and (~rows.loc[day == d, "treated"]).any()]
    if judged:
        train = day + window <= held_dates[0]
        early = fit(train)
        results, parts = [], []
        for date in judged:
            held = day == date
            Xh = X[held]
            # the pooled effect ranks by expected margin (its rate is one number)
            scores = {"model": early.predict(Xh), "pooled": early.predict_baseline(Xh)}
            if baselines is not None:
                given = baselines(rows[held].reset_index(drop=True))
                if "pooled" in given:
                    scores["model"] = (np.asarray(given["pooled"], dtype=float)
                                       + early.predict_heterogeneity(Xh))
                scores.update(given)
            t_held = rows.loc[held, "treated"].to_numpy()
            y_held = rows.loc[held, "outcome"].to_numpy()
            results.append(compare_rankings(scores, t_held, y_held, depth_share=depth_share))
            parts += [qini_curve(s, t_held, y_held).assign(ranking=name,
                                                           campaign_date=date.isoformat())
                      for name, s in scores.items()]
        names = list(results[0]["auuc"])
        area = {k: float(np.mean([r["auuc"][k] for r in results])) for k in names}
        at_depth = {k: [r["uplift_at_depth"][k] for r in results
                        if r["uplift_at_depth"][k] is not None] for k in names}
        evaluation = {
            "auuc": {k: round(v, 4) for k, v in area.items()},
            "uplift_at_depth": {k: (round(float(np.mean(v)), 4) if v else None)
                                for k, v in at_depth.items()},
            # a tie (no heterogeneity kept) goes to the simpler ranking
            "winner": max(area, key=lambda k: (area[k], k != "model")),
            "depth_share": round(float(depth_share), 4),
            "n_treated": int(sum(r["n_treated"] for r in results)),
            "n_control": int(sum(r["n_control"] for r in results)),
            "auuc_by_campaign": {d.isoformat(): r["auuc"] for d, r in zip(judged, results,
                                                                            strict=True)},
            "latest_campaign": judged[-1].isoformat(),
            "held_out_campaigns": [d.isoformat() for d in judged],
            "train_campaigns": sorted({d.isoformat() for d in day[train]}),
            "window_days": int(window_days), "model_fit": early.summary()}
        curves = pd.concat(parts, ignore_index=True)
    if evaluation is not None and evaluation["winner"] != "model" and not refit_beaten:
        return UpliftResult(model=early, columns=columns, categories=categories,
                            evaluation=evaluation, curves=curves,
                            dates=[d for d in dates if d + window <= held_dates[0]])
    if not enough(np.ones(len(rows), dtype=bool)):
        return None
    model = fit(np.ones(len(rows), dtype=bool))
    return UpliftResult(model=model, columns=columns, categories=categories,
                        evaluation=evaluation, dates=dates, curves=curves)


# --------------------------------------------------------------------------- the hazard effect


def contact_value(expected_margin, hazard, *, effect: float, horizon_days: int,
                  window_days: int) -> np.ndarray:
    """Expected extra margin over ``window_days`` of a contact that takes the share
    ``effect`` off each customer's dropout hazard (module docstring, "hazard effect").

    A customer active now with hazard ``h`` (per day) brings margin at some rate ``m``
    while active, so that over the horizon ``expected_margin = P(alive) m A(h, H)``. The
    contact adds ``P(alive) m [A(h (1 - e), W) - A(h, W)]`` over the window ``W``, i.e.
    ``expected_margin x [A(h (1 - e), W) - A(h, W)] / A(h, H)``: the customer's own
    expected margin supplies how much is at stake (whether they are still there and how
    much they bring), the hazard how much of it a lowered hazard keeps.

    Parameters
    ----------
    expected_margin : expected margin over ``horizon_days`` without a contact.
    hazard : dropout hazard per day if still active (NaN: no estimate, value 0).
    effect : the share of the hazard a contact takes off (at most 1).

    Returns
    -------
    ndarray
        The extra margin per customer (0 where the margin or the hazard is unknown).
    """
    h = np.asarray(hazard, dtype=float)
    em = np.clip(np.asarray(expected_margin, dtype=float), 0, None)
    e = min(float(effect), 1.0)
    gained = expected_alive_time(h * (1 - e), window_days) - expected_alive_time(h, window_days)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = em * gained / expected_alive_time(h, horizon_days)
    return np.where(np.isfinite(out), out, 0.0)


#: The columns of :func:`hazard_effect_rows`.
HAZARD_ROW_COLUMNS = ("customer_id", "campaign_date", "treated", "propensity", "window_days",
                      "p_alive", "purchase_rate", "hazard", "purchase_days")


def hazard_effect_rows(con: Connection, campaign: pd.DataFrame, *,
                       as_of: dt.date, horizon_days: int, window_days: int) -> pd.DataFrame:
    """One row per customer active at each campaign (a purchase within one horizon before
    it) whose first horizon after it has closed by ``as_of``: the contact, and what
    BG/NBD, fitted on the history before the campaign date, expected of the customer.

    Each campaign's outcome window is as long as the data allows, up to ``window_days``:
    a contact changes the hazard, so its effect grows with the window, and the early
    campaigns with long windows carry most of the evidence. Purchases are purchase days
    (completed lines with a non-negative amount, one a day), as BG/NBD counts them.

    Returns
    -------
    DataFrame
        ``customer_id``, ``campaign_date``, ``treated`` (bool), ``propensity`` (the
        campaign's treated share among these rows), ``window_days`` (the outcome window),
        ``p_alive``, ``purchase_rate`` and ``hazard`` (per day, if active), and
        ``purchase_days`` (in the window).
    """
    days = pd.to_datetime(campaign["campaign_date"]).to_numpy(dtype="datetime64[D]")
    ids = campaign["customer_id"].astype(str)
    parts = []
    # the purchase days are gathered once (rfm_summaries' table) for every campaign; each
    # date's summary stays in the engine, which hands over only the rows BG/NBD is fitted on
    # (fit_bgnbd's evenly spaced customers) and the campaign's own customers, with their
    # outcomes
    eng = as_engine(con)
    eng.register("_campaign_customers", pd.DataFrame({
        "customer_id": ids.to_numpy(),
        "campaign_date": pd.to_datetime(campaign["campaign_date"]).to_numpy()}))
    summaries = rfm_summaries(eng, calibration_ends=full_window_dates(
        campaign, as_of=as_of, window_days=horizon_days), extra_days=int(window_days),
        in_engine=True)
    # (in doubles: Spark divides by a decimal literal in decimals of 6 places, which
    # moved the fit, the effect and the campaign's value in their sixth digit)
    weeks = ("s.frequency, CAST(s.recency_days AS DOUBLE) / 7 AS recency, "
             "CAST(s.t_days AS DOUBLE) / 7 AS T")
    try:
        for date, summary in summaries:
            window = min(int(window_days), (as_of - date).days)
            n = eng.rows(f"SELECT COUNT(*) FROM {summary}")[0][0]
            eng.register("_fit_positions", pd.DataFrame({"i": fit_positions(n)}))
            try:
                bg = fit_bgnbd(eng.frame(
                    f"SELECT {weeks} FROM (SELECT *, row_number() OVER (ORDER BY "
                    f"customer_id) - 1 AS i FROM {summary}) s SEMI JOIN _fit_positions "
                    f"USING (i) ORDER BY i"), max_customers=BGNBD_FIT_CUSTOMERS)
            except ValueError:
                continue
            finally:
                eng.unregister("_fit_positions")
            seen = eng.frame(f"""
                SELECT o.*, {weeks}
                FROM (SELECT customer_id,
                             date_diff('day', MAX(order_date) FILTER (
                                           WHERE order_date < DATE '{date.isoformat()}'),
                                       DATE '{date.isoformat()}') AS recency_days,
                             COUNT(*) FILTER (WHERE order_date >= DATE '{date.isoformat()}')
                                 AS purchase_days
                      FROM purchase_days_rfm
                      SEMI JOIN (SELECT DISTINCT customer_id FROM _campaign_customers
                                 WHERE CAST(campaign_date AS DATE)
                                       = DATE '{date.isoformat()}') c
                           USING (customer_id)
                      WHERE order_date
                            < DATE '{(date + dt.timedelta(days=window)).isoformat()}'
                      GROUP BY customer_id) o
                LEFT JOIN {summary} s USING (customer_id)
                WHERE o.recency_days <= {int(horizon_days)}
                ORDER BY customer_id""")
            seen["customer_id"] = seen["customer_id"].astype(str)
            on_date = days == np.datetime64(date, "D")
            active = seen.merge(
                pd.DataFrame({"customer_id": ids[on_date].to_numpy(),
                              "treated": campaign["treated"].to_numpy()[on_date]}),
                on="customer_id")
            if active.empty:
                continue
            x, tx, T = (active[c].to_numpy(dtype=float) for c in ("frequency", "recency", "T"))
            rate, hazard = bg.rates_if_alive(x, tx, T)
            treated = active["treated"].astype(bool).to_numpy()
            parts.append(pd.DataFrame({
                "customer_id": active["customer_id"].to_numpy(),
                "campaign_date": pd.Timestamp(date), "treated": treated,
                "propensity": float(treated.mean()), "window_days": window,
                "p_alive": bg.probability_alive(x, tx, T), "purchase_rate": rate / 7.0,
                "hazard": hazard / 7.0,
                "purchase_days": active["purchase_days"].to_numpy(dtype=float)}))
    finally:
        eng.unregister("_campaign_customers")
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame(columns=list(HAZARD_ROW_COLUMNS)))


def estimate_hazard_effect(rows: pd.DataFrame, *, max_iter: int = 100,
                           tol: float = 1e-5) -> dict | None:
    """The share of the dropout hazard a contact takes off, from randomised campaigns.

    ``rows`` as :func:`hazard_effect_rows`. A contact lowering the hazard by ``e`` adds
    ``P(alive) lambda [A(h (1 - e), w) - A(h, w)]`` purchase days over each row's window
    (module docstring), nearly ``e`` times ``x(e) = P(alive) lambda [A(h (1 - e), w) -
    A(h, w)] / e``. The purchase days are regressed on ``1``, the expected purchase days
    without a contact ``m = P(alive) lambda A(h, w)`` (which takes out most of the
    differences between customers: CUPED) and ``(T - propensity) x(e)``, weighted by
    ``1 / (1 + m)`` (a count's variance grows with its mean, as a Poisson count's; the 1
    keeps customers expected to buy almost nothing from dominating); ``e`` is the fixed
    point of the last coefficient. Its standard error is clustered by customer (the
    control group recurs from campaign to campaign).

    Returns
    -------
    dict or None
        ``effect`` (the coefficient: can be negative), ``se``, ``ci_low``, ``ci_high``
        (95 %), ``n_rows``, ``n_treated``, ``n_control``, ``n_campaigns``,
        ``window_days`` (the longest outcome window), ``converged``; None with fewer than
        30 contacted or 30 control rows.
    """
    t = rows["treated"].astype(bool).to_numpy()
    if t.sum() < 30 or (~t).sum() < 30:
        return None
    y = rows["purchase_days"].to_numpy(dtype=float)
    w = rows["window_days"].to_numpy(dtype=float)
    h = rows["hazard"].to_numpy(dtype=float)
    scale = (rows["p_alive"] * rows["purchase_rate"]).to_numpy(dtype=float)
    base = scale * expected_alive_time(h, w)
    d = t - rows["propensity"].to_numpy(dtype=float)
    clusters = pd.factorize(rows["customer_id"])[0]      # once, for every iteration
    root_weight = 1.0 / np.sqrt(1.0 + base)
    effect, se, converged = 0.3, float("nan"), False
    for _ in range(max_iter):
        e = min(max(effect, 1e-3), 0.99)
        x = scale * (expected_alive_time(h * (1 - e), w) - expected_alive_time(h, w)) / e
        X = np.column_stack([np.ones(len(y)), base, d * x])
        new, se = last_coefficient(X * root_weight[:, None], y * root_weight,
                                   clusters=clusters)
        if not np.isfinite(new):
            break
        converged = abs(min(max(new, 1e-3), 0.99) - e) < tol
        effect = new
        if converged:
            break
    return {"effect": float(effect), "se": float(se),
            "ci_low": float(effect - 1.96 * se), "ci_high": float(effect + 1.96 * se),
            "n_rows": int(len(y)), "n_treated": int(t.sum()), "n_control": int((~t).sum()),
            "n_campaigns": int(rows["campaign_date"].nunique()),
            "window_days": int(w.max()), "converged": bool(converged)}
