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
- Champion and challengers: the method that scores the customers is chosen on held-out
  data by a proper score (:func:`churn_selection`, :func:`value_selection`): for churn
  calibrated XGBoost, the logistic regression or their blend; for value XGBoost or one
  of its baselines.

Models are saved as XGBoost JSON plus a metadata JSON (features, categories,
calibration, cutoffs, horizon, metrics, versions, data fingerprint), the logistic
regression as JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from analysis.clv import (
    BGNBD_FIT_CUSTOMERS,
    RFM_SUMMARY_COLUMNS,
    fit_bgnbd,
    fit_gamma_gamma,
    fit_positions,
    rfm_summaries,
    rfm_summary,
    summary_of_rows,
)
from analysis.engine import SparkEngine, as_engine
from analysis.errors import InsufficientDataError
from analysis.explain import global_drivers, reason_codes
from analysis.features import (
    LABEL_COLUMNS,
    build_features,
    connect_run,
    data_start,
    honest_cutoffs,
    resolve_as_of,
    resolve_horizon_days,
    snapshots_by_cutoff,
)
from analysis.monitor import drift_bins, drift_counts, feature_drift
from analysis.segments import (
    ACTIVE_STAGES,
    assign_lifecycle,
    lifecycle_thresholds,
)
from analysis.store import RunStore

__all__ = [
    "CHURN_CANDIDATES",
    "METHOD_NAMES",
    "PLAIN_METHOD_NAMES",
    "VALUE_CANDIDATES",
    "churn_step",
    "lifetime_outlook",
    "describe_training",
    "evaluation_sample",
    "explain_customers",
    "score_customers",
    "customers_with_reasons",
    "score_on_spark",
    "scores_on_spark",
    "summary_kept_on_spark",
    "scores_table",
    "drift_on_spark",
    "fit_lifetime",
    "outlook_of",
    "value_of",
    "RfmLookup",
    "SCORES_SCHEMA",
    "ChurnModel",
    "blend_probability",
    "candidate_contributions",
    "candidate_probabilities",
    "choice_record",
    "chosen_method",
    "churn_selection",
    "comparison_table",
    "describe_choice",
    "value_selection",
    "ModelRun",
    "data_fingerprint",
    "fit_and_evaluate",
    "honest_cutoffs",
    "metrics_by_group",
    "read_choice",
    "read_model_run",
    "write_model_run",
    "LogisticChurn",
    "ValueModel",
    "calibration_table",
    "churn_metrics",
    "churn_metrics_table",
    "active_rows",
    "decile_table",
    "feature_columns",
    "fit_churn_candidates",
    "model_feature_names",
    "prepare_matrix",
    "rfm_lookup",
    "value_metrics",
    "skipped_reason",
    "fit_without_labels",
    "label_free_fallback",
    "split_validation",
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


#: Characters XGBoost refuses in a feature name, and what stands for them in the model.
_UNSAFE_IN_NAMES = {"[": "(", "]": ")", "<": "lt"}


def model_feature_names(columns) -> dict:
    """The name XGBoost knows each column by: the column's name with the characters it
    refuses replaced (``[`` → ``(``, ``]`` → ``)``, ``<`` → ``lt``), so that any column
    a user's data has (``Revenue [USD]``, ``Score<5``) can be a feature.

    A name that is already safe is kept; a replaced one that would clash with another
    column's gets ``_2``, ``_3``, ... The mapping depends only on the columns and their
    order, so a saved model finds its features again. Users never see these names: the
    models take and return frames with the original columns (SHAP tables, drivers and
    reason codes included).

    Returns
    -------
    dict
        Original column → model name, one to one (invert it to map back).
    """
    columns = list(columns)
    safe = {c: str(c).translate(str.maketrans(_UNSAFE_IN_NAMES)) for c in columns}
    kept = {c for c in columns if isinstance(c, str) and safe[c] == c}
    taken = set(kept)
    out = {}
    for c in columns:
        name = safe[c]
        if c not in kept:
            k = 2
            while name in taken:
                name, k = f"{safe[c]}_{k}", k + 1
            taken.add(name)
        out[c] = name
    return out


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
    #: a Spark session (``analysis.engine: spark``): training then runs as XGBoost's
    #: own Spark estimator (``xgboost.spark``) on its executors, see :meth:`_train_spark`
    spark: Any = field(default=None, repr=False, compare=False)

    def _params(self, objective: dict) -> dict:
        return {"tree_method": "hist", "device": self.device, "max_depth": self.max_depth,
                "eta": self.learning_rate, "min_child_weight": self.min_child_weight,
                "subsample": self.subsample, "colsample_bytree": self.colsample_bytree,
                "lambda": self.reg_lambda, "seed": self.seed, "nthread": self.n_jobs or 0,
                **objective}

    def _dmatrix(self, X: pd.DataFrame, **labels) -> xgb.DMatrix:
        """``X`` as XGBoost takes it: the columns under their model names
        (:func:`model_feature_names` of ``features_``)."""
        return xgb.DMatrix(X.rename(columns=model_feature_names(self.features_)),
                           enable_categorical=True, **labels)

    def _train(self, objective: dict, X, y, X_valid, y_valid, weight=None) -> xgb.Booster:
        if self.spark is not None:
            return self._train_spark(objective, X, y, X_valid, y_valid, weight)
        self.trained_with_ = "xgboost"
        dtrain = self._dmatrix(X, label=y, weight=weight)
        dvalid = self._dmatrix(X_valid, label=y_valid)
        booster = xgb.train(self._params(objective), dtrain, num_boost_round=self.n_estimators,
                            evals=[(dvalid, "valid")],
                            early_stopping_rounds=self.early_stopping_rounds,
                            verbose_eval=False)
        self.best_iteration_ = int(booster.best_iteration)
        return booster

    def _train_spark(self, objective: dict, X, y, X_valid, y_valid, weight=None
                     ) -> xgb.Booster:
        """:meth:`_train` with ``xgboost.spark``: the same parameters, early stopping on
        the validation rows (marked by a column), categories as their codes with the
        features' types given, so that the booster scores the matrices of
        :func:`prepare_matrix` as a booster trained here does. One worker on a local
        master (the same trees as :meth:`_train` then), one per core of the cluster
        otherwise."""
        from xgboost.spark import SparkXGBClassifier, SparkXGBRegressor

        names = model_feature_names(self.features_)
        rows = pd.concat([X, X_valid], ignore_index=True).rename(columns=names)
        features, kinds = list(rows.columns), []
        for column in rows.columns:
            if isinstance(rows[column].dtype, pd.CategoricalDtype):
                codes = rows[column].cat.codes.astype("float64")
                rows[column] = codes.where(codes >= 0)
                kinds.append("c")
            else:
                rows[column] = rows[column].astype("float64")
                kinds.append("q")
        rows["_label"] = np.concatenate([np.asarray(y, float), np.asarray(y_valid, float)])
        rows["_valid"] = np.arange(len(rows)) >= len(X)
        if weight is not None:
            rows["_weight"] = np.concatenate([np.asarray(weight, float), np.ones(len(X_valid))])
        context = self.spark.sparkContext
        workers = 1 if context.master.startswith("local") else context.defaultParallelism
        params = self._params(objective)
        kw = dict(features_col=features,
                  label_col="_label", validation_indicator_col="_valid",
                  feature_types=kinds, num_workers=workers, n_estimators=self.n_estimators,
                  early_stopping_rounds=self.early_stopping_rounds,
                  max_depth=params["max_depth"], learning_rate=params["eta"],
                  min_child_weight=params["min_child_weight"], subsample=params["subsample"],
                  colsample_bytree=params["colsample_bytree"], reg_lambda=params["lambda"],
                  seed=params["seed"], device=params["device"], tree_method="hist",
                  eval_metric=params["eval_metric"])
        if weight is not None:
            kw["weight_col"] = "_weight"
        # no progress lines in the notebooks (xgboost.spark logs each fit at INFO, and
        # each round's evaluation)
        for logger in ("XGBoost-PySpark", "SparkXGBClassifier", "SparkXGBRegressor"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        kw["verbose"] = False
        if params["objective"] == "binary:logistic":
            estimator = SparkXGBClassifier(**kw)
        else:
            estimator = SparkXGBRegressor(objective=params["objective"], **{
                k: v for k, v in params.items() if k.startswith("tweedie")}, **kw)
        engine = SparkEngine(self.spark)
        engine.register("_training_rows", rows)
        # each partition reaches XGBoost as one batch: xgboost.spark (3.2) fails on an
        # Arrow batch that holds no validation rows, or no training rows (a batch ends at
        # 10,000 rows or 64 MB by default: the million-customer benchmark's training and
        # validation rows, validation rows last, failed in a batch of validation rows)
        caps = {"spark.sql.execution.arrow.maxRecordsPerBatch": "0",
                "spark.sql.execution.arrow.maxBytesPerBatch": str(2**31 - 2)}
        before = {key: self.spark.conf.get(key) for key in caps}
        for key, value in caps.items():
            self.spark.conf.set(key, value)
        try:
            booster = estimator.fit(self.spark.table("_training_rows")).get_booster()
        finally:
            for key, value in before.items():
                self.spark.conf.set(key, value)
            engine.unregister("_training_rows")
        self.best_iteration_ = int(booster.best_iteration)
        self.trained_with_ = f"xgboost.spark ({workers} worker{'s' * (workers > 1)})"
        return booster

    def _check(self):
        if not hasattr(self, "booster_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit first")

    def _margin(self, X) -> np.ndarray:
        self._check()
        d = self._dmatrix(X)
        return self.booster_.predict(d, output_margin=True,
                                     iteration_range=(0, self.best_iteration_ + 1))

    def contributions(self, X: pd.DataFrame, *, chunk_rows: int = 100_000) -> pd.DataFrame:
        """Exact TreeSHAP values (XGBoost's ``pred_contribs``), in the model's margin
        units (log-odds for churn, log-spend for value); ``bias`` is the base value.
        Columns keep ``X``'s names (not the model's, see :func:`model_feature_names`).

        Computed ``chunk_rows`` customers at a time into one float32 array: XGBoost's
        working memory for a million customers at once is several times the result."""
        self._check()
        values = np.empty((len(X), X.shape[1] + 1), dtype=np.float32)
        for start in range(0, len(X), chunk_rows):
            d = self._dmatrix(X.iloc[start:start + chunk_rows])
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
        meta_path = folder / f"{name}.meta.json"
        meta_path.write_text(json.dumps({**self._metadata(), **metadata}, indent=2,
                                        default=_json_default))
        return {"model": model_path, "metadata": meta_path}

    def _metadata(self) -> dict:
        """Everything but the booster, as :meth:`save` writes it."""
        meta = {"best_iteration": self.best_iteration_, "params": {
            k: getattr(self, k) for k in ("max_depth", "learning_rate", "n_estimators",
                                          "min_child_weight", "subsample",
                                          "colsample_bytree", "reg_lambda", "device",
                                          "seed")},
                "features": self.features_,
                "trained_with": getattr(self, "trained_with_", "xgboost"),
                # the names inside the booster's JSON, where a column's has characters
                # XGBoost refuses (model_feature_names)
                "model_feature_names": list(model_feature_names(self.features_).values()),
                "categories": self.categories_}
        if hasattr(self, "calibration_"):
            meta["calibration"] = self.calibration_
        return meta

    @classmethod
    def restore(cls, meta: dict, booster: str | Path | bytes) -> _Booster:
        """The model of :meth:`save`'s metadata ``meta`` and its booster: the JSON
        file's path, or the JSON itself (bytes, :meth:`to_payload`)."""
        model = cls(**meta["params"])
        model.booster_ = xgb.Booster()
        model.booster_.load_model(bytearray(booster) if isinstance(booster, bytes)
                                  else str(booster))
        model.best_iteration_ = meta["best_iteration"]
        model.features_, model.categories_ = meta["features"], meta["categories"]
        if "calibration" in meta:
            model.calibration_ = meta["calibration"]
        return model

    def to_payload(self) -> dict:
        """The fitted model as plain values, its booster as its JSON (bytes): how it
        reaches Spark's executors (:func:`score_on_spark`), rebuilt there by
        :meth:`restore`."""
        self._check()
        return {"meta": self._metadata(), "booster": bytes(self.booster_.save_raw("json"))}


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


@dataclass(frozen=True)
class RfmLookup:
    """Baseline: the mean ``target`` of training customers in the same RFM cell.

    Cells are recency, frequency and monetary quintiles, each cut at the training
    snapshot's quintile edges; an unseen cell falls back to the overall mean. A few
    hundred numbers: the lookup reaches Spark's executors as it is.
    """

    edges: dict
    means: dict
    overall: float

    COLUMNS = ("recency_days", "frequency", "monetary_total")

    @classmethod
    def fit(cls, train: pd.DataFrame, *, target: str) -> RfmLookup:
        edges = {c: np.unique(np.quantile(train[c], [0.2, 0.4, 0.6, 0.8]))
                 for c in cls.COLUMNS}
        lookup = cls(edges, {}, float(train[target].mean()))
        return cls(edges, train[target].groupby(lookup._cells(train)).mean().to_dict(),
                   lookup.overall)

    def _cells(self, frame: pd.DataFrame) -> pd.Series:
        return pd.Series(list(zip(*(np.searchsorted(self.edges[c], frame[c], side="right")
                                    for c in self.COLUMNS), strict=True)), index=frame.index)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """The lookup's value for each customer of ``frame``."""
        return self._cells(frame).map(self.means).fillna(self.overall).to_numpy(dtype=float)


def rfm_lookup(train: pd.DataFrame, score: pd.DataFrame, *, target: str) -> np.ndarray:
    """:class:`RfmLookup` fitted on ``train``, for the customers of ``score``."""
    return RfmLookup.fit(train, target=target).predict(score)


def bgnbd_baseline(lines, *, cutoff: dt.date, horizon_days: int,
                   customers: pd.Series, summary: pd.DataFrame | None = None,
                   max_customers: int | None = BGNBD_FIT_CUSTOMERS
                   ) -> tuple[pd.DataFrame, dict]:
    """BG/NBD + Gamma-Gamma fitted on history before ``cutoff`` (weeks), their population
    parameters on at most ``max_customers`` customers (:func:`analysis.clv.fit_bgnbd`;
    None: all), every customer scored.

    ``lines`` is a frame of order lines or a DuckDB connection with a ``lines`` view
    (see :func:`analysis.clv.rfm_summary`).

    Returns
    -------
    frame : indexed like ``customers``: ``expected_purchases`` over the horizon,
        ``p_alive``, ``p_no_purchase`` (no purchase in the horizon: the churn
        probability), ``expected_spend`` (expected purchases x expected value per
        purchase).
    params : the fitted parameters of both models.

    ``summary`` is :func:`analysis.clv.rfm_summary` at ``cutoff`` when the caller has it.
    On Spark (``lines`` a Spark engine, no ``summary``) the summary stays on the
    executors, and the driver receives the fit's customers and those of ``customers``
    only (:func:`_summary_on_spark`).
    """
    if summary is None and not isinstance(lines, pd.DataFrame) \
            and isinstance(as_engine(lines), SparkEngine):
        fit, s = _summary_on_spark(as_engine(lines), cutoff=cutoff, customers=customers,
                                   max_customers=max_customers)
        bg, gg = fit_bgnbd(fit), fit_gamma_gamma(fit)
    else:
        if summary is None:
            summary = rfm_summary(lines, calibration_end=cutoff)
        bg = fit_bgnbd(summary, max_customers=max_customers)
        gg = fit_gamma_gamma(summary, max_customers=max_customers)
        s = summary.reindex(customers)
    weeks = horizon_days / 7
    purchases = bg.expected_purchases(weeks, s["frequency"], s["recency"], s["T"])
    spend = gg.expected_spend(s["frequency"], s["monetary_value"])
    frame = pd.DataFrame({"expected_purchases": purchases,
                          "p_alive": bg.probability_alive(s["frequency"], s["recency"], s["T"]),
                          "p_no_purchase": bg.probability_no_purchase(
                              weeks, s["frequency"], s["recency"], s["T"]),
                          "expected_spend": purchases * spend}, index=customers.index)
    return frame, {"bgnbd": bg.params_, "bgnbd_loglik": bg.loglik_,
                   "gamma_gamma": gg.params_}


def _summary_on_spark(eng: SparkEngine, *, cutoff: dt.date, customers: pd.Series,
                      max_customers: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The RFM summary at ``cutoff`` (:func:`analysis.clv.rfm_summary`) computed and kept
    on Spark's executors (:func:`summary_kept_on_spark`); the driver receives the rows
    a fit uses and the rows of ``customers`` (in their order; NaN for a customer without
    one)."""
    ids = pd.Series(customers).astype(str)
    with summary_kept_on_spark(eng, cutoff=cutoff, max_customers=max_customers) as (
            summary, fit):
        eng.register("_summary_customers", pd.DataFrame({"customer_id": ids.unique()}))
        try:
            wanted = eng.collect(summary.join(eng.session.table("_summary_customers"),
                                              on="customer_id"))
        finally:
            eng.unregister("_summary_customers")
    return fit, summary_of_rows(wanted[list(RFM_SUMMARY_COLUMNS)]).reindex(ids.to_numpy())


@contextlib.contextmanager
def summary_kept_on_spark(eng: SparkEngine, *, cutoff: dt.date,
                           max_customers: int | None = BGNBD_FIT_CUSTOMERS):
    """Within the block: the RFM summary at ``cutoff`` as a Spark DataFrame kept on the
    executors (:data:`analysis.clv.RFM_SUMMARY`'s rows, in days), and, on the driver,
    the summary of the rows a fit uses (at most ``max_customers``, by place in id order:
    the rows :func:`analysis.clv.fit_positions` gives the driver). The summary's table is
    dropped when the block ends."""
    with contextlib.closing(rfm_summaries(eng, calibration_ends=[cutoff],
                                          in_engine=True)) as summaries:
        _, name = next(summaries)
        summary = eng.session.table(name)
        n = summary.count()
        yield summary, summary_of_rows(eng.rows_at(summary, "customer_id", fit_positions(
            n, n if max_customers is None else max_customers), list(RFM_SUMMARY_COLUMNS)))


#: The period of the predicted lifetime value in the customer table (months) and its
#: monthly discount rate.
CLV_MONTHS, CLV_MONTHLY_DISCOUNT = 12, 0.01


def lifetime_outlook(lines, *, as_of: dt.date, customers: pd.Series,
                     summary: pd.DataFrame | None = None,
                     max_customers: int | None = BGNBD_FIT_CUSTOMERS) -> pd.DataFrame:
    """Per customer, from BG/NBD + Gamma-Gamma fitted on the history before ``as_of`` (on
    at most ``max_customers`` customers, as :func:`bgnbd_baseline`):
    ``expected_next_order`` (the date by which the customer has more likely than not
    ordered again; empty when that is never more likely than not, see
    :meth:`analysis.clv.BetaGeoModel.median_time_to_next_purchase`, or further than two
    years away) and ``predicted_clv`` (expected spend over the next :data:`CLV_MONTHS`
    months, discounted :data:`CLV_MONTHLY_DISCOUNT` a month). Both are NaN/NaT for
    everyone when the models cannot be fitted (too few repeat customers).
    """
    if summary is None:
        summary = rfm_summary(lines, calibration_end=as_of)
    ids = pd.Series(customers).astype(str).reset_index(drop=True)
    return outlook_of(fit_lifetime(summary, max_customers=max_customers),
                      summary.reindex(ids), as_of=as_of)


def fit_lifetime(summary: pd.DataFrame, *, max_customers: int | None = BGNBD_FIT_CUSTOMERS
                 ) -> tuple | None:
    """BG/NBD and Gamma-Gamma fitted on an :func:`analysis.clv.rfm_summary` (at most
    ``max_customers`` of its rows, evenly spaced); None when they cannot be fitted."""
    try:
        return (fit_bgnbd(summary, max_customers=max_customers),
                fit_gamma_gamma(summary, max_customers=max_customers))
    except ValueError:
        return None


def outlook_of(lifetime: tuple | None, s: pd.DataFrame, *, as_of: dt.date) -> pd.DataFrame:
    """:func:`lifetime_outlook`'s columns for the customers of ``s`` (their rows of the
    summary the models were fitted on, indexed by id; NaN for a customer without one)
    from :func:`fit_lifetime`'s models: customer by customer, so any split of the
    customers gives the same rows."""
    out = pd.DataFrame({"customer_id": s.index.astype(str), "expected_next_order": pd.NaT,
                        "predicted_clv": np.nan})
    if lifetime is None:
        return out
    bg, gg = lifetime
    weeks = bg.median_time_to_next_purchase(s["frequency"], s["recency"], s["T"])
    weeks = np.where(weeks <= 104, weeks, np.nan)
    next_order = pd.Timestamp(as_of) + pd.to_timedelta(np.ceil(weeks * 7), unit="D")
    clv = gg.customer_lifetime_value(bg, s["frequency"], s["recency"], s["T"],
                                     s["monetary_value"], months=CLV_MONTHS,
                                     monthly_discount_rate=CLV_MONTHLY_DISCOUNT)
    return out.assign(expected_next_order=np.asarray(next_order),
                      predicted_clv=np.asarray(clv, dtype=float))


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


# --------------------------------------------------------------------------- choosing


#: The churn methods that may score customers: calibrated XGBoost, the logistic
#: regression, and their blend (the mean of the two probabilities).
CHURN_CANDIDATES = ("model", "logistic", "blend")
#: The value methods that may score customers.
VALUE_CANDIDATES = ("model", "bgnbd_gg", "last_period", "rfm")

#: Plain names of the methods, for sentences (:func:`describe_choice`).
METHOD_NAMES = {"model": "the XGBoost model", "logistic": "a logistic regression",
                "blend": "a blend of the XGBoost model and a logistic regression",
                "rfm": "an RFM lookup", "bgnbd": "the BG/NBD purchase model",
                "bgnbd_gg": "the BG/NBD + Gamma-Gamma model",
                "last_period": "'next period = last period'",
                "rule": "the best single-column rule"}


#: The same methods in words for the executive page, where method names stay out.
PLAIN_METHOD_NAMES = {"model": "the machine-learning model",
                      "logistic": "a simpler weighted-score model",
                      "blend": "the average of those two",
                      "rfm": "a lookup by recency, frequency and spend",
                      "bgnbd": "a model of each customer's purchase rhythm",
                      "bgnbd_gg": "a model of each customer's purchase rhythm and basket size",
                      "last_period": "'next period = last period'",
                      "rule": "the best single-column rule"}


def blend_probability(p_model, p_logistic) -> np.ndarray:
    """The blend: the mean of the XGBoost and the logistic probability. Fixed weights, so
    that nothing is fitted on the data that judges it."""
    return (np.asarray(p_model, dtype=float) + np.asarray(p_logistic, dtype=float)) / 2


def churn_selection(y, probabilities: dict[str, np.ndarray]) -> pd.DataFrame:
    """Each candidate's proper scores on held-out data, and the one chosen.

    The choice is the lowest log loss (it rewards confident right answers and punishes
    confident wrong ones, which is what a churn probability used in money decisions
    must get right); the Brier score breaks exact ties.

    Returns
    -------
    DataFrame
        ``method``, ``n``, ``log_loss``, ``brier``, ``chosen`` (True for one row).
    """
    y = np.asarray(y, dtype=float)
    rows = []
    for method, p in probabilities.items():
        p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
        rows.append({"method": method, "n": int(len(y)),
                     "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
                     "brier": float(np.mean((p - y) ** 2))})
    return _mark_choice(pd.DataFrame(rows), "log_loss", "brier")


def value_selection(actual, predictions: dict[str, np.ndarray], *,
                    power: float = 1.5, floor: float = 0.01) -> pd.DataFrame:
    """Each value candidate's loss on held-out data, and the one chosen.

    The choice is the lowest mean Tweedie deviance (variance power ``power``, that of
    the XGBoost value model): a proper loss for an *expected* spend (the mean is the
    forecast that minimises it), made for spend that is zero for many customers and
    long-tailed for the rest. The mean absolute error, which rewards the median (often
    zero) rather than the mean, is recorded beside it and breaks exact ties. Negative
    spend (net refunds) counts as zero; a forecast below ``floor`` counts as ``floor``
    (a forecast of exactly zero for a customer who then buys has infinite deviance).

    Returns
    -------
    DataFrame
        ``method``, ``n``, ``tweedie_deviance``, ``mae``, ``chosen`` (True for one row).
    """
    y = np.clip(np.asarray(actual, dtype=float), 0, None)
    rows = []
    for method, pred in predictions.items():
        pred = np.asarray(pred, dtype=float)
        mu = np.clip(pred, floor, None)
        deviance = 2 * (np.power(y, 2 - power) / ((1 - power) * (2 - power))
                        - y * np.power(mu, 1 - power) / (1 - power)
                        + np.power(mu, 2 - power) / (2 - power))
        rows.append({"method": method, "n": int(len(y)),
                     "tweedie_deviance": float(np.mean(deviance)),
                     "mae": float(np.mean(np.abs(np.asarray(actual, dtype=float) - pred)))})
    return _mark_choice(pd.DataFrame(rows), "tweedie_deviance", "mae")


def chosen_method(selection: pd.DataFrame) -> str:
    """The method marked ``chosen`` in a :func:`churn_selection` or
    :func:`value_selection` table."""
    return str(selection.loc[selection["chosen"], "method"].iloc[0])


def choice_record(chosen: str, selection: pd.DataFrame | None) -> dict:
    """What ``models.json`` records of a choice, beside each method's metrics:
    ``chosen`` and ``selection`` (each candidate's scores on the data that chose)."""
    out = {"chosen": chosen}
    if selection is not None:
        out["selection"] = selection.drop(columns="chosen").set_index("method").to_dict(
            orient="index")
    return out


def read_choice(entry: dict) -> tuple[str, pd.DataFrame | None]:
    """The chosen method and the selection table from a ``models.json`` entry written by
    :func:`choice_record` (runs written before the choice: XGBoost, no table)."""
    chosen = entry.get("chosen", "model")
    record = entry.get("selection")
    if record is None:
        return chosen, None
    table = pd.DataFrame.from_dict(record, orient="index").rename_axis("method").reset_index()
    return chosen, table.assign(chosen=table["method"] == chosen)


def _mark_choice(table: pd.DataFrame, score: str, tie_break: str) -> pd.DataFrame:
    best = table.sort_values([score, tie_break], kind="stable").index[0]
    return table.assign(chosen=table.index == best)


def describe_choice(chosen: str, metrics: pd.DataFrame, *, candidates: tuple[str, ...],
                    kind: str = "churn", population: str | None = None,
                    names: dict[str, str] | None = None) -> str:
    """One plain sentence for executives: which method scores the customers, and how it
    compared with the other candidates on customers it never saw.

    ``metrics`` is indexed by method (``churn_metrics``, ``churn_metrics_active`` or
    ``value_metrics`` with ``set_index("method")``); churn is compared by AUC, value by
    the average error per customer (``mae``). ``population`` names the customers the
    metrics are about (e.g. "the 1,234 customers still active on 2024-01-01"); without
    it, "customers". ``names`` names the methods (default :data:`METHOD_NAMES`; the
    executive page passes :data:`PLAIN_METHOD_NAMES`).
    """
    names = METHOD_NAMES if names is None else names
    kinds = {"churn": ("Churn risk comes from", "churn", "roc_auc",
                       "separates churners from stayers with an AUC of {:.3f} (1 is "
                       "perfect, 0.5 is chance)", "{:.3f}"),
             "value": ("Spend forecasts come from", "spending", "mae",
                       "is off by {:,.1f} per customer on average", "{:,.1f}")}
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, not {kind!r}")
    lead, predicted, measure, result, other = kinds[kind]
    others = [f"{other.format(metrics.loc[m, measure])} for {names.get(m, m)}"
              for m in candidates if m != chosen and m in metrics.index]
    against = (", against " + (" and ".join(others) if len(others) < 3 else
                               ", ".join(others[:-1]) + " and " + others[-1])) if others else ""
    score = result.format(metrics.loc[chosen, measure])
    tested = (f"tested on {population}, whom it never saw" if population else
              "tested on customers it never saw")
    return (f"{lead} {names.get(chosen, chosen)}, which predicted {predicted} best "
            f"of the {len(candidates)} methods tried on customers held out from training; "
            f"{tested}, it {score}{against}.")


def comparison_table(metrics: pd.DataFrame, selection: pd.DataFrame | None,
                     chosen: str) -> pd.DataFrame:
    """Every method with its scores on the data that chose (``validation_*``, empty for
    methods that were not candidates) and its test metrics, the chosen one marked: the
    analyst's view of the choice.

    Returns
    -------
    DataFrame
        ``method``, ``chosen``, ``validation_<score>`` for each column of ``selection``
        (but ``method`` and ``chosen``), then the columns of ``metrics``.
    """
    out = metrics.copy()
    if selection is not None:
        scores = selection.drop(columns="chosen").set_index("method").add_prefix(
            "validation_")
        out = out.join(scores, on="method")
    out.insert(1, "chosen", out["method"].eq(chosen))
    front = ["method", "chosen", *[c for c in out.columns if c.startswith("validation_")]]
    return out[front + [c for c in out.columns if c not in front]]


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


#: The churn methods judged out of time, and whether their scores are probabilities.
CHURN_METHODS = (("model", True), ("model_uncalibrated", True), ("logistic", True),
                 ("blend", True), ("rfm", True), ("bgnbd", False))

POPULATIONS = ("all", "active")


def active_rows(evaluation: pd.DataFrame) -> pd.DataFrame:
    """The rows of an evaluation frame whose customers were active at its cutoff
    (``lifecycle_stage`` in :data:`analysis.segments.ACTIVE_STAGES`); every row for a
    frame without stages (runs written before they were recorded)."""
    if "lifecycle_stage" not in evaluation:
        return evaluation
    return evaluation[evaluation["lifecycle_stage"].isin(ACTIVE_STAGES)]


def churn_metrics_table(evaluation: pd.DataFrame, *, population: str = "all"
                        ) -> pd.DataFrame:
    """Every churn method's out-of-time metrics (:func:`churn_metrics`) on one population
    of the evaluation frame: ``"all"`` its customers, ``"active"`` those active at the
    cutoff (:func:`active_rows`: churn risk and its accuracy are about them; long-lost
    customers are easy to call churners and flatter every method).

    Methods are those of :data:`CHURN_METHODS` with a ``churn_<method>`` column. A
    population without both churners and stayers keeps ``n`` and ``churn_rate`` only.

    Returns
    -------
    DataFrame
        One row per method: ``method``, ``population``, then the keys of
        :func:`churn_metrics` (``n``, ``churn_rate``, ``roc_auc``, ``pr_auc``, ``brier``,
        ``ece``, ``lift_top10``, ``capture_top10``, ``lift_top20``, ``capture_top20``).
    """
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, not {population!r}")
    part = active_rows(evaluation) if population == "active" else evaluation
    y = part["churned"].to_numpy(dtype=float)
    rows = []
    for method, probs in CHURN_METHODS:
        column = f"churn_{method}"
        if column not in part:
            continue
        m = (churn_metrics(y, part[column], probabilities=probs) if 0 < y.sum() < len(y)
             else {"n": int(len(y)), "churn_rate": float(y.mean()) if len(y) else np.nan})
        rows.append({"method": method, "population": population, **m})
    return pd.DataFrame(rows)


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
    churn, value : the fitted XGBoost models.
    logistic : the fitted logistic regression (a churn candidate; None in runs written
        before it was saved).
    churn_chosen, value_chosen : the method that scores the customers (one of
        :data:`CHURN_CANDIDATES`, :data:`VALUE_CANDIDATES`), chosen on the validation
        cutoff (see :func:`fit_and_evaluate`).
    churn_selection, value_selection : the validation scores the choice was made on
        (:func:`churn_selection`, :func:`value_selection`).
    evaluation : one row per customer at the evaluation cutoff: ``frequency`` (history),
        ``lifecycle_stage`` (at that cutoff, from the snapshot's own features),
        ``churned``, ``future_spend`` and each method's score (``churn_<method>``,
        ``value_<method>``).
    churn_metrics, value_metrics : one row per method (out-of-time, eval cutoff), over
        every customer of the evaluation snapshot.
    churn_metrics_active : ``churn_metrics`` over the customers active at the
        evaluation cutoff (:func:`churn_metrics_table`), the population churn risk is
        about; None in runs written before it.
    scores : at the scoring date, from the chosen methods (:data:`SCORES_SCHEMA`):
        ``customer_id``, ``churn_probability``, ``predicted_value``, ``churn_reasons``,
        ``value_reasons``, ``expected_next_order``, ``predicted_clv``; None when Spark's
        executors wrote them (:func:`scores_on_spark`; read them from the run store).
    churn_shap : SHAP values of the chosen churn method at the scoring date (+ ``bias``),
        in log-odds (see :func:`fit_and_evaluate`).
    value_shap : SHAP values of the XGBoost value model at the scoring date (+ ``bias``).
    score_features : the model matrix at the scoring date (same rows).
    clv_params : BG/NBD and Gamma-Gamma parameters at the evaluation cutoff.
    drift : PSI of each numeric feature between training and scoring
        (:func:`analysis.monitor.feature_drift`).
    churn_drivers, value_drivers : the global drivers (:func:`analysis.explain.
        global_drivers`) of ``churn_shap`` and ``value_shap``.

    A run read back with :func:`read_model_run` holds only the tables asked for (the
    others are None).
    """

    horizon_days: int
    cutoffs: dict
    churn: ChurnModel
    value: ValueModel
    clv_params: dict
    sizes: dict
    logistic: LogisticChurn | None = None
    churn_chosen: str = "model"
    value_chosen: str = "model"
    churn_selection: pd.DataFrame | None = None
    value_selection: pd.DataFrame | None = None
    evaluation: pd.DataFrame | None = None
    churn_metrics: pd.DataFrame | None = None
    value_metrics: pd.DataFrame | None = None
    churn_metrics_active: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    churn_shap: pd.DataFrame | None = None
    value_shap: pd.DataFrame | None = None
    score_features: pd.DataFrame | None = None
    drift: pd.DataFrame | None = None
    churn_drivers: pd.DataFrame | None = None
    value_drivers: pd.DataFrame | None = None

    def summary(self) -> dict:
        """Headline facts, JSON-friendly (for metrics.json and the model metadata).

        ``churn`` and ``value`` hold each method's out-of-time metrics under its name,
        ``chosen`` (the method that scores the customers) and ``selection`` (each
        candidate's validation scores, the choice's evidence); ``churn_active`` each
        churn method's metrics on the customers active at the evaluation cutoff
        (``sizes["eval_active"]`` of them).
        """
        out = {"horizon_days": self.horizon_days, "cutoffs": self.cutoffs,
               "sizes": self.sizes, "clv_params": self.clv_params,
               "churn_calibration": self.churn.calibration_["method"],
               "churn_best_iteration": self.churn.best_iteration_,
               "value_best_iteration": self.value.best_iteration_}
        for kind in ("churn", "value"):
            entry = getattr(self, f"{kind}_metrics").set_index("method").to_dict(orient="index")
            out[kind] = {**entry, **choice_record(getattr(self, f"{kind}_chosen"),
                                                  getattr(self, f"{kind}_selection"))}
        if self.churn_metrics_active is not None:
            out["churn_active"] = self.churn_metrics_active.set_index("method").to_dict(
                orient="index")
        return out


def fit_and_evaluate(con, *, as_of: dt.date,
                     horizon_days: int, n_cutoffs: int, step_days: int,
                     exclude: tuple[str, ...] = (), seed: int = 42, device: str = "cpu",
                     min_customers: int = 200, max_train_rows: int = 300_000,
                     max_baseline_rows: int = 100_000, max_valid_rows: int = 400_000,
                     max_eval_rows: int = 2_000_000,
                     lifecycle: dict | None = None,
                     reasons_sample: int | None = None,
                     score_features: pd.DataFrame | None = None,
                     score_table: str | Path | None = None,
                     drivers_sample: int = 20_000,
                     scores_to: str | Path | None = None) -> ModelRun:
    """Train on rolling-origin snapshots, choose the scoring methods on the validation
    cutoff, judge every method out of time, score at ``as_of``.

    Cutoffs come from :func:`honest_cutoffs`: the evaluation cutoff is never used in
    training or choosing, and no training or validation label looks past it. Training
    snapshots beyond ``max_train_rows`` rows are sampled (uniformly, fixed seed), and
    the logistic regression is fitted on at most ``max_baseline_rows`` of them, and the
    validation snapshot keeps about ``max_valid_rows`` customers (drawn by a hash of the
    id, before its features are built): on large customer bases more rows add time, not
    accuracy. The evaluation snapshot keeps every customer up to about
    ``max_eval_rows`` of them, beyond which it is a sample drawn the same way (of about
    that many: an AUC on two million customers is known to about 0.0005), so that the
    driver need not hold tens of millions; ``sizes["eval_share"]`` is the share drawn
    (1.0: everyone), which every sentence about the evaluation's customers states
    (:func:`evaluation_sample`).

    **Which method scores the customers** is chosen, not assumed. The validation
    snapshot's customers are split in two halves (random, stratified by churn, fixed
    seed). The first half stops the XGBoost models early and calibrates the churn model;
    the second half, which no method has seen in any way, chooses: calibrated XGBoost,
    the logistic regression (fitted on the training snapshots only) and their blend (the
    mean of the two probabilities, fixed weights) by log loss, Brier breaking ties
    (:func:`churn_selection`); the XGBoost value model, BG/NBD + Gamma-Gamma (fitted on
    the history before the validation cutoff), "last period repeats" and the RFM lookup
    by Tweedie deviance, MAE breaking ties (:func:`value_selection`). The models chosen
    are exactly the models judged: nothing is refitted after the choice. A split rather
    than cross-fitting keeps the cost of a large base at one fit per model. All methods
    are then judged on the evaluation cutoff as before.

    **On whom.** Churn risk is about customers still active at a cutoff. Each
    validation and evaluation customer's lifecycle stage at that cutoff is drawn from the
    snapshot's own features with :func:`analysis.segments.assign_lifecycle` and the
    thresholds ``lifecycle`` (its keyword arguments, :func:`analysis.segments.
    lifecycle_thresholds`; its defaults when None). The churn method is chosen on the
    active customers of the choosing half, and every churn method is judged both on
    everyone (``churn_metrics``) and on the active customers (``churn_metrics_active``).

    ``score_features``: the customers' features at ``as_of`` when the caller has them
    (the profile step's table: :func:`analysis.features.build_features` with this
    horizon, no labels, the same exclusions, one row per customer sorted by id), else
    they are built here. ``score_table``: the Parquet file the profile step wrote them
    to; on Spark, with ``score_features`` None, the executors read it where it lies and
    the driver holds only the customers it explains (see **On Spark**).

    **Whose reasons.** With ``reasons_sample`` None every scored customer gets reason
    codes. With a number, and more customers than that, the exact SHAP values (and the
    global drivers, the SHAP tables and ``score_features``) are computed on a fixed
    random sample of that many customers only; the other customers' reasons are left
    missing for the strategy step to fill in for the customers a person reads about
    (:func:`explain_customers`). Explanations, not training, bound the time of a large
    run.

    **On Spark** (``con`` a Spark engine) the boosters train there (``xgboost.spark``)
    and the executors score every customer; with ``reasons_sample`` None they also give
    every customer reasons, while the SHAP tables and the global drivers come from a
    fixed random sample of ``drivers_sample`` customers on the driver (``sizes``:
    ``explained`` customers in the SHAP tables, ``reasons`` customers with reasons).
    With the profile step's table (``score_table``, no ``score_features``) the
    customers at ``as_of`` never reach the driver: it fetches the sample it explains by
    place, the executors count the drift (:func:`drift_on_spark`) and compute the whole
    scores table (:func:`scores_on_spark`), which they write to ``scores_to`` (the
    run's ``scores`` is then None; without ``scores_to`` it is collected).

    At ``as_of`` the chosen methods give ``churn_probability`` and ``predicted_value``
    (BG/NBD + Gamma-Gamma refitted on all history before ``as_of`` when chosen). Churn
    reasons are the chosen method's own SHAP values in log-odds: XGBoost's TreeSHAP (on
    its margin before calibration, which is monotone), the logistic regression's exact
    linear SHAP values (:meth:`LogisticChurn.contributions`), or, for the blend, the mean
    of the two, each component weighing half as in the blend. Value reasons are
    XGBoost's SHAP values when it scores; otherwise the chosen method's own plain
    explanation (expected purchases and spend per purchase, last period's spend, or the
    RFM cell), while ``value_shap`` and the value drivers stay XGBoost's.

    Raises
    ------
    InsufficientDataError
        With fewer than three usable cutoffs, or too few customers or churners.
    """
    eng = as_engine(con)
    first = eng.rows("SELECT MIN(order_date) FROM lines")[0][0]
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
    n_known = eng.rows("SELECT COUNT(DISTINCT customer_id) FROM lines WHERE order_date "
                       f"< DATE '{eval_cut.isoformat()}'")[0][0]
    share = max_train_rows / max(n_known * len(train_cuts), 1)
    valid_share = max_valid_rows / max(n_known, 1)
    eval_share = max_eval_rows / max(n_known, 1)
    # every snapshot, and the features at the scoring date, from one pass over the log;
    # memory: each snapshot is its own frame (no stacked copy to split), and once the
    # model matrices exist only the columns the evaluation needs are kept
    # (the scoring date's too, unless the caller has them: the profile step's table)
    # on Spark, the customers at the scoring date stay where the profile step wrote them
    spark = eng.session if isinstance(eng, SparkEngine) else None
    lying = spark is not None and score_features is None and score_table is not None
    frames = snapshots_by_cutoff(
        con, cutoffs=[*train_cuts, valid_cut, eval_cut,
                      *([as_of] if score_features is None and not lying else [])],
        horizon_days=horizon_days, exclude_attributes=exclude,
        sample_share={**dict.fromkeys(train_cuts, 1.1 * share if share < 0.9 else None),
                      valid_cut: valid_share if valid_share < 0.9 else None,
                      eval_cut: eval_share if eval_share < 0.9 else None})
    valid = frames.pop(valid_cut).assign(cutoff=pd.Timestamp(valid_cut))
    test = frames.pop(eval_cut).assign(cutoff=pd.Timestamp(eval_cut))
    if score_features is None and not lying:
        score_features = frames.pop(as_of)       # as build_features(labels=False) has it
        score_features = score_features.drop(
            columns=[c for c in LABEL_COLUMNS if c in score_features])
    train = pd.concat([frames.pop(c).assign(cutoff=pd.Timestamp(c)) for c in sorted(train_cuts)],
                      ignore_index=True)
    del frames
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
    valid = valid[["customer_id", *rfm, "churned", "future_spend", "spend_last_horizon"]].assign(
        lifecycle_stage=assign_lifecycle(valid, **(lifecycle or {}))["lifecycle_stage"].to_numpy())
    test = test[["customer_id", *rfm, "churned", "future_spend", "spend_last_horizon"]].assign(
        lifecycle_stage=assign_lifecycle(test, **(lifecycle or {}))["lifecycle_stage"].to_numpy())

    # on Spark, the boosters train there (xgboost.spark), with the same parameters
    churn, logistic, churn_choice = fit_churn_candidates(
        X["train"], train["churned"], X["valid"], valid["churned"], seed=seed, device=device,
        spark=spark,
        max_logistic_rows=max_baseline_rows,
        population=valid["lifecycle_stage"].isin(ACTIVE_STAGES).to_numpy())
    rfm_value = RfmLookup.fit(train, target="future_spend")
    tune, choose = split_validation(valid["churned"], seed=seed)     # the same halves
    value = ValueModel(seed=seed, device=device, spark=spark).fit(
        X["train"], train["future_spend"], X["valid"].iloc[tune],
        valid["future_spend"].iloc[tune])
    held, x_held = valid.iloc[choose], X["valid"].iloc[choose]
    bg_held, _ = bgnbd_baseline(con, cutoff=valid_cut, horizon_days=horizon_days,
                                customers=held["customer_id"])
    value_choice = value_selection(held["future_spend"], {
        "model": value.predict(x_held),
        "bgnbd_gg": bg_held["expected_spend"].fillna(0.0).to_numpy(),
        "last_period": held["spend_last_horizon"].clip(lower=0).to_numpy(),
        "rfm": rfm_value.predict(held)})
    n_valid, n_tune = len(valid), len(tune)
    del X["valid"], valid, held, x_held, bg_held
    bg, clv_params = bgnbd_baseline(con, cutoff=eval_cut, horizon_days=horizon_days,
                                    customers=test["customer_id"])
    test_churn = candidate_probabilities(churn, logistic, X["test"])
    evaluation = pd.DataFrame({
        "customer_id": test["customer_id"], "frequency": test["frequency"],
        "lifecycle_stage": test["lifecycle_stage"], "churned": test["churned"], "future_spend": test["future_spend"],
        "churn_model": test_churn["model"],
        "churn_model_uncalibrated": churn.predict_uncalibrated(X["test"]),
        "churn_logistic": test_churn["logistic"],
        "churn_blend": test_churn["blend"],
        "churn_rfm": rfm_lookup(train, test, target="churned"),
        "churn_bgnbd": -bg["expected_purchases"].to_numpy(),
        "value_model": value.predict(X["test"]),
        "value_last_period": test["spend_last_horizon"].clip(lower=0),
        "value_rfm": rfm_value.predict(test),
        "value_bgnbd_gg": bg["expected_spend"].to_numpy(),
    })
    n_train, n_test = len(train), len(test)
    del X["test"], test, bg, test_churn
    churn_table = churn_metrics_table(evaluation, population="all")
    churn_active = churn_metrics_table(evaluation, population="active")
    value_rows = [{"method": method, **value_metrics(evaluation["future_spend"],
                                                     evaluation[f"value_{method}"])}
                  for method in ("model", "last_period", "rfm", "bgnbd_gg")]

    churn_chosen, value_chosen = chosen_method(churn_choice), chosen_method(value_choice)
    models = ModelRun(horizon_days=horizon_days, cutoffs={}, churn=churn, value=value,
                      clv_params={}, sizes={}, logistic=logistic,
                      churn_chosen=churn_chosen, value_chosen=value_chosen)
    try:
        if lying:
            # the customers to score, where they lie: the profile step wrote them
            eng.read_parquet("_score_table", score_table)
            table = spark.table("_score_table")
            n_score = table.count()
        else:
            n_score = len(score_features)
        # on Spark, the executors score every customer and, unless only a sample is to
        # be explained, give each their reasons; the SHAP tables and global drivers come
        # from a sample of ``drivers_sample`` on the driver
        sample = (drivers_sample if spark is not None and reasons_sample is None
                  else reasons_sample)
        rows = (np.arange(n_score) if sample is None or n_score <= sample
                else np.sort(np.random.default_rng(seed).choice(n_score, sample,
                                                                replace=False)))
        n_reasons = n_score if spark is not None and reasons_sample is None else len(rows)
        explained = (eng.rows_at(table, "customer_id", rows) if lying
                     else score_features.iloc[rows])
        explained_X = prepare_matrix(explained, columns, cats)
        churn_shap = candidate_contributions(churn_chosen, churn, logistic, explained_X)
        value_shap = value.contributions(explained_X)
        if lying:
            bins = drift_bins(X.pop("train"), explained_X)
            drift = feature_drift(None, None, bins=bins, counts=drift_on_spark(
                eng, table, bins, columns=columns, categories=cats))
            scores = scores_on_spark(
                models, eng, table, as_of=as_of, horizon_days=horizon_days, rfm=rfm_value,
                explain=None if n_reasons == n_score else explained["customer_id"],
                out=scores_to)
            if scores_to is not None:
                if scores != n_score:
                    raise RuntimeError(f"Spark's executors wrote {scores:,} scores for "
                                       f"{n_score:,} customers")
                scores = None            # (the executors wrote them)
        elif spark is not None:
            score_X = prepare_matrix(score_features, columns, cats)
            drift = feature_drift(X.pop("train"), score_X)
            scored = score_on_spark(models, score_features, spark,
                                    reasons=reasons_sample is None,
                                    ids=score_features["customer_id"])
            explain_here = reasons_sample is not None
            scores = _scores_here(
                models, con, score_features, as_of=as_of, horizon_days=horizon_days,
                rfm=rfm_value, churn_probability=scored["churn_probability"].to_numpy(),
                model_value=scored["value_model"].to_numpy(),
                reasons=_sample_reasons(models, churn_shap, value_shap, explained, rows,
                                        n_score) if explain_here else
                (scored["churn_reasons"].to_numpy(dtype=object),
                 scored["value_reasons"].to_numpy(dtype=object)))
        else:
            score_X = prepare_matrix(score_features, columns, cats)
            drift = feature_drift(X.pop("train"), score_X)
            scores = _scores_here(
                models, con, score_features, as_of=as_of, horizon_days=horizon_days,
                rfm=rfm_value,
                churn_probability=candidate_probabilities(churn, logistic,
                                                          score_X)[churn_chosen],
                model_value=value.predict(score_X) if value_chosen == "model" else None,
                reasons=_sample_reasons(models, churn_shap, value_shap, explained, rows,
                                        n_score))
            del score_X
    finally:
        if lying:
            eng.unregister("_score_table")
    churn_drivers = global_drivers(churn_shap, explained_X)
    value_drivers = global_drivers(value_shap, explained_X)
    score_X = explained_X.reset_index(drop=True)
    del score_features, explained
    return ModelRun(
        horizon_days=horizon_days,
        cutoffs={"train": [c.isoformat() for c in train_cuts], "valid": valid_cut.isoformat(),
                 "eval": eval_cut.isoformat(), "score": as_of.isoformat()},
        churn=churn, value=value, logistic=logistic, churn_chosen=churn_chosen,
        value_chosen=value_chosen, churn_selection=churn_choice,
        value_selection=value_choice, evaluation=evaluation,
        churn_metrics=churn_table, value_metrics=pd.DataFrame(value_rows),
        churn_metrics_active=churn_active,
        scores=scores, churn_shap=churn_shap, value_shap=value_shap, score_features=score_X,
        clv_params=clv_params, drift=drift, churn_drivers=churn_drivers,
        value_drivers=value_drivers,
        sizes={"train": n_train, "train_cutoffs": len(train_cuts), "valid": n_valid,
               "valid_tune": n_tune, "valid_choose": n_valid - n_tune,
               "valid_choose_active": int(churn_choice["n"].iloc[0]),
               "eval": n_test, "eval_active": int(churn_active["n"].iloc[0]),
               "eval_share": round(eval_share, 6) if eval_share < 0.9 else 1.0,
               "score": n_score, "features": len(columns), "explained": len(rows),
               "reasons": n_reasons},
    )


def _sample_reasons(models: ModelRun, churn_shap: pd.DataFrame, value_shap: pd.DataFrame,
                    explained: pd.DataFrame, rows: np.ndarray, n: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The reasons in words of the ``n`` customers scored: those of the explained
    customers (at ``rows``) from their SHAP values, the value model's only when it
    scores; missing for the others."""
    churn_reasons = np.full(n, None, dtype=object)
    churn_reasons[rows] = reason_codes(churn_shap, explained).to_numpy()
    model_reasons = np.full(n, None, dtype=object)
    if models.value_chosen == "model":
        model_reasons[rows] = reason_codes(value_shap, explained).to_numpy()
    return churn_reasons, model_reasons


def _scores_here(models: ModelRun, con, features: pd.DataFrame, *, as_of: dt.date,
                 horizon_days: int, rfm: RfmLookup, churn_probability: np.ndarray,
                 model_value: np.ndarray | None, reasons: tuple[np.ndarray, np.ndarray]
                 ) -> pd.DataFrame:
    """The scores table (:data:`SCORES_SCHEMA`) of the customers of ``features``, on the
    driver: their churn probability, the value model's prediction (when it scores) and
    the reasons in words already computed; the chosen value method and the lifetime
    outlook from BG/NBD + Gamma-Gamma fitted on the summary at ``as_of``
    (:func:`scores_table`)."""
    summary = rfm_summary(con, calibration_end=as_of)
    lifetime = fit_lifetime(summary)
    return scores_table(models, features, summary.reindex(
        features["customer_id"].astype(str).to_numpy()), churn_probability=churn_probability,
        model_value=model_value, reasons=reasons, as_of=as_of, horizon_days=horizon_days,
        rfm=rfm, lifetime=lifetime)


#: The models step's scores table, in Spark's schema (``models/scores.parquet``).
SCORES_SCHEMA = ("customer_id string, churn_probability double, predicted_value double, "
                 "churn_reasons string, value_reasons string, "
                 "expected_next_order timestamp_ntz, predicted_clv double")


def scores_table(models: ModelRun, features: pd.DataFrame, summary: pd.DataFrame, *,
                 churn_probability: np.ndarray, model_value: np.ndarray | None,
                 reasons: tuple[np.ndarray, np.ndarray], as_of: dt.date, horizon_days: int,
                 rfm: RfmLookup, lifetime: tuple | None) -> pd.DataFrame:
    """The scores of the customers of ``features`` (:data:`SCORES_SCHEMA`'s columns),
    customer by customer, so that any split of the customers gives the same rows:
    ``predicted_value`` and ``value_reasons`` by the chosen value method
    (:func:`value_of`; ``summary``: the customers' rows of the summary at ``as_of``, in
    their order), and the lifetime outlook (:func:`outlook_of`)."""
    churn_reasons, model_reasons = reasons
    predicted_value, value_reasons = value_of(
        models.value_chosen, model=(model_value, model_reasons), features=features, rfm=rfm,
        lifetime=lifetime, summary=summary, horizon_days=horizon_days)
    outlook = outlook_of(lifetime, summary, as_of=as_of)
    return pd.DataFrame({
        "customer_id": features["customer_id"].astype(str).to_numpy(),
        "churn_probability": np.asarray(churn_probability, dtype=float),
        "predicted_value": np.asarray(predicted_value, dtype=float),
        "churn_reasons": np.asarray(churn_reasons, dtype=object),
        "value_reasons": np.asarray(value_reasons, dtype=object),
        "expected_next_order": outlook["expected_next_order"].to_numpy(),
        "predicted_clv": outlook["predicted_clv"].to_numpy()})


def split_validation(churned, *, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the validation customers that tune (stop early, calibrate) and of
    those that choose the scoring method: two halves, stratified by churn, fixed seed
    (a single-cutoff snapshot has one row per customer, so rows are customers)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(churned)), test_size=0.5,
                            stratify=np.asarray(churned), random_state=seed)


def fit_churn_candidates(X: pd.DataFrame, y, X_valid: pd.DataFrame, y_valid, *,
                         seed: int = 42, device: str = "cpu",
                         max_logistic_rows: int | None = None,
                         population=None, spark: Any = None
                         ) -> tuple[ChurnModel, LogisticChurn, pd.DataFrame]:
    """Fit the churn candidates on ``X, y`` and choose among them on later, held-out data.

    ``X_valid, y_valid`` (a later cutoff) are split in halves (:func:`split_validation`):
    the first stops XGBoost early and calibrates it; the second, which no candidate has
    seen, scores calibrated XGBoost, the logistic regression (fitted on ``X, y`` only,
    on at most ``max_logistic_rows`` rows drawn with ``seed``) and their blend
    (:func:`churn_selection`: lowest log loss, Brier breaking ties). ``population``, a
    boolean per validation row, restricts the choosing half to the customers the choice
    is about (those active at the validation cutoff, see :func:`fit_and_evaluate`); when
    that leaves no churner or no stayer, the whole half chooses. Nothing is refitted
    after the choice, so the chosen method is exactly the one judged. With a Spark
    session ``spark``, XGBoost trains there (:meth:`_Booster._train_spark`).

    Returns
    -------
    (churn, logistic, selection)
    """
    y, y_valid = np.asarray(y), np.asarray(y_valid)
    tune, choose = split_validation(y_valid, seed=seed)
    churn = ChurnModel(seed=seed, device=device, spark=spark).fit(X, y, X_valid.iloc[tune],
                                                                 y_valid[tune])
    rows = np.random.default_rng(seed).permutation(len(X))[:max_logistic_rows]
    logistic = LogisticChurn().fit(X.iloc[rows], y[rows])
    if population is not None:
        about = choose[np.asarray(population, dtype=bool)[choose]]
        if 0 < y_valid[about].sum() < len(about):
            choose = about
    selection = churn_selection(y_valid[choose], candidate_probabilities(
        churn, logistic, X_valid.iloc[choose]))
    return churn, logistic, selection


def candidate_probabilities(churn: ChurnModel, logistic: LogisticChurn, X: pd.DataFrame
                            ) -> dict[str, np.ndarray]:
    """Each churn candidate's probabilities (:data:`CHURN_CANDIDATES`): ``model``,
    ``logistic`` and ``blend``."""
    p = {"model": churn.predict_proba(X), "logistic": logistic.predict_proba(X)}
    p["blend"] = blend_probability(p["model"], p["logistic"])
    return p


def candidate_contributions(method: str, churn: ChurnModel, logistic: LogisticChurn,
                            X: pd.DataFrame) -> pd.DataFrame:
    """SHAP values (log-odds, one column per feature plus ``bias``) of one churn
    candidate: XGBoost's TreeSHAP, the logistic regression's exact linear SHAP values, or
    for the blend the mean of both (each component weighs half, as in the blend)."""
    if method not in CHURN_CANDIDATES:
        raise ValueError(f"method must be one of {CHURN_CANDIDATES}, not {method!r}")
    if method == "model":
        return churn.contributions(X)
    if method == "logistic":
        return logistic.contributions(X)
    return (churn.contributions(X) + logistic.contributions(X)) / 2


def value_of(method: str, *, model: tuple[np.ndarray | None, np.ndarray],
             features: pd.DataFrame, rfm: RfmLookup, lifetime: tuple | None,
             summary: pd.DataFrame | None, horizon_days: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``predicted_value`` and ``value_reasons`` at the scoring date from the chosen
    method, customer by customer (any split of the customers gives the same rows):
    ``model``, the XGBoost model's predictions and reasons in words (missing for the
    customers not explained), when it is the one that scores; ``rfm``, the lookup fitted
    on the training customers; ``lifetime`` (:func:`fit_lifetime`) and ``summary`` (the
    customers' rows of the summary at the scoring date, NaN for a customer without one)
    for BG/NBD + Gamma-Gamma.

    Raises
    ------
    ValueError
        For BG/NBD + Gamma-Gamma when they could not be fitted at the scoring date.
    """
    if method == "model":
        return model
    if method == "last_period":
        spend = features["spend_last_horizon"].clip(lower=0).to_numpy(dtype=float)
        return spend, np.array([f"spent {v:,.0f} in the last {horizon_days} days; "
                                "expected to repeat" for v in spend], dtype=object)
    if method == "rfm":
        return (rfm.predict(features),
                np.full(len(features), "what past customers with similar recency, "
                        "frequency and spend went on to spend", dtype=object))
    if lifetime is None:
        raise ValueError("BG/NBD + Gamma-Gamma cannot be fitted at the scoring date (too "
                         "few repeat customers)")
    bg, gg = lifetime
    s = summary
    purchases = np.asarray(bg.expected_purchases(horizon_days / 7, s["frequency"],
                                                 s["recency"], s["T"]), dtype=float)
    spend = purchases * np.asarray(gg.expected_spend(s["frequency"], s["monetary_value"]),
                                   dtype=float)
    # (a customer without a purchase before the scoring date: none expected)
    purchases, spend = (np.where(np.isnan(v), 0.0, v) for v in (purchases, spend))
    each = np.divide(spend, purchases, out=np.zeros_like(spend), where=purchases > 0)
    return spend, np.array([f"{n:.1f} purchase days expected in the next {horizon_days} "
                            f"days, {v:,.0f} each" for n, v in zip(purchases, each,
                                                                   strict=True)],
                           dtype=object)


def write_model_run(run: ModelRun, out_dir: str | Path, *, fingerprint: str,
                    versions: dict) -> dict[str, Path]:
    """Models (XGBoost JSON + metadata, the logistic regression as JSON), evaluation and
    SHAP tables (Parquet), summary.

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
            if run.churn_metrics_active is not None:
                extra["metrics_active"] = run.churn_metrics_active.set_index(
                    "method").to_dict(orient="index")
        paths = model.save(models, name, {**meta, **extra})
        written[f"{name}_model"], written[f"{name}_metadata"] = paths["model"], paths["metadata"]
    if run.logistic is not None:
        written["logistic_model"] = models / "logistic.json"
        written["logistic_model"].write_text(json.dumps({**run.logistic.to_dict(), **meta},
                                                        indent=2, default=_json_default))
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
MODEL_TABLES = ("evaluation", "churn_metrics", "churn_metrics_active", "value_metrics",
                "scores", "churn_shap", "value_shap", "score_features", "drift",
                "churn_drivers", "value_drivers")


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
        raise InsufficientDataError(f"this run has no models: {reason}")
    folder = out_dir / "models"
    summary = json.loads((out_dir / "models.json").read_text())
    loaded = {}
    for name, cls in (("churn", ChurnModel), ("value", ValueModel)):
        meta = json.loads((folder / f"{name}.meta.json").read_text())
        loaded[name] = cls.restore(meta, folder / f"{name}.json")
    unknown = set(tables or ()) - set(MODEL_TABLES)
    if unknown:
        raise ValueError(f"unknown model tables {sorted(unknown)}; known: {MODEL_TABLES}")
    tables = {name: pd.read_parquet(folder / f"{name}.parquet")
              for name in (MODEL_TABLES if tables is None else tables)
              if (folder / f"{name}.parquet").is_file()}
    logistic = folder / "logistic.json"
    choice = {}
    for kind in ("churn", "value"):
        choice[f"{kind}_chosen"], choice[f"{kind}_selection"] = read_choice(summary[kind])
    return ModelRun(horizon_days=summary["horizon_days"], cutoffs=summary["cutoffs"],
                    churn=loaded["churn"], value=loaded["value"],
                    logistic=LogisticChurn.from_dict(json.loads(logistic.read_text()))
                    if logistic.is_file() else None,
                    clv_params=summary["clv_params"], sizes=summary["sizes"],
                    **choice, **tables)


def write_skipped_models(out_dir: str | Path, *, reason: str, horizon_days: int,
                         as_of: dt.date, history_days: int = 365, con=None) -> pd.DataFrame:
    """Record that there was too little data for a supervised model, and why, and score
    the customers with what needs no labels.

    ``models.json`` holds ``skipped`` (the reason, shown in the report), the horizon and
    the scoring date. Given the run's DuckDB connection ``con`` (order logs), BG/NBD +
    Gamma-Gamma fitted at the scoring date supply every customer's churn probability
    (no purchase within the horizon), expected purchases and value
    (:func:`fit_without_labels`); ``models.json`` then holds ``fallback``: the method and
    how well it did on the one check the data allows. Without ``con``, or when BG/NBD
    cannot be fitted, every customer's value forecast is the last 12 months' spend (or
    all of it, over ``history_days`` when the data is shorter) at the same rate and the
    churn probability is left unknown (missing), so no decision uses a made-up risk.
    """
    out_dir = Path(out_dir)
    store = RunStore(out_dir)
    customers = store.read_customers(["customer_id", "spend_365d"])
    window = max(min(365, int(history_days)), 1)
    scores = pd.DataFrame({
        "customer_id": customers["customer_id"],
        "churn_probability": np.nan,
        "predicted_value": customers["spend_365d"].clip(lower=0) * horizon_days / window,
        "churn_reasons": "", "value_reasons": "recent spending rate continued (too little data for a model)"})
    summary = {"skipped": reason, "horizon_days": int(horizon_days),
               "cutoffs": {"score": as_of.isoformat()}}
    if con is not None:
        try:
            fitted, summary["fallback"] = fit_without_labels(con, as_of=as_of,
                                                             horizon_days=horizon_days)
        except ValueError as exc:
            summary["fallback_failed"] = str(exc)
        else:
            scores = customers[["customer_id"]].merge(fitted, on="customer_id", how="left")
    (out_dir / "models.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    store.write_scores(scores)
    return scores


#: The method that scores customers when there are too few labelled cutoffs.
LABEL_FREE_METHOD = "BG/NBD + Gamma-Gamma"


def fit_without_labels(con, *, as_of: dt.date, horizon_days: int
                       ) -> tuple[pd.DataFrame, dict]:
    """Churn probability, expected purchases and value from BG/NBD + Gamma-Gamma.

    Both models are fitted on the whole history before ``as_of`` (weeks) and need no
    labels, so they work on a history too short for out-of-time training. They are
    checked on the one cutoff the data allows: refitted on the history before
    ``as_of - horizon_days`` and compared with what customers did in the horizon after
    it (when that leaves at least 30 days of history).

    Returns
    -------
    scores : ``customer_id``, ``churn_probability`` (no purchase in the horizon),
        ``expected_purchases``, ``predicted_value``, ``churn_reasons``, ``value_reasons``.
    summary : ``method``, ``params`` and ``check`` (``cutoff``, ``n``, ``churn_rate``,
        ``churn_auc``, ``brier``, ``value_mae``, ``value_mae_last_period``,
        ``total_predicted``, ``total_actual``), or ``check: None`` with the reason.

    Raises
    ------
    ValueError
        When BG/NBD or Gamma-Gamma cannot be fitted (too few repeat customers).
    """
    summary = rfm_summary(con, calibration_end=as_of)
    scored, params = bgnbd_baseline(con, cutoff=as_of, horizon_days=horizon_days,
                                    customers=pd.Series(summary.index), summary=summary)
    frequency = summary["frequency"].to_numpy()
    days_since = np.rint((summary["T"] - summary["recency"]).to_numpy() * 7 + 1).astype(int)
    gap = np.where(frequency > 0, summary["recency"].to_numpy() * 7
                   / np.maximum(frequency, 1), np.nan)
    reasons = [f"last purchase {d:,} days ago, usually every {g:,.0f} days" if n > 0
               else f"one purchase day only, {d:,} days ago"
               for d, g, n in zip(days_since, gap, frequency, strict=True)]
    scores = pd.DataFrame({
        "customer_id": summary.index.to_numpy(),
        "churn_probability": scored["p_no_purchase"].to_numpy(),
        "expected_purchases": scored["expected_purchases"].to_numpy(),
        "predicted_value": scored["expected_spend"].to_numpy(),
        "churn_reasons": reasons,
        "value_reasons": [f"{e:.1f} purchases expected in the next {horizon_days} days"
                          for e in scored["expected_purchases"].to_numpy()]}).merge(
        lifetime_outlook(con, as_of=as_of, customers=pd.Series(summary.index),
                         summary=summary), on="customer_id", how="left")
    return scores, {"method": LABEL_FREE_METHOD, "params": params,
                    **_check_without_labels(con, as_of=as_of, horizon_days=horizon_days)}


def _check_without_labels(con, *, as_of: dt.date, horizon_days: int) -> dict:
    """Refit at ``as_of - horizon_days`` and compare with the horizon that followed."""
    cutoff = as_of - dt.timedelta(days=horizon_days)
    if (cutoff - data_start(con)).days < 30:
        return {"check": None, "check_skipped": (
            f"a check needs at least 30 days of history before {cutoff.isoformat()}")}
    actual = build_features(con, cutoff=cutoff, horizon_days=horizon_days)
    try:
        predicted, _ = bgnbd_baseline(con, cutoff=cutoff, horizon_days=horizon_days,
                                      customers=actual["customer_id"].astype("str"))
    except ValueError as exc:
        return {"check": None, "check_skipped": str(exc)}
    both = actual.assign(churn_probability=predicted["p_no_purchase"].to_numpy(),
                         predicted_value=predicted["expected_spend"].to_numpy()
                         ).dropna(subset=["churn_probability", "predicted_value"])
    y = both["churned"].to_numpy(dtype=float)
    check = {"cutoff": cutoff.isoformat(), "n": len(both), "churn_rate": float(y.mean()),
             "churn_auc": (float(roc_auc_score(y, both["churn_probability"]))
                           if 0 < y.sum() < len(y) else None),
             "brier": float(brier_score_loss(y, both["churn_probability"])),
             "value_mae": float(np.mean(np.abs(both["future_spend"]
                                               - both["predicted_value"]))),
             "value_mae_last_period": float(np.mean(np.abs(
                 both["future_spend"] - both["spend_last_horizon"].clip(lower=0)))),
             "total_predicted": float(both["predicted_value"].sum()),
             "total_actual": float(both["future_spend"].sum())}
    return {"check": check}


def skipped_reason(out_dir: str | Path) -> str | None:
    """Why the run has no supervised models (too little data), or None when it has them."""
    path = Path(out_dir) / "models.json"
    return json.loads(path.read_text()).get("skipped") if path.is_file() else None


def label_free_fallback(out_dir: str | Path) -> dict | None:
    """What scored the customers when the run had no supervised model
    (:func:`fit_without_labels`'s summary), or None."""
    path = Path(out_dir) / "models.json"
    return json.loads(path.read_text()).get("fallback") if path.is_file() else None


def metrics_by_group(evaluation: pd.DataFrame, *, by: str = "frequency",
                     min_class: int = 10, churn_method: str = "model",
                     value_method: str = "model") -> pd.DataFrame:
    """Out-of-time accuracy per history group (one, 2-3, 4+ purchase days) of the churn
    and value methods named (those that score the customers: ``ModelRun.churn_chosen``,
    ``ModelRun.value_chosen``).

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
        auc = float(roc_auc_score(y, part[f"churn_{churn_method}"])) if enough else np.nan
        rows.append({"group": str(name), "n": len(part), "churn_rate": float(y.mean()),
                     "churn_auc": auc,
                     "value_mae": float(np.mean(np.abs(part["future_spend"]
                                                       - part[f"value_{value_method}"]))),
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


def churn_step(config, processed_dir: str | Path, *, as_of: str | None = None,
               versions: dict[str, str] | None = None) -> ModelRun | None:
    """The models step of an order-log run: read the scoring date the profile step
    recorded, resolve the horizon (once; it is recorded in ``models.json`` for every later
    step), fit and judge the churn and value models out of time
    (:func:`fit_and_evaluate`) and write them.

    When the data is too short for a supervised model, the reason and the label-free
    fallback are written instead (:func:`write_skipped_models`) and None is returned;
    :func:`skipped_reason` and :func:`label_free_fallback` read them back.
    """
    a = config.analysis
    con = connect_run(processed_dir, config)
    store = RunStore(processed_dir)
    scoring_date = store.scoring_date() or resolve_as_of(con, as_of=as_of or a.as_of)
    horizon = store.horizon_days() or resolve_horizon_days(
        con, horizon_days=a.horizon_days, cutoff=scoring_date, step_days=a.cutoff_step_days)
    # the profile step built the features at the scoring date with this horizon: read
    # them rather than building them again
    # (on Spark, where it lies: the executors score the customers and write the scores)
    profiled = store.profile_table.exists() and store.horizon_days() == horizon
    on_spark = isinstance(as_engine(con), SparkEngine)
    try:
        run = fit_and_evaluate(con, as_of=scoring_date, horizon_days=horizon,
                               n_cutoffs=a.n_cutoffs, step_days=a.cutoff_step_days,
                               exclude=config.protected + config.pii, seed=config.seed,
                               device=a.device, lifecycle=lifecycle_thresholds(a),
                               reasons_sample=a.reasons_sample_for(store.n_customers()),
                               score_features=store.read_profile_table()
                               if profiled and not on_spark else None,
                               score_table=store.profile_table if profiled else None,
                               drivers_sample=a.reasons_sample,
                               scores_to=store.scores_table if on_spark else None)
    except InsufficientDataError as exc:
        write_skipped_models(processed_dir, reason=str(exc), horizon_days=horizon,
                             as_of=scoring_date,
                             history_days=(scoring_date - data_start(con)).days, con=con)
        return None
    write_model_run(run, processed_dir, fingerprint=data_fingerprint(processed_dir),
                    versions=versions or {})
    return run


def explain_customers(run: ModelRun, features: pd.DataFrame, *, churn: bool = True,
                      value: bool = True) -> pd.DataFrame:
    """Reasons in words for the customers of ``features`` (their features at the scoring
    date, as :func:`analysis.features.build_features` gives them with the run's
    horizon), exactly as the models step gives them: the chosen churn method's SHAP
    values (``churn``), and the XGBoost value model's when it is the one that scores
    (``value``).

    Returns
    -------
    DataFrame
        ``customer_id``, ``churn_reasons`` (with ``churn``) and, when the value model
        scores, ``value_reasons`` (with ``value``).
    """
    out = pd.DataFrame({"customer_id": features["customer_id"].to_numpy()})
    if churn:
        X = prepare_matrix(features, run.churn.features_, run.churn.categories_)
        out["churn_reasons"] = reason_codes(candidate_contributions(
            run.churn_chosen, run.churn, run.logistic, X), features).to_numpy()
    if value and run.value_chosen == "model":
        Xv = prepare_matrix(features, run.value.features_, run.value.categories_)
        out["value_reasons"] = reason_codes(run.value.contributions(Xv), features).to_numpy()
    return out


def score_customers(run: ModelRun, features: pd.DataFrame, *, reasons: bool = True
                    ) -> pd.DataFrame:
    """The customers of ``features`` (their features at the scoring date) scored by the
    run's models, as the models step scores them: ``churn_probability`` by the chosen
    churn method, ``value_model`` (the XGBoost value model's prediction, whichever
    value method scores) and, with ``reasons``, the reasons in words of
    :func:`explain_customers` (``churn_reasons``; ``value_reasons`` when the value model
    scores, else missing). Row by row: any split of the customers gives the same rows.
    """
    X = prepare_matrix(features, run.churn.features_, run.churn.categories_)
    out = pd.DataFrame({
        "customer_id": features["customer_id"].to_numpy(),
        "churn_probability": candidate_probabilities(run.churn, run.logistic,
                                                     X)[run.churn_chosen],
        "value_model": run.value.predict(
            prepare_matrix(features, run.value.features_, run.value.categories_)),
        "churn_reasons": None, "value_reasons": None})
    if reasons:
        explained = explain_customers(run, features)
        out["churn_reasons"] = explained["churn_reasons"].to_numpy()
        if "value_reasons" in explained:
            out["value_reasons"] = explained["value_reasons"].to_numpy()
    return out


#: The columns :func:`score_on_spark` returns, in Spark's schema.
SCORE_SCHEMA = ("customer_id string, churn_probability double, value_model double, "
                "churn_reasons string, value_reasons string")


def score_on_spark(run: ModelRun, features: pd.DataFrame | Any, spark: Any, *,
                   reasons: bool = True, ids: pd.Series | None = None) -> pd.DataFrame:
    """:func:`score_customers` on Spark's executors, each partition of the customers
    scored and explained where it lies; only the scores come back to the driver.

    ``features``: a Spark DataFrame of the customers' features at the scoring date (e.g.
    the profile step's table, read where it lies), or a frame (handed to Spark, as a
    file on a local master). ``ids``: the customers in the order to return them (a
    frame's own by default); each must be scored exactly once. The models reach the
    executors as plain values (the boosters' JSON, the logistic regression's
    coefficients: :meth:`_Booster.to_payload`), each task's XGBoost on one thread (Spark
    gives a task one core). Exact TreeSHAP of both models took 0.29 ms a customer on one
    core (``bench/spark_scoring.py``): 8 core-hours for 100 million customers, which a
    cluster's executors share. This is what lets a run on Spark give everyone reasons.

    Returns
    -------
    DataFrame
        :data:`SCORE_SCHEMA`'s columns, one row per customer, in the order of ``ids``
        (sorted by id when there are none).
    """
    engine = SparkEngine(spark)
    handed = isinstance(features, pd.DataFrame)
    source = features
    if handed:
        engine.register("_score_features", features)
        source = spark.table("_score_features")
    payload = _payload_of(run)

    # the customers dealt out evenly, two parts per core: a file's own partitions split
    # it by bytes, unevenly (100,000 customers took 31.5 s on a local[2] master, one
    # core doing most of the work; 21.2 s dealt out: bench/spark_scoring.py)
    source = source.repartition(2 * spark.sparkContext.defaultParallelism)

    def score(batches):
        models = _run_of_payload(payload)
        for frame in batches:
            yield score_customers(models, frame, reasons=reasons)

    try:
        scored = engine.collect(source.mapInPandas(score, SCORE_SCHEMA))
    finally:
        if handed:
            engine.unregister("_score_features")
    if ids is None and handed:
        ids = features["customer_id"]
    if ids is None:
        return scored.sort_values("customer_id", ignore_index=True)
    order = pd.Index(scored["customer_id"]).get_indexer(pd.Series(ids).astype(str))
    if (order < 0).any() or len(scored) != len(ids):
        raise RuntimeError("Spark's executors did not score every customer once")
    return scored.iloc[order].reset_index(drop=True)


def scores_on_spark(models: ModelRun, eng: SparkEngine, features: Any, *, as_of: dt.date,
                    horizon_days: int, rfm: RfmLookup, explain: pd.Series | None = None,
                    out: str | Path | None = None) -> pd.DataFrame | int:
    """The models step's scores table (:data:`SCORES_SCHEMA`), computed and written by
    Spark's executors: the customers of ``features`` (a Spark DataFrame of their
    features at ``as_of``, e.g. the profile step's table where it lies) each scored,
    valued by the chosen value method and given their lifetime outlook where they lie
    (:func:`scores_table`, with :func:`score_customers`' probabilities and reasons), as
    the driver does for a frame (:func:`_scores_here`). Only a few numbers reach the
    driver: the BG/NBD + Gamma-Gamma fit's customers (at most
    :data:`analysis.clv.BGNBD_FIT_CUSTOMERS`, the same as the driver's, by place in id
    order), which the executors then use to give every customer their own outlook.

    ``explain``: the customers to give reasons in words (all when None). ``out``: where
    the executors write the table, one row per customer in id order (the number of
    customers written is returned); else it is collected, in id order.
    """
    from pyspark.sql import functions as fn

    spark = eng.session
    payload = _payload_of(models)
    wanted = None if explain is None else frozenset(pd.Series(explain).astype(str))
    held = [c for c in RFM_SUMMARY_COLUMNS if c != "customer_id"]
    with summary_kept_on_spark(eng, cutoff=as_of) as (summary, fit):
        lifetime = fit_lifetime(fit, max_customers=None)
        joined = features.join(summary.select(
            "customer_id", *[fn.col(c).alias(f"_s_{c}") for c in held]),
            on="customer_id", how="left")
        # (dealt out evenly, two parts per core, as score_on_spark does; in ranges of ids
        # when the table is written as part files, so that it is not split after the
        # scoring, which would score it twice: SparkEngine.write_parquet)
        parts = 2 * spark.sparkContext.defaultParallelism
        ranged = out is not None and eng.writes_parts(out)
        joined = (joined.repartitionByRange(parts, "customer_id") if ranged
                  else joined.repartition(parts))

        def score(batches):
            run = _run_of_payload(payload)
            for frame in batches:
                part = frame.drop(columns=[f"_s_{c}" for c in held])
                ids = part["customer_id"].astype(str)
                base = score_customers(run, part, reasons=wanted is None)
                churn_reasons = np.array(base["churn_reasons"], dtype=object)
                model_reasons = np.array(base["value_reasons"], dtype=object)
                if wanted is not None:
                    pick = ids.isin(wanted).to_numpy()
                    if pick.any():
                        told = explain_customers(run, part[pick])
                        churn_reasons[pick] = told["churn_reasons"].to_numpy()
                        if "value_reasons" in told:
                            model_reasons[pick] = told["value_reasons"].to_numpy()
                have = frame["_s_frequency"].notna().to_numpy()
                rows = frame.loc[have, ["customer_id", *[f"_s_{c}" for c in held]]]
                s = summary_of_rows(rows.set_axis(list(RFM_SUMMARY_COLUMNS), axis=1))
                yield scores_table(
                    run, part, s.reindex(ids.to_numpy()),
                    churn_probability=base["churn_probability"].to_numpy(),
                    model_value=base["value_model"].to_numpy(),
                    reasons=(churn_reasons, model_reasons), as_of=as_of,
                    horizon_days=horizon_days, rfm=rfm, lifetime=lifetime)

        scored = joined.mapInPandas(score, SCORES_SCHEMA)
        if out is not None:
            return eng.write_parquet(scored, out, order_by="customer_id", ranged=ranged)
        return eng.collect(scored).sort_values("customer_id", ignore_index=True)


def drift_on_spark(eng: SparkEngine, features: Any, bins: dict, *, columns: list[str],
                   categories: dict) -> dict[str, np.ndarray | None]:
    """:func:`analysis.monitor.drift_counts` of the customers of ``features`` (a Spark
    DataFrame), in the training ``bins`` of their model matrix (``columns``,
    ``categories``: :func:`prepare_matrix`): each partition counted where it lies, the
    counts summed on the driver, as :func:`analysis.monitor.feature_drift` takes them."""
    from pyspark.sql import functions as fn

    def count(batches):
        for frame in batches:
            counts = drift_counts(bins, prepare_matrix(frame, columns, categories))
            yield pd.DataFrame([(col, i, int(v)) for col, c in counts.items() if c is not None
                                for i, v in enumerate(c)],
                               columns=["feature", "bin", "n"]).astype({"bin": "int64",
                                                                         "n": "int64"})

    totals = eng.collect(features.mapInPandas(count, "feature string, bin long, n long")
                         .groupBy("feature", "bin").agg(fn.sum("n").alias("n")))
    out: dict[str, np.ndarray | None] = {}
    for col, b in bins.items():
        if b is None:
            out[col] = None
            continue
        width = len(b[0]) - 1 if len(b[0]) >= 3 else 1
        mine = totals[totals["feature"] == col]
        counts = np.zeros(width, dtype="int64")
        counts[mine["bin"].to_numpy(dtype=int)] = mine["n"].to_numpy(dtype="int64")
        out[col] = counts
    return out


def _payload_of(run: ModelRun) -> dict:
    """The run's models as plain values, for Spark's executors (:func:`_run_of_payload`
    rebuilds them there)."""
    return {"churn": run.churn.to_payload(), "value": run.value.to_payload(),
            "logistic": run.logistic.to_dict() if run.logistic is not None else None,
            "churn_chosen": run.churn_chosen, "value_chosen": run.value_chosen}


def _run_of_payload(payload: dict) -> ModelRun:
    """The models of :func:`score_on_spark`'s payload, as a (model-only) run, each
    booster on one thread."""
    churn = ChurnModel.restore(payload["churn"]["meta"], payload["churn"]["booster"])
    value = ValueModel.restore(payload["value"]["meta"], payload["value"]["booster"])
    for model in (churn, value):
        model.booster_.set_param({"nthread": 1})
    logistic = (LogisticChurn.from_dict(payload["logistic"])
                if payload["logistic"] is not None else None)
    return ModelRun(horizon_days=0, cutoffs={}, churn=churn, value=value, clv_params={},
                    sizes={}, logistic=logistic, churn_chosen=payload["churn_chosen"],
                    value_chosen=payload["value_chosen"])


def customers_with_reasons(sizes: dict) -> int:
    """How many customers the models step gave reasons in words, from a run's ``sizes``
    (runs written before ``reasons`` was recorded: the ``explained`` sample's size)."""
    return int(sizes.get("reasons", sizes.get("explained", sizes.get("score", 0))))


def evaluation_sample(run: ModelRun, lead: str = " (", end: str = ")") -> str:
    """How the evaluation's customers were drawn, for a sentence that counts them: empty
    when they are every customer of the evaluation cutoff, else e.g. ``" (a random 9.5 %
    of the customers, drawn by id)"``, with ``lead`` and ``end`` around it (see
    :func:`fit_and_evaluate`'s ``max_eval_rows``)."""
    share = float((getattr(run, "sizes", None) or {}).get("eval_share", 1.0))
    if share >= 1.0:
        return ""
    return f"{lead}a random {share:.1%} of the customers, drawn by id{end}"


def describe_training(run: ModelRun) -> str:
    """How the run's models were trained, stopped, chosen, judged and scored, in one
    sentence (plain text: its values are dates, counts and a method name)."""
    s, c = run.sizes, run.cutoffs
    return (f"Horizon {run.horizon_days} days. Trained on cutoffs {', '.join(c['train'])} "
            f"({s['train']:,} customer snapshots), stopped early and calibrated "
            f"({run.churn.calibration_['method']}) on {s['valid_tune']:,} customers at "
            f"{c['valid']}, the scoring method chosen on the other {s['valid_choose']:,} "
            f"customers there, judged on {c['eval']} ({s['eval']:,} customers"
            f"{evaluation_sample(run, ', ', '')}), scored at "
            f"{c['score']}.")
