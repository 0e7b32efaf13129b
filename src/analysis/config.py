"""The one typed run configuration, loaded from YAML at the edge (CLI or notebook).

A config maps a dataset onto the input contract (file, format, column names, date
format, separators) and holds every analysis parameter, with documented defaults.
Paths in a config are relative to the config file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
import yaml

from analysis.errors import ConfigError

__all__ = [
    "DAYS_PER_MONTH",
    "TABLE_CONTRACTS",
    "AnalysisParams",
    "CleaningParams",
    "Config",
    "OutputParams",
    "SnapshotParams",
    "StrategyParams",
    "TableSpec",
    "load_config",
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
        ("order_id", "quantity", "category", "channel", "status", "margin", "cost"),
    ),
    # in snapshot mode the customers table also carries the churn label (required there),
    # tenure and revenue
    "customers": (("customer_id",), ("signup_date", "churn", "tenure", "recurring_revenue",
                                     "total_revenue")),
    "interactions": (("customer_id", "date", "type"), ("score", "resolved")),
    # a past retention campaign with random assignment: who was contacted, and when
    "campaign": (("customer_id", "campaign_date", "treated"), ()),
}


@dataclass(frozen=True)
class TableSpec:
    """Where one input table lives and how its columns map onto the contract.

    ``columns`` maps contract names to the file's column names; contract columns
    not listed are looked up under their own name. ``attributes`` (customers table)
    lists extra descriptive columns to keep; by default every unmapped column is kept.
    """

    path: Path
    format: FileFormat = "auto"
    sep: str = ","
    header: bool = True
    names: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    date_format: str | None = None
    decimal: str = "."
    thousands: str | None = None
    sheet: str | int | None = None
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = self.path.suffix.lower()
        if suffix in {".parquet", ".pq"}:
            return "parquet"
        if suffix in {".xlsx", ".xlsm", ".xls"}:
            return "excel"
        return "csv"


@dataclass(frozen=True)
class CleaningParams:
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


@dataclass(frozen=True)
class AnalysisParams:
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
        and the cleaned input while it is checked, read in chunks). Default: no budget
        (DuckDB's own limit, 80 % of the machine's memory).
    min_customers : fewer customers with a purchase than this stops the run (exit 4):
        segments, tiers and models over a handful of customers would mislead.
    min_segment_customers : a segment with fewer customers is counted but not described
        (no averages, medians or main categories: they would be noise).
    device : ``cuda`` trains the models and computes SHAP values on an NVIDIA GPU (needs
        the CUDA build of XGBoost: ``make gpu``); ``cpu`` is the tested default.
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

    @property
    def duckdb_memory_limit(self) -> str | None:
        """DuckDB's share of :attr:`memory_limit` (half), as DuckDB reads it (MB)."""
        if self.memory_limit is None:
            return None
        return f"{memory_bytes(self.memory_limit) // 2 // 10**6}MB"


def memory_bytes(size: str) -> int:
    """``"4GB"`` -> 4_000_000_000, ``"4GiB"`` -> 4 * 2**30 (DuckDB's reading of sizes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT])(i?)B", str(size).strip(), re.I)
    if m is None:
        raise ValueError(f"{size!r} is not a memory size such as '2GB'")
    power = "KMGT".index(m.group(2).upper()) + 1
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power))


@dataclass(frozen=True)
class SnapshotParams:
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

    @property
    def tenure_months_per_unit(self) -> float:
        return {"days": 1 / DAYS_PER_MONTH, "weeks": 12 / 52.18, "months": 1.0,
                "years": 12.0}[self.tenure_unit]

    @property
    def revenue_periods_per_month(self) -> float:
        return {"day": DAYS_PER_MONTH, "week": 52.18 / 12, "month": 1.0, "quarter": 1 / 3,
                "year": 1 / 12}[self.revenue_period]


@dataclass(frozen=True)
class StrategyParams:
    """Every assumption of the strategy step, with its unit (config section ``strategy``).

    margin_rate : share of revenue kept as margin when the data has no margin.
    cost_per_order : cost to serve one order (currency), unless its channel is listed in
        ``cost_per_order_by_channel``.
    cost_per_complaint : handling cost of a complaint; expected complaints follow the
        customer's rate over the last year.
    cost_per_account_year : fixed yearly cost of keeping an account.
    contact_cost, offer_cost : cost of one retention contact and of the offer it carries.
    retention_rate : P(a would-be churner stays | contacted) when no campaign data exists.
    retention_value_months : months of run-rate margin a retained customer is worth.
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
    warning_gap_multiple, warning_spend_drop, warning_satisfaction, warning_churn,
    warning_churn_rise : early-warning thresholds (times own gap; share of spend lost;
        score at or below; churn probability at or above; rise of the churn probability
        since the previous run, in points of probability).
    fairness_ratio, fairness_p_value : four-fifths rule, with a significance test.
    fairness_min_group : a protected group with fewer customers is too small to judge:
        it is listed, not tested.
    """

    margin_rate: float = 0.30
    cost_per_order: float = 2.0
    cost_per_order_by_channel: dict = field(default_factory=lambda: {
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
    warning_gap_multiple: float = 2.0
    warning_spend_drop: float = 0.5
    warning_satisfaction: float = 2.0
    warning_churn: float = 0.7
    warning_churn_rise: float = 0.2
    fairness_ratio: float = 0.8
    fairness_p_value: float = 0.01
    fairness_min_group: int = 30
    policy: list | None = None

    def table(self) -> pd.DataFrame:
        """Every parameter as a (parameter, value) table for the report."""
        rows = [(k, v) for k, v in dataclasses.asdict(self).items() if k != "policy"]
        return pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "object"})


@dataclass(frozen=True)
class OutputParams:
    """Where a run writes, and how customer ids appear there.

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


@dataclass(frozen=True)
class Config:
    """A complete run configuration."""

    name: str
    mode: Mode
    tables: dict[str, TableSpec]
    output: OutputParams
    source: Path | None = None
    seed: int = 42
    protected: tuple[str, ...] = ()
    pii: tuple[str, ...] = ()
    cleaning: CleaningParams = CleaningParams()
    analysis: AnalysisParams = AnalysisParams()
    strategy: StrategyParams = field(default_factory=StrategyParams)
    snapshot: SnapshotParams = SnapshotParams()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, for metrics files and reports."""
        return _jsonable(dataclasses.asdict(self))


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
    """Build a :class:`Config` from an already-parsed mapping."""
    ctx = _Ctx(source)
    ctx.known(raw, "", {"name", "mode", "seed", "tables", "protected", "pii", "cleaning",
                        "analysis", "strategy", "snapshot", "output"})
    mode = ctx.choice(raw.get("mode", "transactions"), Mode, "mode")
    tables_raw = raw.get("tables")
    if not isinstance(tables_raw, dict) or not tables_raw:
        raise ConfigError("needs a 'tables' mapping with at least one table", path=source,
                          key="tables")
    tables = {}
    for table_name, spec in tables_raw.items():
        if table_name not in TABLE_CONTRACTS:
            raise ConfigError(f"unknown table '{table_name}'; valid: "
                              f"{', '.join(TABLE_CONTRACTS)}", path=source, key="tables")
        tables[table_name] = _parse_table(spec, base_dir, ctx, f"tables.{table_name}")
    required_table = "transactions" if mode == "transactions" else "customers"
    if required_table not in tables:
        raise ConfigError(f"mode '{mode}' needs a '{required_table}' table", path=source,
                          key="tables")

    cleaning = _parse_dataclass(CleaningParams, raw.get("cleaning") or {}, ctx, "cleaning")
    analysis = _parse_dataclass(AnalysisParams, raw.get("analysis") or {}, ctx, "analysis")
    strategy = _parse_dataclass(StrategyParams, raw.get("strategy") or {}, ctx, "strategy")
    snapshot = _parse_dataclass(SnapshotParams, raw.get("snapshot") or {}, ctx, "snapshot")
    if snapshot.cv_folds < 2:
        raise ConfigError("needs at least 2 folds", path=source, key="snapshot.cv_folds")
    if analysis.horizon_days != "auto" and int(analysis.horizon_days) < 1:
        raise ConfigError("must be a positive number of days or 'auto'", path=source,
                          key="analysis.horizon_days")
    if analysis.memory_limit is not None and not re.fullmatch(
            r"\d+(\.\d+)?\s*([KMGT]i?B)", str(analysis.memory_limit).strip(), re.I):
        raise ConfigError(f"{analysis.memory_limit!r} is not a memory size such as '2GB'",
                          path=source, key="analysis.memory_limit")
    high, mid = analysis.tier_shares
    if not (0 < high < 1 and 0 <= mid < 1 and high + mid < 1):
        raise ConfigError("needs two shares (high, mid) in (0, 1) that sum below 1",
                          path=source, key="analysis.tier_shares")

    out_raw = raw.get("output") or {}
    ctx.known(out_raw, "output", {"processed_dir", "reports_dir", "pseudonymize_ids",
                                  "pseudonym_key_env"})
    project_root = _project_root(base_dir)
    output = OutputParams(
        processed_dir=_resolve(out_raw.get("processed_dir"), base_dir,
                               project_root / "data" / "processed"),
        reports_dir=_resolve(out_raw.get("reports_dir"), base_dir, project_root / "reports"),
        pseudonymize_ids=bool(out_raw.get("pseudonymize_ids", False)),
        pseudonym_key_env=str(out_raw.get("pseudonym_key_env") or "CSL_PSEUDONYM_KEY"),
    )
    if output.pseudonymize_ids and not os.environ.get(output.pseudonym_key_env):
        raise ConfigError(f"pseudonymize_ids is on but the environment variable "
                          f"{output.pseudonym_key_env} holding the key is not set",
                          path=source, key="output.pseudonymize_ids")
    return Config(
        name=str(raw.get("name") or (source.stem if source else "run")),
        mode=mode,
        tables=tables,
        output=output,
        source=None if source is None else Path(source).resolve(),
        seed=int(raw.get("seed", 42)),
        protected=tuple(str(c) for c in raw.get("protected") or ()),
        pii=tuple(str(c) for c in raw.get("pii") or ()),
        cleaning=cleaning,
        analysis=analysis,
        strategy=strategy,
        snapshot=snapshot,
    )


# --------------------------------------------------------------------------- helpers


class _Ctx:
    def __init__(self, source: Path | None):
        self.source = source

    def known(self, mapping: Any, where: str, valid: set[str]) -> None:
        if not isinstance(mapping, dict):
            raise ConfigError("expected a mapping", path=self.source, key=where or None)
        unknown = sorted(set(mapping) - valid)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(map(str, unknown))}; valid: "
                              f"{', '.join(sorted(valid))}", path=self.source,
                              key=where or None)

    def choice(self, value: Any, literal: Any, key: str) -> Any:
        valid = get_args(literal)
        if value not in valid:
            raise ConfigError(f"{value!r} is not one of: {', '.join(map(str, valid))}",
                              path=self.source, key=key)
        return value


def _parse_table(spec: Any, base_dir: Path, ctx: _Ctx, key: str) -> TableSpec:
    if isinstance(spec, str):
        spec = {"path": spec}
    valid = {f.name for f in dataclasses.fields(TableSpec)}
    ctx.known(spec, key, valid)
    if "path" not in spec:
        raise ConfigError("needs a 'path'", path=ctx.source, key=key)
    fmt = ctx.choice(spec.get("format", "auto"), FileFormat, f"{key}.format")
    columns = spec.get("columns") or {}
    ctx.known(columns, f"{key}.columns", set(sum(TABLE_CONTRACTS[key.split(".")[1]], ())))
    names = spec.get("names")
    return TableSpec(
        path=_resolve(spec["path"], base_dir, None),
        format=fmt,
        sep=str(spec.get("sep", ",")),
        header=bool(spec.get("header", True)),
        names=None if names is None else tuple(str(n) for n in names),
        encoding=str(spec.get("encoding", "utf-8")),
        date_format=spec.get("date_format"),
        decimal=str(spec.get("decimal", ".")),
        thousands=spec.get("thousands"),
        sheet=spec.get("sheet"),
        columns={str(k): str(v) for k, v in columns.items()},
    )


def _parse_dataclass(cls: type, raw: Any, ctx: _Ctx, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ctx.known(raw, key, set(fields))
    defaults = cls()
    values = {}
    for name, value in raw.items():
        default = getattr(defaults, name)
        try:
            values[name] = _coerce_like(value, default, name)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value {value!r}: {exc}", path=ctx.source,
                              key=f"{key}.{name}") from exc
        if name == "dedupe":
            ctx.choice(value, Dedupe, f"{key}.{name}")
        if name == "device":
            ctx.choice(value, Literal["cpu", "cuda"], f"{key}.{name}")
        if name == "tenure_unit":
            ctx.choice(value, Literal["days", "weeks", "months", "years"], f"{key}.{name}")
        if name == "revenue_period":
            ctx.choice(value, Literal["day", "week", "month", "quarter", "year"],
                       f"{key}.{name}")
    return cls(**values)


def _coerce_like(value: Any, default: Any, name: str) -> Any:
    if value is None:
        return None
    if isinstance(default, str) and isinstance(value, bool):
        return "yes" if value else "no"        # YAML reads a bare Yes/No as a boolean
    if name == "horizon_days":
        return "auto" if value == "auto" else int(value)
    if isinstance(default, dt.date) or name == "as_of":
        if isinstance(value, dt.date):
            return value
        return dt.date.fromisoformat(str(value))
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(float(v) for v in value)
    if isinstance(default, dict):
        return {str(k): float(v) for k, v in dict(value).items()}
    if name == "policy":
        if not isinstance(value, list) or not all(isinstance(r, dict) and "action" in r
                                                  for r in value):
            raise ValueError("the policy is a list of rows, each with an 'action'")
        return [dict(r) for r in value]
    return value


def _resolve(value: Any, base_dir: Path, default: Path | None) -> Path:
    if value is None:
        if default is None:
            raise ValueError("path required")
        return default
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def _project_root(base_dir: Path) -> Path:
    """The folder holding pyproject.toml above the config, else the config's folder."""
    for candidate in (base_dir, *base_dir.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return base_dir


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value
