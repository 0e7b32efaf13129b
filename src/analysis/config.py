"""The one typed run configuration, loaded from YAML at the edge (CLI or notebook).

A config maps a dataset onto the input contract (file, format, column names, date
format, separators) and holds every analysis parameter, with documented defaults.
Paths in a config are relative to the config file.

Every parameter group is a pydantic model: unknown keys are refused (``extra="forbid"``),
option strings are ``Literal`` choices, and a bad value fails with the config file, the
key, the rule and the valid values (:class:`~analysis.errors.ConfigError`).
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from analysis.errors import ConfigError

__all__ = [
    "DAYS_PER_MONTH",
    "REASONS_FOR_ALL_MAX",
    "TABLE_CONTRACTS",
    "AnalysisParams",
    "CleaningParams",
    "Config",
    "OutputParams",
    "ReportParams",
    "SnapshotParams",
    "SparkParams",
    "StrategyParams",
    "TableSpec",
    "load_config",
    "memory_bytes",
    "parse_config",
]

Mode = Literal["transactions", "snapshot"]
FileFormat = Literal["auto", "csv", "parquet", "excel"]
Dedupe = Literal["auto", "always", "never"]

#: Days in an average month: a Julian year (365.25 days) over twelve, 30.4375.
DAYS_PER_MONTH = 365.25 / 12

#: Contract of each table: (required columns, optional columns).
TABLE_CONTRACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "transactions": (
        ("customer_id", "order_date", "amount"),
        ("order_id", "quantity", "category", "channel", "status", "margin", "cost",
         "unit_price"),
    ),
    # in snapshot mode the customers table also carries the churn label (required there),
    # tenure and revenue
    "customers": (("customer_id",), ("signup_date", "churn", "tenure", "recurring_revenue",
                                     "total_revenue")),
    "interactions": (("customer_id", "date", "type"), ("score", "resolved")),
    # a past retention campaign with random assignment: who was contacted, and when
    "campaign": (("customer_id", "campaign_date", "treated"), ()),
}

_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(i?)B", re.I)


def _problem(message: str, *, field: str | None = None) -> PydanticCustomError:
    """A validation failure whose message is shown as is; ``field`` names the key below
    the validated object when the failure is about one of its keys."""
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


class _Params(BaseModel):
    """A parameter group: immutable, unknown keys refused, a number taken as text where
    text is expected (a column named ``2024``, a churn flag ``1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class TableSpec(_Params):
    """Where one input table lives and how its columns map onto the contract.

    ``columns`` maps contract names to the file's column names; contract columns
    not listed are looked up under their own name. ``attributes`` (customers table)
    lists extra descriptive columns to keep; by default every unmapped column is kept.
    ``table``, instead of ``path``: a table or view of the Spark session's catalog
    (e.g. a Delta table on Databricks, ``sales.orders``), read by Spark
    (``analysis.engine: spark``).
    """

    path: Path | None = None
    table: str | None = None
    format: FileFormat = "auto"
    sep: str = ","
    header: bool = True
    names: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    date_format: str | None = None
    decimal: str = "."
    thousands: str | None = None
    sheet: str | int | None = None
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("path", mode="before")
    @classmethod
    def _relative_to_the_config(cls, value: Any, info: ValidationInfo) -> Any:
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is None or not isinstance(value, str | Path):
            return value
        return _resolve(value, base_dir)

    @field_validator("columns", mode="before")
    @classmethod
    def _no_columns(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_source(self) -> TableSpec:
        if (self.path is None) == (self.table is None):
            raise _problem("needs a 'path' (a file) or a 'table' (a table of the Spark "
                           "session's catalog), one of them")
        return self

    @property
    def source(self) -> str | Path:
        """Where the rows are: the file, or the catalog table's name."""
        return self.path if self.table is None else self.table

    @property
    def resolved_format(self) -> str:
        if self.table is not None:
            return "table"
        if self.format != "auto":
            return self.format
        suffix = self.path.suffix.lower()
        if suffix in {".parquet", ".pq"}:
            return "parquet"
        if suffix in {".xlsx", ".xlsm", ".xls"}:
            return "excel"
        return "csv"


class CleaningParams(_Params):
    """Cleaning rules.

    dedupe : ``auto`` removes exact duplicate lines only when the table has an
        ``order_id`` (without one, two identical lines can be two real purchases,
        as in CDNOW); ``always`` / ``never`` force it.
    max_abs_amount : amounts beyond this absolute value are quarantined.
    min_date : records dated before this are quarantined.
    """

    dedupe: Dedupe = "auto"
    max_abs_amount: float = 1e9
    min_date: dt.date = dt.date(1990, 1, 1)


#: Up to this many customers, ``reasons_for: auto`` explains every customer on a CPU: at
#: about a millisecond of TreeSHAP per customer and model, a few minutes at most.
REASONS_FOR_ALL_MAX = 200_000


class AnalysisParams(_Params):
    """Analysis parameters.

    as_of : the scoring date; history is every record strictly before it. Default:
        the day after the last record.
    horizon_days : churn/value horizon in days, or ``"auto"`` for a horizon suggested
        from the data's inter-purchase times.
    n_cutoffs, cutoff_step_days : rolling-origin training snapshots.
    tier_shares : value tiers by cumulative share of value (high, mid; low is the rest).
    memory_limit : the memory budget of each stage of a run, e.g. ``"4GB"``. DuckDB gets
        half of it for the feature work (:attr:`duckdb_memory_limit`; it spills to disk
        beyond); the other half is for the tables Python holds (one row per customer,
        and the cleaned input while it is checked, read in chunks; the DuckDB judging a
        whole parsed file gets less, :meth:`duckdb_memory_left`). Default: no budget
        (DuckDB's own limit, 80 % of the machine's memory).
    min_customers : fewer customers with a purchase than this stops the run (exit 4):
        segments, tiers and models over a handful of customers would mislead.
    min_segment_customers : a segment with fewer customers is counted but not described
        (no averages, medians or main categories: they would be noise).
    device : ``cuda`` trains the models and computes SHAP values on an NVIDIA GPU (needs
        the CUDA build of XGBoost: ``make gpu``); ``cpu`` is the tested default.
    engine : where the set-based work runs: ``duckdb`` (default; this machine) or
        ``spark`` (Apache Spark, section ``spark``; needs ``make spark``): the
        point-in-time features, training (``xgboost.spark``), and scoring and reasons on
        the executors; what runs where: docs/spark.md.
    reasons_for : which customers get their own reasons in words (exact SHAP values):
        ``all``; ``listed``: those a person reads about (why they may leave: every
        customer on a retention, win-back or phase-out review list, with an early
        warning, or among the 100 highest churn probabilities or predicted values; what
        drives their value: the phase-out review and the 100 highest values) plus a
        fixed random sample of ``reasons_sample`` customers, from which the global
        drivers come; anyone else's on demand
        (:func:`analysis.models.explain_customers`). ``auto``: ``all``
        on a GPU, on Spark (its executors explain the customers) or for at most
        :data:`REASONS_FOR_ALL_MAX` customers, else ``listed``. On Spark the global
        drivers always come from a sample of ``reasons_sample`` customers.
    """

    as_of: dt.date | None = None
    horizon_days: int | Literal["auto"] = 90
    n_cutoffs: int = 14
    cutoff_step_days: int = 30
    tier_shares: tuple[float, float] = (0.5, 0.3)
    lifecycle_at_risk_gap_multiple: float = 1.5
    lifecycle_lapsed_gap_multiple: float = 3.0
    lifecycle_new_days: int = 90
    max_clusters: int = 8
    min_customers: int = 20
    memory_limit: str | None = None
    min_segment_customers: int = 30
    device: Literal["cpu", "cuda"] = "cpu"
    engine: Literal["duckdb", "spark"] = "duckdb"
    reasons_for: Literal["auto", "all", "listed"] = "auto"
    reasons_sample: int = Field(20_000, ge=1)

    def reasons_sample_for(self, n_customers: int) -> int | None:
        """How many customers the models step explains (a sample's size), or None for
        every customer: :attr:`reasons_for` resolved for a base of ``n_customers``."""
        every = self.reasons_for == "all" or (self.reasons_for == "auto" and (
            self.device == "cuda" or self.engine == "spark"
            or n_customers <= REASONS_FOR_ALL_MAX))
        return None if every else self.reasons_sample

    @field_validator("horizon_days", mode="before")
    @classmethod
    def _days_or_auto(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _problem("must be a positive number of days or 'auto'")
        return value

    @field_validator("tier_shares", mode="before")
    @classmethod
    def _two_shares(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise _problem("needs two shares (high, mid) in (0, 1) that sum below 1")
        return value

    @field_validator("tier_shares")
    @classmethod
    def _room_for_low(cls, value: tuple[float, float]) -> tuple[float, float]:
        high, mid = value
        if not (0 < high < 1 and 0 <= mid < 1 and high + mid < 1):
            raise _problem("needs two shares (high, mid) in (0, 1) that sum below 1")
        return value

    @field_validator("memory_limit")
    @classmethod
    def _a_memory_size(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY_SIZE.fullmatch(value.strip()):
            raise _problem(f"{value!r} is not a memory size such as '2GB'")
        return value

    @property
    def duckdb_memory_limit(self) -> str | None:
        """DuckDB's share of :attr:`memory_limit` (half), as DuckDB reads it (MB)."""
        if self.memory_limit is None:
            return None
        return f"{memory_bytes(self.memory_limit) // 2 // 10**6}MB"

    def duckdb_memory_left(self, held_bytes: int) -> str | None:
        """DuckDB's limit for a query run while Python already holds ``held_bytes``
        (e.g. a whole parsed file): its share (:attr:`duckdb_memory_limit`), or, when
        less is left of :attr:`memory_limit`, three quarters of what is left (at least
        256 MB; it spills to disk beyond)."""
        if self.memory_limit is None:
            return None
        budget = memory_bytes(self.memory_limit)
        left = max((budget - held_bytes) * 3 // 4, 256 * 10**6)
        return f"{min(budget // 2, left) // 10**6}MB"


def memory_bytes(size: str) -> int:
    """``"4GB"`` -> 4_000_000_000, ``"4GiB"`` -> 4 * 2**30 (DuckDB's reading of sizes)."""
    m = _MEMORY_SIZE.fullmatch(str(size).strip())
    if m is None:
        raise ValueError(f"{size!r} is not a memory size such as '2GB'")
    power = "KMGT".index(m.group(2).upper()) + 1
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power))


class SnapshotParams(_Params):
    """Snapshot (subscription) mode: how to read the customers table's label, tenure and
    revenue (config section ``snapshot``).

    churn_positive : the value of the churn column that means "left" (compared ignoring
        case and surrounding spaces; e.g. ``Yes``, ``1``, ``True``, ``Churned``).
    tenure_unit : ``days``, ``weeks``, ``months`` or ``years``.
    revenue_period : the period of ``recurring_revenue``: ``day``, ``week``, ``month``,
        ``quarter`` or ``year``.
    churn_period_months : the period the churn label covers (a customer flagged as gone
        left within this many months): the model's probability is per such period.
    discount_rate : yearly rate for discounting the expected remaining value.
    max_years : the remaining value counts at most this many years ahead.
    survival_by : a column to draw tenure survival curves by (e.g. the contract type).
    cv_folds : stratified folds of the cross-validation.
    new_months : customers with a shorter tenure are "new".
    """

    churn_positive: str = "yes"
    tenure_unit: Literal["days", "weeks", "months", "years"] = "months"
    revenue_period: Literal["day", "week", "month", "quarter", "year"] = "month"
    churn_period_months: float = 1.0
    discount_rate: float = 0.10
    max_years: float = 5.0
    survival_by: str | None = None
    cv_folds: int = 5
    new_months: float = 6.0

    @field_validator("churn_positive", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        if isinstance(value, bool):        # YAML reads a bare Yes/No as a boolean
            return "yes" if value else "no"
        return value

    @field_validator("cv_folds")
    @classmethod
    def _two_folds(cls, value: int) -> int:
        if value < 2:
            raise _problem("needs at least 2 folds")
        return value

    @property
    def tenure_months_per_unit(self) -> float:
        return {"days": 1 / DAYS_PER_MONTH, "weeks": 12 / 52.18, "months": 1.0,
                "years": 12.0}[self.tenure_unit]

    @property
    def revenue_periods_per_month(self) -> float:
        return {"day": DAYS_PER_MONTH, "week": 52.18 / 12, "month": 1.0, "quarter": 1 / 3,
                "year": 1 / 12}[self.revenue_period]


class StrategyParams(_Params):
    """Every assumption of the strategy step, with its unit (config section ``strategy``).

    margin_rate : share of revenue kept as margin when the data has no margin.
    cost_per_order : cost to serve one order (currency), unless its channel is listed in
        ``cost_per_order_by_channel``.
    cost_per_complaint : handling cost of a complaint; expected complaints follow the
        customer's rate over the last year.
    cost_per_account_year : fixed yearly cost of keeping an account.
    contact_cost, offer_cost : cost of one retention contact and of the offer it carries.
    retention_rate : P(a would-be churner stays | contacted) when no campaign data exists.
    retention_value_months : months over which a retention contact is valued: with
        campaigns to measure it on, the extra margin a lowered dropout hazard brings over
        them; without, a retained customer is worth that many months of run-rate margin.
    high_risk : churn probability from which the risk is "high".
    growth_ratio : predicted value over last period's value from which a customer has
        "potential".
    phaseout_periods : K: unprofitable in the current forecast and each of the K previous
        horizon-length periods.
    phaseout_max_tenure_days : customers with longer tenure are kept off the list ...
    phaseout_large_loss : ... unless their expected loss per horizon exceeds this.
    phaseout_min_loss : the forecast loss per horizon must exceed this (currency): a
        customer near break-even is not put up for phase-out over forecast noise.
    phaseout_complaint_days : no phase-out review within this many days of a complaint.
    phaseout_confidence : how sure it must be that the customer's orders lose money: the
        upper end of this two-sided interval of their mean profit per order (from at
        least two orders) must be below zero.
    warning_gap_multiple, warning_spend_drop, warning_satisfaction, warning_churn,
    warning_churn_rise : early-warning thresholds (times own gap; share of spend lost;
        score at or below; churn probability at or above; rise of the churn probability
        since the previous run, in points of probability).
    fairness_ratio, fairness_p_value : four-fifths rule, with a significance test.
    fairness_min_group : a protected group with fewer customers is too small to judge:
        it is listed, not tested.
    policy : the action policy table (rows tried in order, each with an ``action``);
        default: :data:`analysis.strategy.DEFAULT_POLICY`.
    """

    margin_rate: float = 0.30
    cost_per_order: float = 2.0
    cost_per_order_by_channel: dict[str, float] = Field(default_factory=lambda: {
        "online": 1.5, "store": 6.0, "phone": 9.0, "marketplace": 3.0})
    cost_per_complaint: float = 15.0
    cost_per_account_year: float = 4.0
    contact_cost: float = 3.0
    offer_cost: float = 7.0
    retention_rate: float = 0.15
    retention_value_months: int = 12
    high_risk: float = 0.5
    growth_ratio: float = 1.5
    phaseout_periods: int = 3
    phaseout_max_tenure_days: int = 1095
    phaseout_large_loss: float = 25.0
    phaseout_min_loss: float = 2.5
    phaseout_complaint_days: int = 90
    phaseout_confidence: float = 0.95
    warning_gap_multiple: float = 2.0
    warning_spend_drop: float = 0.5
    warning_satisfaction: float = 2.0
    warning_churn: float = 0.7
    warning_churn_rise: float = 0.2
    fairness_ratio: float = 0.8
    fairness_p_value: float = 0.01
    fairness_min_group: int = 30
    policy: list[dict[str, Any]] | None = None

    @field_validator("phaseout_confidence")
    @classmethod
    def _a_probability(cls, value: float) -> float:
        if not 0 < value < 1:
            raise _problem(f"bad value {value!r}: a confidence is between 0 and 1 (0.95 is "
                           "a 95 % interval)")
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _rows_with_an_action(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, list) or not all(
                isinstance(row, dict) and "action" in row for row in value)):
            raise _problem(f"bad value {value!r}: the policy is a list of rows, each with "
                           "an 'action'")
        return value

    def table(self) -> pd.DataFrame:
        """Every parameter as a (parameter, value) table for the report."""
        rows = [(name, getattr(self, name)) for name in type(self).model_fields
                if name != "policy"]
        return pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "object"})


class OutputParams(_Params):
    """Where a run writes, and how customer ids appear there.

    processed_dir, reports_dir : default ``data/processed`` and ``reports`` under the
        project (the folder holding ``pyproject.toml`` above the config, else the
        config's folder).
    pseudonymize_ids : replace every customer id, in everything a run writes (processed
        tables, quarantine files, customer CSV, reports), by a keyed hash
        (HMAC-SHA256): stable across runs, not reversible without the key. Whoever holds
        the key maps their own ids with ``python -m analysis pseudonym``.
    pseudonym_key_env : the environment variable holding that key (never the config).
    """

    processed_dir: Path
    reports_dir: Path
    pseudonymize_ids: bool = False
    pseudonym_key_env: str = "CSL_PSEUDONYM_KEY"

    @model_validator(mode="before")
    @classmethod
    def _default_folders(cls, data: Any, info: ValidationInfo) -> Any:
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is None or not isinstance(data, dict):
            return data
        root = _project_root(base_dir)
        data = dict(data)
        for key, default in (("processed_dir", root / "data" / "processed"),
                             ("reports_dir", root / "reports")):
            value = data.get(key)
            data[key] = default if value is None else _resolve(value, base_dir)
        if data.get("pseudonym_key_env") is None:
            data.pop("pseudonym_key_env", None)
        return data

    @model_validator(mode="after")
    def _key_is_set(self, info: ValidationInfo) -> OutputParams:
        # checked when a config is loaded, not when a test builds the object
        if info.context and self.pseudonymize_ids and not os.environ.get(
                self.pseudonym_key_env):
            raise _problem(f"pseudonymize_ids is on but the environment variable "
                           f"{self.pseudonym_key_env} holding the key is not set",
                           field="pseudonymize_ids")
        return self


class SparkParams(_Params):
    """Apache Spark, for ``analysis.engine: spark`` (config section ``spark``).

    master : where Spark runs: ``local[*]`` (this machine, every core),
        ``spark://host:7077``, ``yarn``, ``k8s://...``; default: what ``spark-submit``
        says, else ``local[*]``. Where a session is already active (a Databricks
        notebook), that session is used and this is ignored.
    conf : Spark settings for a new session, e.g. ``spark.driver.memory: 8g``,
        ``spark.sql.shuffle.partitions: 400`` (beneath them, the project's own:
        :data:`analysis.engine.SPARK_DEFAULTS`).
    """

    master: str | None = None
    conf: dict[str, str] = Field(default_factory=dict)


class ReportParams(_Params):
    """How the executive page writes its figures (config section ``report``).

    currency : the currency of every money figure (``"EUR"``, ``"$"``, ``"GBP"``), shown
        before it; empty (the default): figures are shown without a currency, as the data
        has none.
    """

    currency: str = Field(default="", max_length=12)


_SECTIONS = ("cleaning", "analysis", "strategy", "snapshot", "output", "report", "spark")


class Config(_Params):
    """A complete run configuration."""

    name: str
    mode: Mode = "transactions"
    tables: dict[str, TableSpec]
    output: OutputParams
    source: Path | None = None
    seed: int = 42
    protected: tuple[str, ...] = ()
    pii: tuple[str, ...] = ()
    cleaning: CleaningParams = CleaningParams()
    analysis: AnalysisParams = AnalysisParams()
    strategy: StrategyParams = Field(default_factory=StrategyParams)
    snapshot: SnapshotParams = SnapshotParams()
    report: ReportParams = ReportParams()
    spark: SparkParams = Field(default_factory=SparkParams)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any, info: ValidationInfo) -> Any:
        """What a YAML file may leave out: empty sections, the name, the output folders;
        ``source`` is where the file is, never a key in it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in (*_SECTIONS, "protected", "pii"):
            if key in data and data[key] is None:
                del data[key]
        if info.context is not None:
            if "source" in data:
                raise _problem(_unknown_keys({"source"}, _input_keys(cls)))
            source = info.context.get("source")
            data["source"] = None if source is None else Path(source).resolve()
            if not data.get("name"):
                data["name"] = Path(source).stem if source else "run"
            data.setdefault("output", {})
        tables = data.get("tables")
        if not isinstance(tables, dict) or not tables:
            raise _problem("needs a 'tables' mapping with at least one table", field="tables")
        for name in tables:
            if name not in TABLE_CONTRACTS:
                raise _problem(f"unknown table '{name}'; valid: {', '.join(TABLE_CONTRACTS)}",
                               field="tables")
        data["tables"] = {name: {"path": spec} if isinstance(spec, str | Path) else spec
                          for name, spec in tables.items()}
        return data

    @model_validator(mode="after")
    def _tables_fit_the_mode(self) -> Config:
        required = "transactions" if self.mode == "transactions" else "customers"
        if required not in self.tables:
            raise _problem(f"mode '{self.mode}' needs a '{required}' table", field="tables")
        for name, spec in self.tables.items():
            if spec.table is not None and (self.analysis.engine != "spark"
                                           or self.mode != "transactions"):
                raise _problem("a table of the Spark catalog is read by Spark: it needs "
                               "'analysis: {engine: spark}' and mode 'transactions'",
                               field=f"tables.{name}.table")
            contract = sum(TABLE_CONTRACTS[name], ())
            unknown = set(spec.columns) - set(contract)
            if unknown:
                raise _problem(_unknown_keys(unknown, contract),
                               field=f"tables.{name}.columns")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, for metrics files and reports."""
        return self.model_dump(mode="json")


def load_config(path: str | Path) -> Config:
    """Read and check a YAML run configuration.

    Relative paths inside it are taken relative to the config file.

    Raises
    ------
    ConfigError
        When the file is missing, is not YAML, or holds an unknown key or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", path=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=path) from exc
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level", path=path)
    return parse_config(raw, base_dir=path.resolve().parent, source=path)


def parse_config(raw: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Build a :class:`Config` from an already-parsed mapping.

    Relative paths are taken relative to ``base_dir``; ``source`` is the file the mapping
    came from (named in errors).

    Raises
    ------
    ConfigError
        Naming the file, the key, the rule and the valid values of the first problem
        found (unknown keys first, as they often explain the rest).
    """
    try:
        return Config.model_validate(raw, context={"base_dir": Path(base_dir),
                                                   "source": source})
    except ValidationError as exc:
        raise _config_error(exc, source) from None


# --------------------------------------------------------------------------- helpers


def _config_error(exc: ValidationError, source: Path | None) -> ConfigError:
    """The first problem of a failed validation as one :class:`ConfigError`.

    The messages are those a person needs: unknown keys with the valid ones (and the
    closest match), a choice with the valid choices, a bad value with what was expected.
    """
    errors = exc.errors(include_url=False)
    first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    path, annotation = _walk(Config, first["loc"])
    key = _key(path)
    kind, ctx, value = first["type"], first.get("ctx") or {}, first.get("input")
    if kind == "extra_forbidden":
        parent = path[:-1]
        unknown = {str(e["loc"][len(parent)]) for e in errors if e["type"] == kind
                   and _walk(Config, e["loc"])[0][:-1] == parent}
        valid = _input_keys(_walk(Config, tuple(parent))[1])
        return ConfigError(_unknown_keys(unknown, valid), path=source, key=_key(parent))
    if kind == "config":
        field = ctx.get("field")
        key = ".".join(filter(None, [key, field])) or None
        return ConfigError(str(ctx["message"]), path=source, key=key)
    if kind == "literal_error":
        choices = get_args(annotation) or re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return ConfigError(f"{value!r} is not one of: {', '.join(map(str, choices))}",
                           path=source, key=key)
    if kind == "missing":
        return ConfigError(f"needs a '{path[-1]}'", path=source, key=_key(path[:-1]))
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return ConfigError("expected a mapping", path=source, key=key)
    reason = _REASONS.get(kind) or (first["msg"][:1].lower() + first["msg"][1:])
    return ConfigError(f"bad value {value!r}: {reason}", path=source, key=key)


_REASONS = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number", "float_type": "expected a number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "date_parsing": "expected a date such as 2024-01-31",
    "date_from_datetime_parsing": "expected a date such as 2024-01-31",
    "date_from_datetime_inexact": "expected a date such as 2024-01-31",
    "date_type": "expected a date such as 2024-01-31",
    "string_type": "expected text", "path_type": "expected a path",
    "tuple_type": "expected a list", "list_type": "expected a list",
}


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list, Any]:
    """The config path named by a pydantic error location, and the type found there.

    Pydantic adds tags to a location (a union member's name, ``[key]``) that are no key
    of the config: the walk stops where the type has no further keys.
    """
    path: list = []
    current: Any = model
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                path.append(part)      # an unknown key
                return path, None
            current = current.model_fields[part].annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) in (tuple, list) and isinstance(part, int):
            args = [a for a in get_args(current) if a is not Ellipsis]
            current = args[min(part, len(args) - 1)]     # tuple[str, ...], list[X], (X, Y)
        else:
            break
        path.append(part)
    return path, _strip_optional(current)


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``; anything else as is."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _key(path: list) -> str | None:
    """``['tables', 'transactions', 'names', 0]`` -> ``tables.transactions.names[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or None


def _input_keys(model: Any) -> list[str]:
    """The keys a config may set on a parameter group (``source`` is set by the loader)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return sorted(name for name in model.model_fields if not (model is Config
                                                              and name == "source"))


def _unknown_keys(unknown: set, valid) -> str:
    """``unknown key(s) horizon (did you mean horizon_days?); valid: as_of, ...``."""
    names = sorted(map(str, unknown))
    hints = sorted({m for n in names for m in difflib.get_close_matches(n, list(valid), n=1)})
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown key(s) {', '.join(names)}{hint}; valid: {', '.join(sorted(valid))}"


def _resolve(value: Any, base_dir: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (Path(base_dir) / p).resolve()


def _project_root(base_dir: Path) -> Path:
    """The folder holding pyproject.toml above the config, else the config's folder."""
    for candidate in (base_dir, *base_dir.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return base_dir
