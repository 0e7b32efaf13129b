"""Churn and value models, their baselines, and out-of-time evaluation.

- :class:`ChurnModel`: XGBoost (``hist``) classifier with early stopping on a later
  validation cutoff, calibrated on that out-of-time data with isotonic or Platt scaling,
  whichever has the lower Brier score there.
- :class:`ValueModel`: XGBoost regressor with a Tweedie objective for spend over the
  horizon: a point mass at zero (customers who buy nothing) plus a skewed positive part,
  which a squared-error model handles badly.
- Baselines, fitted and judged on the same data: an RFM lookup (observed churn rate and
  mean future spend per RFM cell), logistic regression on the same features, "last
  period repeats" for value, and BG/NBD + Gamma-Gamma (:mod:`analysis.clv`).

Models are saved as XGBoost JSON plus a metadata JSON (features, categories,
calibration, cutoffs, horizon, metrics, versions, data fingerprint); nothing is pickled
(the logistic regression can be kept as JSON: :meth:`LogisticChurn.to_dict`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from scipy import stats
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from analysis.clv import BetaGeoModel, GammaGammaModel, rfm_summary
from analysis.features import LABEL_COLUMNS

__all__ = [
    "ChurnModel",
    "ModelRun",
    "attach_scores",
    "data_fingerprint",
    "fit_and_evaluate",
    "honest_cutoffs",
    "metrics_by_group",
    "read_model_run",
    "write_model_run",
    "LogisticChurn",
    "ValueModel",
    "calibration_table",
    "churn_metrics",
    "decile_table",
    "feature_columns",
    "prepare_matrix",
    "rfm_lookup",
    "value_metrics",
    "read_horizon",
    "skipped_reason",
    "write_skipped_models",
]

#: Columns that are never model inputs (ids, labels, bookkeeping).
NOT_FEATURES = {"customer_id", "cutoff", "cutoff_month", "spend_last_horizon", *LABEL_COLUMNS}


def feature_columns(frame: pd.DataFrame, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Model inputs: every numeric or text column but ids, labels, ``exclude`` and
    columns without a single value (e.g. ``season_index`` with under a year of history)."""
    excluded = NOT_FEATURES | {c.casefold() for c in exclude} | set(exclude)
    return [c for c in frame.columns if c not in excluded and c.casefold() not in excluded
            and frame[c].notna().any()]


def categories_of(frame: pd.DataFrame, columns: list[str], *, max_levels: int = 30
                  ) -> dict[str, list[str]]:
    """Levels of each text column (the most frequent ``max_levels``), for encoding."""
    out = {}
    for col in columns:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            out[col] = frame[col].astype("str").value_counts().head(max_levels).index.tolist()
    return out


def prepare_matrix(frame: pd.DataFrame, columns: list[str],
                   categories: dict[str, list[str]]) -> pd.DataFrame:
    """The model matrix: numeric columns as float32 (the precision XGBoost works in, half
    the memory of float64 on large bases), text columns as fixed categoricals (levels
    unseen in training become missing)."""
    out = {}
    for col in columns:
        if col in categories:
            values = frame[col].astype("object").where(frame[col].notna(), None)
            out[col] = pd.Categorical(values, categories=categories[col])
        else:
            out[col] = pd.to_numeric(frame[col], errors="coerce").astype("float32")
    return pd.DataFrame(out, index=frame.index)


# --------------------------------------------------------------------------- models


@dataclass
class _Booster:
    max_depth: int = 4
    learning_rate: float = 0.05
    n_estimators: int = 600
    early_stopping_rounds: int = 40
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    device: str = "cpu"
    seed: int = 42
    n_jobs: int | None = None

    def _params(self, objective: dict) -> dict:
        return {"tree_method": "hist", "device": self.device, "max_depth": self.max_depth,
                "eta": self.learning_rate, "min_child_weight": self.min_child_weight,
                "subsample": self.subsample, "colsample_bytree": self.colsample_bytree,
                "lambda": self.reg_lambda, "seed": self.seed, "nthread": self.n_jobs or 0,
                **objective}

    def _train(self, objective: dict, X, y, X_valid, y_valid, weight=None) -> xgb.Booster:
        dtrain = xgb.DMatrix(X, label=y, weight=weight, enable_categorical=True)
        dvalid = xgb.DMatrix(X_valid, label=y_valid, enable_categorical=True)
        booster = xgb.train(self._params(objective), dtrain, num_boost_round=self.n_estimators,
                            evals=[(dvalid, "valid")],
                            early_stopping_rounds=self.early_stopping_rounds,
                            verbose_eval=False)
        self.best_iteration_ = int(booster.best_iteration)
        return booster

    def _check(self):
        if not hasattr(self, "booster_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit first")

    def _margin(self, X) -> np.ndarray:
        self._check()
        d = xgb.DMatrix(X, enable_categorical=True)
        return self.booster_.predict(d, output_margin=True,
                                     iteration_range=(0, self.best_iteration_ + 1))

    def contributions(self, X: pd.DataFrame, *, chunk_rows: int = 100_000) -> pd.DataFrame:
        """Exact TreeSHAP values (XGBoost's ``pred_contribs``), in the model's margin
        units (log-odds for churn, log-spend for value); ``bias`` is the base value.

        Computed ``chunk_rows`` customers at a time into one float32 array: XGBoost's
        working memory for a million customers at once is several times the result."""
        self._check()
        values = np.empty((len(X), X.shape[1] + 1), dtype=np.float32)
        for start in range(0, len(X), chunk_rows):
            d = xgb.DMatrix(X.iloc[start:start + chunk_rows], enable_categorical=True)
            values[start:start + chunk_rows] = self.booster_.predict(
                d, pred_contribs=True, iteration_range=(0, self.best_iteration_ + 1))
        return pd.DataFrame(values, index=X.index, columns=[*X.columns, "bias"])

    def save(self, folder: str | Path, name: str, metadata: dict) -> dict[str, Path]:
        """``name.json`` (the booster) and ``name.meta.json`` (everything else)."""
        self._check()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model_path = folder / f"{name}.json"
        self.booster_.save_model(str(model_path))
        meta = {"best_iteration": self.best_iteration_, "params": {
            k: getattr(self, k) for k in ("max_depth", "learning_rate", "n_estimators",
                                          "min_child_weight", "subsample",
                                          "colsample_bytree", "reg_lambda", "device",
                                          "seed")},
                "features": self.features_, "categories": self.categories_, **metadata}
        meta_path = folder / f"{name}.meta.json"
        meta_path.write_text(json.dumps(meta, indent=2, default=_json_default))
        return {"model": model_path, "metadata": meta_path}


@dataclass
class ChurnModel(_Booster):
    """Calibrated XGBoost churn classifier.

    ``fit`` trains on ``X, y`` with early stopping on ``X_valid, y_valid`` (a later
    cutoff), then fits isotonic and Platt calibration on that validation data and keeps
    the one with the lower cross-validated Brier score.

    Attributes
    ----------
    booster_, best_iteration_, calibration_ (dict: ``method`` and its parameters).
    """

    def fit(self, X: pd.DataFrame, y, X_valid: pd.DataFrame, y_valid) -> ChurnModel:
        self.features_ = list(X.columns)
        self.categories_ = {c: list(X[c].cat.categories) for c in X.columns
                            if isinstance(X[c].dtype, pd.CategoricalDtype)}
        self.booster_ = self._train({"objective": "binary:logistic", "eval_metric": "logloss"},
                                    X, y, X_valid, y_valid)
        self.calibration_ = choose_calibration(self._margin(X_valid), np.asarray(y_valid),
                                               seed=self.seed)
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Calibrated P(churn), kept within [0.001, 0.999]: a finite sample never makes
        an outcome certain."""
        return np.clip(apply_calibration(self.calibration_, self._margin(X)), 0.001, 0.999)

    def predict_uncalibrated(self, X: pd.DataFrame) -> np.ndarray:
        return 1 / (1 + np.exp(-self._margin(X)))


@dataclass
class ValueModel(_Booster):
    """XGBoost regressor of spend over the horizon with a Tweedie objective.

    Negative targets (net refunds) are clipped to zero for training.
    """

    tweedie_variance_power: float = 1.5

    def fit(self, X: pd.DataFrame, y, X_valid: pd.DataFrame, y_valid) -> ValueModel:
        self.features_ = list(X.columns)
        self.categories_ = {c: list(X[c].cat.categories) for c in X.columns
                            if isinstance(X[c].dtype, pd.CategoricalDtype)}
        objective = {"objective": "reg:tweedie",
                     "tweedie_variance_power": self.tweedie_variance_power,
                     "eval_metric": f"tweedie-nloglik@{self.tweedie_variance_power}"}
        self.booster_ = self._train(objective, X, np.clip(y, 0, None), X_valid,
                                    np.clip(y_valid, 0, None))
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return np.exp(self._margin(X))


class LogisticChurn:
    """Logistic regression on the same features (imputed, log-scaled, standardised; text
    columns one-hot): a baseline, and one of the churn candidates (:func:`churn_selection`).

    Fitted with scikit-learn; the fitted transformation and coefficients are then kept as
    plain arrays (``params_``), from which the model predicts and explains itself, so that
    a model read back from JSON (:meth:`to_dict`, :meth:`from_dict`) predicts exactly as
    the fitted one. No pickle.

    Attributes
    ----------
    features_ : the input columns, in order.
    params_ : dict (JSON-safe): ``numeric`` and ``text`` columns, ``medians`` (imputation),
        ``indicators`` (numeric columns with a missing-value indicator), ``mean`` and
        ``scale`` (standardisation after the signed log), ``levels`` (one-hot levels per
        text column; blanks are the level "missing"), ``coef``, ``intercept``, ``center``
        (each design column's training mean).
    """

    def __init__(self, *, C: float = 1.0):
        self.C = C

    def fit(self, X: pd.DataFrame, y) -> LogisticChurn:
        numeric = [c for c in X.columns if not isinstance(X[c].dtype, pd.CategoricalDtype)]
        text = [c for c in X.columns if c not in numeric]
        signed_log = FunctionTransformer(_signed_log, feature_names_out="one-to-one")
        transform = ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                                keep_empty_features=True),
                                  signed_log, StandardScaler()), numeric),
            ("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="missing"),
                                  OneHotEncoder(handle_unknown="ignore")), text),
        ], sparse_threshold=0)
        pipeline = make_pipeline(transform, LogisticRegression(C=self.C, max_iter=2000))
        pipeline.fit(_objects(X), np.asarray(y))
        params = {"numeric": numeric, "text": text, "medians": [], "indicators": [],
                  "mean": [], "scale": [], "levels": []}
        if numeric:
            imputer, _, scaler = transform.named_transformers_["num"].steps
            indicator = imputer[1].indicator_
            params.update(medians=imputer[1].statistics_.astype(float).tolist(),
                          indicators=[numeric[i] for i in indicator.features_],
                          mean=scaler[1].mean_.tolist(), scale=scaler[1].scale_.tolist())
        if text:
            encoder = transform.named_transformers_["cat"].steps[1][1]
            params["levels"] = [[str(v) for v in c] for c in encoder.categories_]
        lr = pipeline[-1]
        params.update(coef=lr.coef_[0].tolist(), intercept=float(lr.intercept_[0]))
        self.features_ = list(X.columns)
        self.params_ = params
        self.params_["center"] = self._design(X).mean(axis=0).tolist()
        self.pipeline_ = pipeline
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """P(churn) of each row (1-D, like :meth:`ChurnModel.predict_proba`)."""
        return 1 / (1 + np.exp(-self.log_odds(X)))

    def log_odds(self, X: pd.DataFrame, *, chunk_rows: int = 100_000) -> np.ndarray:
        """The linear predictor, ``chunk_rows`` rows at a time (the design matrix of a
        large base is several times its feature matrix)."""
        self._check()
        coef = np.asarray(self.params_["coef"])
        return np.concatenate([self._design(X.iloc[s:s + chunk_rows]) @ coef
                               for s in range(0, len(X), chunk_rows)] or [np.empty(0)]
                              ) + self.params_["intercept"]

    def contributions(self, X: pd.DataFrame, *, chunk_rows: int = 100_000) -> pd.DataFrame:
        """Exact SHAP values of the log-odds, in the layout of
        :meth:`ChurnModel.contributions` (one column per feature, plus ``bias``).

        The model is additive in its features, so a feature's SHAP value is its own
        terms' distance from their training mean: the sum over its design columns (the
        standardised value, its missing indicator, its one-hot levels) of coefficient x
        (value - training mean). ``bias`` is the log-odds at the training means; a row
        adds up to its log-odds.
        """
        self._check()
        p = self.params_
        coef, center = np.asarray(p["coef"]), np.asarray(p["center"])
        owner = np.zeros((len(coef), len(self.features_)))
        owner[np.arange(len(coef)), [self.features_.index(f) for f in self._owners()]] = 1.0
        values = np.empty((len(X), len(self.features_) + 1), dtype=np.float32)
        for s in range(0, len(X), chunk_rows):
            values[s:s + chunk_rows, :-1] = ((self._design(X.iloc[s:s + chunk_rows]) - center)
                                             * coef) @ owner
        values[:, -1] = p["intercept"] + coef @ center
        return pd.DataFrame(values, index=X.index, columns=[*self.features_, "bias"])

    def to_dict(self) -> dict:
        """The fitted model as plain JSON-safe data."""
        self._check()
        return {"C": self.C, "features": self.features_, "params": self.params_}

    @classmethod
    def from_dict(cls, data: dict) -> LogisticChurn:
        """A model from :meth:`to_dict` (predicts exactly as the one saved)."""
        model = cls(C=data["C"])
        model.features_, model.params_ = list(data["features"]), data["params"]
        return model

    def _check(self):
        if not hasattr(self, "params_"):
            raise RuntimeError("LogisticChurn is not fitted: call fit first")

    def _owners(self) -> list[str]:
        """The input column behind each design column."""
        p = self.params_
        return [*p["numeric"], *p["indicators"],
                *(c for c, levels in zip(p["text"], p["levels"], strict=True) for _ in levels)]

    def _design(self, X: pd.DataFrame) -> np.ndarray:
        """The design matrix, as the fitted scikit-learn transformation builds it."""
        p = self.params_
        blocks = []
        if p["numeric"]:
            values = X[p["numeric"]].to_numpy(dtype=float)
            missing = np.isnan(values)
            values = np.where(missing, np.asarray(p["medians"]), values)
            flags = missing[:, [p["numeric"].index(c) for c in p["indicators"]]].astype(float)
            block = _signed_log(np.hstack([values, flags]))
            blocks.append((block - np.asarray(p["mean"])) / np.asarray(p["scale"]))
        for col, levels in zip(p["text"], p["levels"], strict=True):
            text = X[col].astype("object")
            text = text.where(text.notna(), "missing").astype(str).to_numpy()
            blocks.append((text[:, None] == np.asarray(levels, dtype=object)[None, :])
                          .astype(float))
        return np.hstack(blocks) if blocks else np.zeros((len(X), 0))


def _signed_log(values):
    return np.sign(values) * np.log1p(np.abs(values))


def rfm_lookup(train: pd.DataFrame, score: pd.DataFrame, *, target: str) -> np.ndarray:
    """Baseline: the mean ``target`` of training customers in the same RFM cell.

    Cells are recency, frequency and monetary quintiles, each cut at the training
    snapshot's quintile edges; an unseen cell falls back to the overall mean.
    """
    cols = ("recency_days", "frequency", "monetary_total")
    edges = {c: np.unique(np.quantile(train[c], [0.2, 0.4, 0.6, 0.8])) for c in cols}

    def cell(frame):
        return pd.Series(list(zip(*(np.searchsorted(edges[c], frame[c], side="right")
                                    for c in cols), strict=True)), index=frame.index)

    table = train[target].groupby(cell(train)).mean()
    return cell(score).map(table).fillna(train[target].mean()).to_numpy(dtype=float)


def bgnbd_baseline(lines, *, cutoff: dt.date, horizon_days: int,
                   customers: pd.Series) -> tuple[pd.DataFrame, dict]:
    """BG/NBD + Gamma-Gamma fitted on history before ``cutoff`` (weeks).

    ``lines`` is a frame of order lines or a DuckDB connection with a ``lines`` view
    (see :func:`analysis.clv.rfm_summary`).

    Returns
    -------
    frame : indexed like ``customers``: ``expected_purchases`` over the horizon,
        ``p_alive``, ``expected_spend`` (expected purchases x expected value per purchase).
    params : the fitted parameters of both models.
    """
    summary = rfm_summary(lines, calibration_end=cutoff)
    bg = BetaGeoModel().fit(summary["frequency"], summary["recency"], summary["T"])
    gg = GammaGammaModel().fit(summary["frequency"], summary["monetary_value"])
    s = summary.reindex(customers)
    weeks = horizon_days / 7
    purchases = bg.expected_purchases(weeks, s["frequency"], s["recency"], s["T"])
    spend = gg.expected_spend(s["frequency"], s["monetary_value"])
    frame = pd.DataFrame({"expected_purchases": purchases,
                          "p_alive": bg.probability_alive(s["frequency"], s["recency"], s["T"]),
                          "expected_spend": purchases * spend}, index=customers.index)
    return frame, {"bgnbd": bg.params_, "bgnbd_loglik": bg.loglik_,
                   "gamma_gamma": gg.params_}


# --------------------------------------------------------------------------- calibration


def choose_calibration(margin: np.ndarray, y: np.ndarray, *, seed: int = 42) -> dict:
    """Isotonic or Platt scaling of ``margin``, whichever has the lower Brier score in
    2-fold cross-validation on this (out-of-time) data; refitted on all of it."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % 2
    scores = {"isotonic": [], "platt": []}
    for k in (0, 1):
        fit, held = fold != k, fold == k
        for method in scores:
            cal = _fit_calibration(method, margin[fit], y[fit])
            scores[method].append(brier_score_loss(y[held], apply_calibration(cal,
                                                                               margin[held])))
    method = min(scores, key=lambda m: np.mean(scores[m]))
    cal = _fit_calibration(method, margin, y)
    cal["cv_brier"] = {m: float(np.mean(v)) for m, v in scores.items()}
    return cal


def _fit_calibration(method: str, margin: np.ndarray, y: np.ndarray) -> dict:
    if method == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(margin, y)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(),
                "y": iso.y_thresholds_.tolist()}
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(margin.reshape(-1, 1), y)
    return {"method": "platt", "slope": float(lr.coef_[0, 0]),
            "intercept": float(lr.intercept_[0])}


def apply_calibration(cal: dict, margin: np.ndarray) -> np.ndarray:
    """Calibrated probabilities from raw margins (no fitted object needed: JSON-safe)."""
    if cal["method"] == "isotonic":
        return np.interp(margin, np.asarray(cal["x"]), np.asarray(cal["y"]))
    return 1 / (1 + np.exp(-(cal["slope"] * margin + cal["intercept"])))


# --------------------------------------------------------------------------- metrics


def churn_metrics(y, score, *, probabilities: bool = True) -> dict:
    """ROC-AUC, PR-AUC, Brier, expected calibration error (10 equal-width bins), lift
    and capture of churners in the top 10 % and 20 % by score.

    ``probabilities=False`` for rank-only scores: Brier and ECE are then left out.
    """
    y = np.asarray(y, dtype=float)
    s = np.asarray(score, dtype=float)
    out = {"n": int(len(y)), "churn_rate": float(y.mean()),
           "roc_auc": float(roc_auc_score(y, s)), "pr_auc": float(average_precision_score(y, s))}
    if probabilities:
        out["brier"] = float(brier_score_loss(y, s))
        bins = np.minimum((s * 10).astype(int), 9)
        out["ece"] = float(sum(abs(y[bins == b].mean() - s[bins == b].mean()) * (bins == b).mean()
                               for b in range(10) if (bins == b).any()))
    order = np.argsort(-s, kind="stable")
    for share in (0.1, 0.2):
        top = order[: max(1, int(round(share * len(y))))]
        pct = int(share * 100)
        out[f"lift_top{pct}"] = float(y[top].mean() / y.mean()) if y.mean() > 0 else np.nan
        out[f"capture_top{pct}"] = float(y[top].sum() / y.sum()) if y.sum() > 0 else np.nan
    return out


def value_metrics(actual, predicted) -> dict:
    """MAE, RMSE, Spearman, normalized Gini, top-decile capture, totals."""
    a = np.asarray(actual, dtype=float)
    p = np.asarray(predicted, dtype=float)
    order = np.argsort(-p, kind="stable")
    top = order[: max(1, int(round(0.1 * len(a))))]
    return {
        "n": int(len(a)),
        "mae": float(np.mean(np.abs(a - p))),
        "rmse": float(np.sqrt(np.mean((a - p) ** 2))),
        "spearman": float(stats.spearmanr(a, p).statistic),
        "gini": normalized_gini(a, p),
        "top_decile_capture": float(a[top].sum() / a.sum()) if a.sum() > 0 else np.nan,
        "total_predicted": float(p.sum()),
        "total_actual": float(a.sum()),
    }


def normalized_gini(actual, predicted) -> float:
    """Gini of ``actual`` ordered by ``predicted``, over the Gini of the perfect order."""
    def gini(a, p):
        order = np.lexsort((np.arange(len(p)), -p))
        cum = np.cumsum(a[order]) / a.sum()
        return float(np.sum(cum - (np.arange(1, len(a) + 1) / len(a))) / len(a))

    a = np.asarray(actual, dtype=float)
    p = np.asarray(predicted, dtype=float)
    return gini(a, p) / gini(a, a)


def decile_table(actual, score, *, n_bins: int = 10) -> pd.DataFrame:
    """Customers ranked by score in ``n_bins`` equal groups (1 = highest score).

    Returns
    -------
    DataFrame
        ``decile``, ``n``, ``mean_score``, ``mean_actual``, ``sum_actual``,
        ``capture`` (share of the total actual), ``cumulative_capture``, ``lift``.
    """
    a = np.asarray(actual, dtype=float)
    s = np.asarray(score, dtype=float)
    order = np.argsort(-s, kind="stable")
    decile = np.empty(len(a), dtype=int)
    decile[order] = np.arange(len(a)) * n_bins // len(a) + 1
    df = pd.DataFrame({"decile": decile, "score": s, "actual": a})
    out = df.groupby("decile").agg(n=("actual", "size"), mean_score=("score", "mean"),
                                   mean_actual=("actual", "mean"),
                                   sum_actual=("actual", "sum")).reset_index()
    total = a.sum()
    out["capture"] = out["sum_actual"] / total if total else np.nan
    out["cumulative_capture"] = out["capture"].cumsum()
    out["lift"] = out["mean_actual"] / a.mean() if a.mean() else np.nan
    return out


def calibration_table(y, probability, *, n_bins: int = 10) -> pd.DataFrame:
    """Mean predicted against observed churn in equal-frequency bins of the prediction."""
    df = pd.DataFrame({"y": np.asarray(y, float), "p": np.asarray(probability, float)})
    df["bin"] = pd.qcut(df["p"].rank(method="first"), n_bins, labels=False)
    return df.groupby("bin").agg(n=("y", "size"), mean_predicted=("p", "mean"),
                                 observed=("y", "mean")).reset_index()


# --------------------------------------------------------------------------- helpers


def _objects(X: pd.DataFrame) -> pd.DataFrame:
    out = X.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.CategoricalDtype):
            out[c] = out[c].astype("object")
    return out


def _json_default(value):
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- the model step


@dataclass
class ModelRun:
    """Everything the model step produces for one scoring date.

    Attributes
    ----------
    horizon_days : the label horizon.
    cutoffs : ``train`` (list), ``valid`` and ``eval`` cutoffs (ISO dates).
    churn, value : the fitted models.
    evaluation : one row per customer at the evaluation cutoff: ``frequency`` (history),
        ``churned``, ``future_spend`` and each method's score (``churn_<method>``, ``value_<method>``).
    churn_metrics, value_metrics : one row per method (out-of-time, eval cutoff).
    scores : at the scoring date: ``customer_id``, ``churn_probability``,
        ``predicted_value``, ``churn_reasons``, ``value_reasons``.
    churn_shap, value_shap : SHAP values at the scoring date (+ ``bias``).
    score_features : the model matrix at the scoring date (same rows).
    clv_params : BG/NBD and Gamma-Gamma parameters at the evaluation cutoff.
    drift : PSI of each numeric feature between training and scoring
        (:func:`analysis.monitor.feature_drift`).
    churn_drivers, value_drivers : the global drivers (:func:`analysis.explain.
        global_drivers`) of each model at the scoring date.

    A run read back with :func:`read_model_run` holds only the tables asked for (the
    others are None).
    """

    horizon_days: int
    cutoffs: dict
    churn: ChurnModel
    value: ValueModel
    clv_params: dict
    sizes: dict
    evaluation: pd.DataFrame | None = None
    churn_metrics: pd.DataFrame | None = None
    value_metrics: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    churn_shap: pd.DataFrame | None = None
    value_shap: pd.DataFrame | None = None
    score_features: pd.DataFrame | None = None
    drift: pd.DataFrame | None = None
    churn_drivers: pd.DataFrame | None = None
    value_drivers: pd.DataFrame | None = None

    def summary(self) -> dict:
        """Headline facts, JSON-friendly (for metrics.json and the model metadata)."""
        return {"horizon_days": self.horizon_days, "cutoffs": self.cutoffs,
                "sizes": self.sizes, "clv_params": self.clv_params,
                "churn_calibration": self.churn.calibration_["method"],
                "churn_best_iteration": self.churn.best_iteration_,
                "value_best_iteration": self.value.best_iteration_,
                "churn": self.churn_metrics.set_index("method").to_dict(orient="index"),
                "value": self.value_metrics.set_index("method").to_dict(orient="index")}


def fit_and_evaluate(con, *, as_of: dt.date,
                     horizon_days: int, n_cutoffs: int, step_days: int,
                     exclude: tuple[str, ...] = (), seed: int = 42, device: str = "cpu",
                     min_customers: int = 200, max_train_rows: int = 300_000,
                     max_baseline_rows: int = 100_000) -> ModelRun:
    """Train on rolling-origin snapshots, judge out of time, score at ``as_of``.

    Cutoffs come from :func:`honest_cutoffs`: the evaluation cutoff is never used in
    training, and no training or validation label looks past it. Training snapshots
    beyond ``max_train_rows`` rows are sampled (uniformly, fixed seed), and the logistic
    baseline is fitted on at most ``max_baseline_rows`` of them: on large customer bases
    more rows add time, not accuracy.

    Raises
    ------
    InsufficientDataError
        With fewer than three usable cutoffs, or too few customers or churners.
    """
    from analysis.errors import InsufficientDataError
    from analysis.explain import global_drivers, reason_codes
    from analysis.features import build_snapshots

    first = con.execute("SELECT MIN(order_date) FROM lines").fetchone()[0]
    eval_cut, valid_cut, train_cuts = honest_cutoffs(
        as_of=as_of, horizon_days=horizon_days, n_train=max(n_cutoffs - 2, 1),
        step_days=step_days, first_date=first)
    if not train_cuts:
        raise InsufficientDataError(
            f"models need an evaluation cutoff ({horizon_days} days before the scoring date), "
            f"a validation cutoff {horizon_days} days before it and training cutoffs another "
            f"{horizon_days} days earlier, each with {horizon_days} days of history: the data "
            f"from {first} to {as_of} is too short; use a shorter horizon or more history")
    # on large bases, draw the training customers in SQL before building their features
    # (a share per cutoff), rather than building every snapshot and sampling after
    n_known = con.execute("SELECT COUNT(DISTINCT customer_id) FROM lines WHERE order_date "
                          f"< DATE '{eval_cut.isoformat()}'").fetchone()[0]
    share = max_train_rows / max(n_known * len(train_cuts), 1)
    # memory: each snapshot is built on its own (no stacked copy to split), and once the
    # model matrices exist only the columns the evaluation needs are kept
    valid = build_snapshots(con, cutoffs=[valid_cut], horizon_days=horizon_days,
                            exclude_attributes=exclude)
    test = build_snapshots(con, cutoffs=[eval_cut], horizon_days=horizon_days,
                           exclude_attributes=exclude)
    train = build_snapshots(con, cutoffs=train_cuts, horizon_days=horizon_days,
                            exclude_attributes=exclude,
                            sample_share=1.1 * share if share < 0.9 else None)
    for name, frame in (("training", train), ("validation", valid), ("evaluation", test)):
        n_pos = int(frame["churned"].sum())
        if len(frame) < min_customers or n_pos < 20 or len(frame) - n_pos < 20:
            raise InsufficientDataError(
                f"the {name} snapshot has {len(frame):,} customers ({n_pos:,} churned): "
                f"at least {min_customers} customers and 20 churners and 20 non-churners "
                f"are needed for a meaningful model")
    if len(train) > max_train_rows:
        train = train.sample(max_train_rows, random_state=seed).reset_index(drop=True)
    columns = feature_columns(train, exclude=exclude)
    cats = categories_of(train, columns)
    X = {k: prepare_matrix(f, columns, cats) for k, f in
         (("train", train), ("valid", valid), ("test", test))}
    rfm = ["recency_days", "frequency", "monetary_total"]
    train = train[[*rfm, "churned", "future_spend"]]
    valid = valid[["churned", "future_spend"]]
    test = test[["customer_id", *rfm, "churned", "future_spend", "spend_last_horizon"]]

    churn = ChurnModel(seed=seed, device=device).fit(X["train"], train["churned"],
                                                     X["valid"], valid["churned"])
    value = ValueModel(seed=seed, device=device).fit(X["train"], train["future_spend"],
                                                     X["valid"], valid["future_spend"])
    n_valid = len(valid)
    del X["valid"], valid
    small = np.random.default_rng(seed).permutation(len(train))[:max_baseline_rows]
    logistic = LogisticChurn().fit(X["train"].iloc[small], train["churned"].iloc[small])
    bg, clv_params = bgnbd_baseline(con, cutoff=eval_cut, horizon_days=horizon_days,
                                    customers=test["customer_id"])
    evaluation = pd.DataFrame({
        "customer_id": test["customer_id"], "frequency": test["frequency"],
        "churned": test["churned"], "future_spend": test["future_spend"],
        "churn_model": churn.predict_proba(X["test"]),
        "churn_model_uncalibrated": churn.predict_uncalibrated(X["test"]),
        "churn_logistic": logistic.predict_proba(X["test"]),
        "churn_rfm": rfm_lookup(train, test, target="churned"),
        "churn_bgnbd": -bg["expected_purchases"].to_numpy(),
        "value_model": value.predict(X["test"]),
        "value_last_period": test["spend_last_horizon"].clip(lower=0),
        "value_rfm": rfm_lookup(train, test, target="future_spend"),
        "value_bgnbd_gg": bg["expected_spend"].to_numpy(),
    })
    n_train, n_test = len(train), len(test)
    del X["test"], test, bg, logistic
    churn_rows = []
    for method, probs in (("model", True), ("model_uncalibrated", True), ("logistic", True),
                          ("rfm", True), ("bgnbd", False)):
        m = churn_metrics(evaluation["churned"], evaluation[f"churn_{method}"],
                          probabilities=probs)
        churn_rows.append({"method": method, **m})
    value_rows = [{"method": method, **value_metrics(evaluation["future_spend"],
                                                     evaluation[f"value_{method}"])}
                  for method in ("model", "last_period", "rfm", "bgnbd_gg")]

    from analysis.features import build_features
    from analysis.monitor import feature_drift

    score_features = build_features(con, cutoff=as_of, horizon_days=horizon_days, labels=False,
                                    exclude_attributes=exclude)
    score_X = prepare_matrix(score_features, columns, cats)
    drift = feature_drift(X.pop("train"), score_X)
    churn_shap = churn.contributions(score_X)
    value_shap = value.contributions(score_X)
    scores = pd.DataFrame({
        "customer_id": score_features["customer_id"].to_numpy(),
        "churn_probability": churn.predict_proba(score_X),
        "predicted_value": value.predict(score_X),
        "churn_reasons": reason_codes(churn_shap, score_features).to_numpy(),
        "value_reasons": reason_codes(value_shap, score_features).to_numpy(),
    })
    churn_drivers = global_drivers(churn_shap, score_X)
    value_drivers = global_drivers(value_shap, score_X)
    n_score = len(score_features)
    del score_features
    return ModelRun(
        horizon_days=horizon_days,
        cutoffs={"train": [c.isoformat() for c in train_cuts], "valid": valid_cut.isoformat(),
                 "eval": eval_cut.isoformat(), "score": as_of.isoformat()},
        churn=churn, value=value, evaluation=evaluation,
        churn_metrics=pd.DataFrame(churn_rows), value_metrics=pd.DataFrame(value_rows),
        scores=scores, churn_shap=churn_shap, value_shap=value_shap, score_features=score_X,
        clv_params=clv_params, drift=drift, churn_drivers=churn_drivers,
        value_drivers=value_drivers,
        sizes={"train": n_train, "train_cutoffs": len(train_cuts), "valid": n_valid,
               "eval": n_test, "score": n_score, "features": len(columns)},
    )


def honest_cutoffs(*, as_of: dt.date, horizon_days: int, n_train: int, step_days: int,
                   first_date: dt.date) -> tuple[dt.date, dt.date, list[dt.date]]:
    """Evaluation, validation and training cutoffs whose labels never overlap.

    - evaluation: ``as_of - H`` (the latest cutoff whose horizon is fully observed);
    - validation: ``evaluation - H`` (its labels end where the evaluation starts);
    - training: ``validation - H - k * step_days`` for k = 0 .. n_train - 1 (labels end
      by the validation cutoff), keeping those with at least H days of history.
    """
    h = dt.timedelta(days=horizon_days)
    eval_cut = as_of - h
    valid_cut = eval_cut - h
    train = [valid_cut - h - dt.timedelta(days=k * step_days) for k in range(n_train)]
    train = [c for c in train if (c - first_date).days >= horizon_days]
    return eval_cut, valid_cut, train


def write_model_run(run: ModelRun, out_dir: str | Path, *, fingerprint: str,
                    versions: dict) -> dict[str, Path]:
    """Models (XGBoost JSON + metadata), evaluation and SHAP tables (Parquet), summary.

    Returns
    -------
    dict of Path
    """
    out_dir = Path(out_dir)
    models = out_dir / "models"
    meta = {"cutoffs": run.cutoffs, "horizon_days": run.horizon_days,
            "data_fingerprint": fingerprint, "versions": versions}
    written = {}
    for name, model, metrics in (("churn", run.churn, run.churn_metrics),
                                 ("value", run.value, run.value_metrics)):
        extra = {"metrics": metrics.set_index("method").to_dict(orient="index")}
        if name == "churn":
            extra["calibration"] = run.churn.calibration_
        paths = model.save(models, name, {**meta, **extra})
        written[f"{name}_model"], written[f"{name}_metadata"] = paths["model"], paths["metadata"]
    tables = out_dir / "models"
    for name in MODEL_TABLES:
        frame = getattr(run, name)
        if frame is None:
            continue
        path = tables / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        written[name] = path
    path = out_dir / "models.json"
    path.write_text(json.dumps(run.summary(), indent=2, default=_json_default))
    written["summary"] = path
    return written


#: The tables a model run writes under ``models/`` (Parquet).
MODEL_TABLES = ("evaluation", "churn_metrics", "value_metrics", "scores", "churn_shap",
                "value_shap", "score_features", "drift", "churn_drivers", "value_drivers")


def read_model_run(out_dir: str | Path, tables: tuple[str, ...] | None = None) -> ModelRun:
    """Read back what :func:`write_model_run` wrote (boosters from their JSON).

    ``tables`` names the tables of :data:`MODEL_TABLES` to read (default: all); the
    others stay None. On large bases the SHAP and feature tables are large, and a step
    that needs only the models or the metrics should not hold them.

    Raises
    ------
    InsufficientDataError
        When the run skipped the models (:func:`write_skipped_models`).
    """
    out_dir = Path(out_dir)
    reason = skipped_reason(out_dir)
    if reason:
        from analysis.errors import InsufficientDataError

        raise InsufficientDataError(f"this run has no models: {reason}")
    folder = out_dir / "models"
    summary = json.loads((out_dir / "models.json").read_text())
    loaded = {}
    for name, cls in (("churn", ChurnModel), ("value", ValueModel)):
        meta = json.loads((folder / f"{name}.meta.json").read_text())
        model = cls(**meta["params"])
        model.booster_ = xgb.Booster()
        model.booster_.load_model(str(folder / f"{name}.json"))
        model.best_iteration_ = meta["best_iteration"]
        model.features_, model.categories_ = meta["features"], meta["categories"]
        if name == "churn":
            model.calibration_ = meta["calibration"]
        loaded[name] = model
    unknown = set(tables or ()) - set(MODEL_TABLES)
    if unknown:
        raise ValueError(f"unknown model tables {sorted(unknown)}; known: {MODEL_TABLES}")
    tables = {name: pd.read_parquet(folder / f"{name}.parquet")
              for name in (MODEL_TABLES if tables is None else tables)
              if (folder / f"{name}.parquet").is_file()}
    return ModelRun(horizon_days=summary["horizon_days"], cutoffs=summary["cutoffs"],
                    churn=loaded["churn"], value=loaded["value"],
                    clv_params=summary["clv_params"], sizes=summary["sizes"], **tables)


def write_skipped_models(out_dir: str | Path, *, reason: str, horizon_days: int,
                         as_of: dt.date, history_days: int = 365) -> pd.DataFrame:
    """Record that there was too little data for the models, and why.

    ``models.json`` holds ``skipped`` (the reason, shown in the report), the horizon and
    the scoring date. Every customer still gets a value forecast that needs no training:
    the last 12 months' spend (or all of it, over ``history_days`` when the data is
    shorter) at the same rate (``predicted_value``); the churn probability is left
    unknown (missing), so no decision uses a made-up risk.
    """
    out_dir = Path(out_dir)
    customers = pd.read_parquet(out_dir / "customers.parquet")
    window = max(min(365, int(history_days)), 1)
    scores = pd.DataFrame({
        "customer_id": customers["customer_id"],
        "churn_probability": np.nan,
        "predicted_value": customers["spend_365d"].clip(lower=0) * horizon_days / window,
        "churn_reasons": "", "value_reasons": "recent spending rate continued (too little data for a model)"})
    (out_dir / "models.json").write_text(json.dumps(
        {"skipped": reason, "horizon_days": int(horizon_days),
         "cutoffs": {"score": as_of.isoformat()}}, indent=2))
    return attach_scores(out_dir, scores)


def skipped_reason(out_dir: str | Path) -> str | None:
    """Why the run has no models (too little data), or None when it has them."""
    path = Path(out_dir) / "models.json"
    return json.loads(path.read_text()).get("skipped") if path.is_file() else None


def read_horizon(out_dir: str | Path) -> int:
    """The run's label horizon in days (with or without models)."""
    return int(json.loads((Path(out_dir) / "models.json").read_text())["horizon_days"])


def attach_scores(out_dir: str | Path, scores: pd.DataFrame) -> pd.DataFrame:
    """Add ``churn_probability``, ``predicted_value``, ``reasons`` (why the churn risk is
    what it is) and ``value_reasons`` to the run's ``customers.parquet`` / ``.csv``."""
    out_dir = Path(out_dir)
    customers = pd.read_parquet(out_dir / "customers.parquet")
    customers = customers.drop(columns=[c for c in ("churn_probability", "predicted_value",
                                                     "reasons", "value_reasons")
                                        if c in customers])
    merged = customers.merge(
        scores.rename(columns={"churn_reasons": "reasons"}), on="customer_id", how="left")
    from analysis.segments import save_customers

    save_customers(out_dir, merged)
    return merged


def metrics_by_group(evaluation: pd.DataFrame, *, by: str = "frequency",
                     min_class: int = 10) -> pd.DataFrame:
    """Out-of-time accuracy of the model per history group (one, 2-3, 4+ purchase days).

    Returns
    -------
    DataFrame
        ``group``, ``n``, ``churn_rate``, ``churn_auc`` (empty unless the group has at
        least ``min_class`` churners and ``min_class`` stayers: an AUC on fewer is noise),
        ``value_mae``, ``value_mae_last_period``.
    """
    groups = pd.cut(evaluation[by], [0, 1, 3, np.inf], labels=["1 purchase day",
                                                                 "2-3 purchase days",
                                                                 "4+ purchase days"])
    rows = []
    for name, part in evaluation.groupby(groups, observed=True):
        y = part["churned"]
        enough = min(int(y.sum()), int(len(y) - y.sum())) >= min_class
        auc = float(roc_auc_score(y, part["churn_model"])) if enough else np.nan
        rows.append({"group": str(name), "n": len(part), "churn_rate": float(y.mean()),
                     "churn_auc": auc,
                     "value_mae": float(np.mean(np.abs(part["future_spend"]
                                                       - part["value_model"]))),
                     "value_mae_last_period": float(np.mean(np.abs(
                         part["future_spend"] - part["value_last_period"])))})
    return pd.DataFrame(rows)


def data_fingerprint(processed_dir: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the cleaned input tables of a run."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((Path(processed_dir) / "clean").glob("*.parquet")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
