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
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import duckdb
import numpy as np
import pandas as pd

from analysis.features import build_features
from analysis.models import categories_of, feature_columns, prepare_matrix

__all__ = [
    "UpliftLearner",
    "UpliftResult",
    "auuc",
    "campaign_outcomes",
    "compare_rankings",
    "full_window_dates",
    "learn_uplift",
    "qini_curve",
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


def campaign_outcomes(con: duckdb.DuckDBPyConnection, campaign: pd.DataFrame, *,
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
    parts = []
    for date in dates:
        arm = campaign.loc[days == date, ["customer_id", "treated"]]
        feats = build_features(con, cutoff=date, horizon_days=window_days,
                               exclude_attributes=exclude_attributes)
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
    evaluation : out-of-time comparison on the latest campaign (:func:`compare_rankings`
        plus ``latest_campaign``, ``train_campaigns``, ``window_days``), or None when
        no earlier campaign's window closes before it.
    curves : the Qini curve of each ranking on the latest campaign (``ranking`` column).
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


def learn_uplift(con: duckdb.DuckDBPyConnection, campaign: pd.DataFrame, *,
                 as_of: dt.date, horizon_days: int, window_days: int, margin_rate: float,
                 exclude_attributes: tuple[str, ...] = (), depth_share: float = 0.2,
                 baselines=None, learner: Literal["x", "t"] = "x", seed: int = 0
                 ) -> UpliftResult | None:
    """Learn per-customer uplift from the campaigns and judge it out of time.

    The latest campaign whose window closes by ``as_of`` is held out; the learner is
    fitted on the campaigns whose windows close by its date (no outcome overlaps it),
    and its ranking is compared on it with the pooled-effect ranking and any
    ``baselines``. The returned model is then refitted on every full-window campaign.

    Parameters
    ----------
    baselines : optional function of the latest campaign's rows (features at its date)
        returning ``{name: score}`` rankings to compare with, e.g. churn probability;
        ``"pooled"`` in it replaces the default pooled ranking (by the learner's
        baseline: the pooled rate is one number, so it ranks by expected margin).
    depth_share : the share of the campaign at which ``uplift_at_depth`` is read.

    Returns
    -------
    UpliftResult, or None with fewer than two full-window campaigns.
    """
    dates = full_window_dates(campaign, as_of=as_of, window_days=window_days)
    if len(dates) < 2:
        return None
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
    latest = dates[-1]
    train = day + dt.timedelta(days=window_days) <= latest
    held = day == latest
    evaluation, curves = None, pd.DataFrame()

    def fit(mask: np.ndarray) -> UpliftLearner:
        return UpliftLearner(learner=learner, random_state=seed).fit(
            X[mask], rows.loc[mask, "treated"], rows.loc[mask, "outcome"],
            propensity=rows.loc[mask, "propensity"], groups=rows.loc[mask, "customer_id"])

    t_held = rows.loc[held, "treated"].to_numpy()
    t_train = rows.loc[train, "treated"].to_numpy()
    enough = min(int(t_train.sum()), int((~t_train).sum())) >= 2 * UpliftLearner().n_folds
    if enough and t_held.any() and (~t_held).any():
        early = fit(train)
        Xh = X[held]
        # the pooled effect ranks by expected margin (its rate is one number)
        scores = {"model": early.predict(Xh), "pooled": early.predict_baseline(Xh)}
        if baselines is not None:
            scores.update(baselines(rows[held].reset_index(drop=True)))
        y_held = rows.loc[held, "outcome"].to_numpy()
        evaluation = compare_rankings(scores, t_held, y_held, depth_share=depth_share)
        evaluation.update(latest_campaign=latest.isoformat(),
                          train_campaigns=sorted({d.isoformat() for d in day[train]}),
                          window_days=int(window_days), model_fit=early.summary())
        curves = pd.concat([qini_curve(s, t_held, y_held).assign(ranking=name)
                            for name, s in scores.items()], ignore_index=True)
    t_all = rows["treated"].to_numpy()
    if min(int(t_all.sum()), int((~t_all).sum())) < 2 * UpliftLearner().n_folds:
        return None
    model = fit(np.ones(len(rows), dtype=bool))
    return UpliftResult(model=model, columns=columns, categories=categories,
                        evaluation=evaluation, dates=dates, curves=curves)
