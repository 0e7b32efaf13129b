"""Probabilistic customer-base models: BG/NBD for purchases, Gamma-Gamma for spend.

Closed-form likelihoods in vectorised numpy/scipy, fitted by maximum likelihood (the
fit takes well under a second on CDNOW). They reproduce the published CDNOW parameters
(Fader, Hardie & Lee 2005; Fader & Hardie 2013); ``tests/test_clv.py`` holds them to it.

Inputs are the classic per-customer summary (:func:`rfm_summary`): ``frequency`` =
repeat purchase days, ``recency`` = time from first to last purchase day, ``T`` = time
from first purchase to the end of the calibration period, all in one time unit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special

from analysis.config import DAYS_PER_MONTH
from analysis.engine import as_engine

__all__ = ["BGNBD_FIT_CUSTOMERS", "RFM_SUMMARY_COLUMNS", "BetaGeoModel", "GammaGammaModel",
           "expected_alive_time", "fit_bgnbd", "fit_gamma_gamma", "fit_positions",
           "rfm_summaries", "rfm_summary", "summary_of_rows"]


def rfm_summary(transactions, *, calibration_end: dt.date,
                time_unit_days: float = 7.0, start: dt.date | None = None) -> pd.DataFrame:
    """Per-customer frequency / recency / T / mean repeat value before ``calibration_end``.

    Purchases on the same day are merged into one transaction. Only completed lines with
    a non-negative amount count as purchases (when there is a ``status``).

    Parameters
    ----------
    transactions : contract-shaped lines (``customer_id``, ``order_date``, ``amount``),
        or a connection from :func:`analysis.features.connect` (or an engine,
        :func:`analysis.features.connect_run`), whose ``lines`` are then summarised in SQL (large histories never enter Python as lines).
    calibration_end : the first day after the calibration period. ``T`` and ``recency``
        are measured to the calibration period's last day (``calibration_end`` minus
        one day), the convention of the literature (a customer whose first purchase is
        on 1997-01-01 has T = 272 days = 38.86 weeks when calibration ends 1997-09-30).
    time_unit_days : length of the time unit (7 = weeks, as in the literature).
    start : ignore lines before this day.

    Returns
    -------
    DataFrame
        Indexed by ``customer_id``: ``frequency`` (repeat purchase days), ``recency``,
        ``T``, ``monetary_value`` (mean value of the repeat transactions; 0 when none),
        ``first_purchase``.
    """
    if not isinstance(transactions, pd.DataFrame):
        return _rfm_summary_sql(transactions, calibration_end=calibration_end,
                                time_unit_days=time_unit_days, start=start)
    tx = transactions
    if "status" in tx:
        tx = tx[tx["status"].eq("completed")]
    tx = tx[(tx["amount"] >= 0) & (tx["order_date"] < pd.Timestamp(calibration_end))]
    if start is not None:
        tx = tx[tx["order_date"] >= pd.Timestamp(start)]
    days = tx.groupby(["customer_id", "order_date"], as_index=False)["amount"].sum()
    days = days.sort_values(["customer_id", "order_date"])
    g = days.groupby("customer_id")
    first = g["order_date"].min()
    last = g["order_date"].max()
    n = g.size()
    total = g["amount"].sum()
    first_value = g["amount"].first()
    end = pd.Timestamp(calibration_end) - pd.Timedelta(days=1)
    out = pd.DataFrame({
        "frequency": n - 1,
        "recency": (last - first).dt.days / time_unit_days,
        "T": (end - first).dt.days / time_unit_days,
        "monetary_value": ((total - first_value) / (n - 1).where(n > 1)).fillna(0.0),
        "first_purchase": first,
    })
    return out


# Purchase days: completed lines with a non-negative amount, one row per customer and
# day, with the day's amount as an exact decimal sum (a float sum's last bits depend on
# DuckDB's thread order, and the BG/NBD fit would differ between two runs of the same
# data).
PURCHASE_DAYS = """
SELECT customer_id, order_date, SUM(CAST(amount AS DECIMAL(38, 6))) AS amount
FROM lines
WHERE status = 'completed' AND amount >= 0 AND order_date < DATE '{end}' {since}
GROUP BY customer_id, order_date
"""


def rfm_summaries(con, *, calibration_ends: list[dt.date], time_unit_days: float = 7.0,
                  extra_days: int = 0, in_engine: bool = False):
    """:func:`rfm_summary` at each of ``calibration_ends`` (oldest first), from one pass
    over a connection's ``lines``: the purchase days are gathered once, into the
    temporary table ``purchase_days_rfm`` (up to ``extra_days`` after the last date, for
    a caller who also reads what followed), and each summary is computed from it.

    Yields ``(calibration_end, summary)``, one at a time (a summary of a large base is
    large); the table is dropped when the iteration ends. With ``in_engine`` the summary
    stays in the engine (DuckDB or Spark), as the temporary table ``rfm_summary_at``
    (:data:`RFM_SUMMARY`'s columns, in days; replaced at each date), for a caller who
    reads only some customers.
    """
    ends = sorted(set(calibration_ends))
    if not ends:
        return
    last = (ends[-1] + dt.timedelta(days=extra_days)).isoformat()
    eng = as_engine(con)
    eng.table("purchase_days_rfm", PURCHASE_DAYS.format(end=last, since=""))
    try:
        for end in ends:
            days = f"SELECT * FROM purchase_days_rfm WHERE order_date < DATE '{end.isoformat()}'"
            if in_engine:
                eng.table("rfm_summary_at",
                          RFM_SUMMARY.format(days=days, last_day=_last_day(end)))
                yield end, "rfm_summary_at"
            else:
                yield end, _rfm_summary_sql(
                    eng, calibration_end=end, time_unit_days=time_unit_days, start=None,
                    days=days)
    finally:
        eng.drop("purchase_days_rfm", "rfm_summary_at")


#: Per customer, from the purchase days ``days`` selects (as :data:`PURCHASE_DAYS`)
#: before a calibration end whose last day is ``last_day``: repeat purchases, the days
#: from the first purchase to the last and to the last day, spend, and the first
#: purchase's day and value; ordered by customer.
RFM_SUMMARY = """
WITH days AS ({days})
SELECT customer_id, COUNT(*) - 1 AS frequency,
       date_diff('day', MIN(order_date), MAX(order_date)) AS recency_days,
       date_diff('day', MIN(order_date), DATE '{last_day}') AS t_days,
       CAST(SUM(amount) AS DOUBLE) AS total,
       CAST(arg_min(amount, order_date) AS DOUBLE) AS first_value,
       MIN(order_date) AS first_purchase
FROM days GROUP BY customer_id ORDER BY customer_id"""

#: :data:`RFM_SUMMARY`'s columns.
RFM_SUMMARY_COLUMNS = ("customer_id", "frequency", "recency_days", "t_days", "total",
                       "first_value", "first_purchase")


def _last_day(calibration_end: dt.date) -> str:
    return (pd.Timestamp(calibration_end) - pd.Timedelta(days=1)).date().isoformat()


def _rfm_summary_sql(con, *, calibration_end: dt.date, time_unit_days: float,
                     start: dt.date | None, days: str | None = None) -> pd.DataFrame:
    """:func:`rfm_summary` over a connection's ``lines`` view (or the purchase days
    ``days`` selects, as :data:`PURCHASE_DAYS`), computed by its engine."""
    since = f"AND order_date >= DATE '{start.isoformat()}'" if start else ""
    days = days or PURCHASE_DAYS.format(end=calibration_end.isoformat(), since=since)
    out = as_engine(con).frame(RFM_SUMMARY.format(days=days,
                                                  last_day=_last_day(calibration_end)))
    return summary_of_rows(out, time_unit_days=time_unit_days)


def summary_of_rows(out: pd.DataFrame, *, time_unit_days: float = 7.0) -> pd.DataFrame:
    """:func:`rfm_summary` of :data:`RFM_SUMMARY`'s rows (counted in days), in their
    order: the same customers summarised by the same arithmetic wherever the rows were
    computed (the driver, or a partition on Spark's executors)."""
    n = out["frequency"].astype("int64")
    return pd.DataFrame({
        "frequency": n.to_numpy(),
        "recency": out["recency_days"].to_numpy(dtype=float) / time_unit_days,
        "T": out["t_days"].to_numpy(dtype=float) / time_unit_days,
        "monetary_value": ((out["total"] - out["first_value"]) / n.where(n > 0)).fillna(0.0)
        .to_numpy(),
        "first_purchase": pd.to_datetime(out["first_purchase"]).astype("datetime64[ns]")
        .to_numpy(),
    }, index=pd.Index(out["customer_id"].astype("str"), name="customer_id"))


@dataclass
class BetaGeoModel:
    """BG/NBD (Fader, Hardie & Lee 2005), fitted by maximum likelihood.

    Parameters
    ----------
    penalizer : L2 penalty on the log-parameters (0 = plain MLE).

    Attributes
    ----------
    params_ : dict with ``r``, ``alpha``, ``a``, ``b``.
    loglik_ : log-likelihood at the optimum (sum over customers).
    """

    penalizer: float = 0.0

    #: Where the log-parameters are searched: r, a and b in [1e-4, 1e4], alpha in
    #: [1e-4, 1e7] (weeks). Customers who buy at a steady rhythm and rarely drop out
    #: push r and alpha (or a and b) towards infinity together, where the model becomes
    #: a plain Poisson rate (or one dropout chance for all); beyond these bounds the
    #: likelihood's terms cancel in floating point (a 1,200-customer log went to
    #: r = 6e19 with a log-likelihood of exactly 0) and the expected purchases'
    #: hypergeometric function returns NaN, while inside them the predictions have
    #: settled to their limit.
    LOG_BOUNDS = ((np.log(1e-4), np.log(1e4)), (np.log(1e-4), np.log(1e7)),
                  (np.log(1e-4), np.log(1e4)), (np.log(1e-4), np.log(1e4)))

    def fit(self, frequency, recency, T) -> BetaGeoModel:
        x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        if len(x) < 10 or (x > 0).sum() < 2:
            raise ValueError("BG/NBD needs at least 10 customers, 2 with repeat purchases")

        counts = np.unique(x, return_inverse=True)     # a few hundred repeat counts

        def nll(log_params):
            ll = self._loglik(np.exp(log_params), x, tx, t, counts).sum()
            return -ll + self.penalizer * np.sum(log_params ** 2)

        best = None
        for start in ([0.0, 0.0, 0.0, 0.0], [-1.0, 1.5, -0.2, 1.0]):
            res = optimize.minimize(nll, np.array(start), method="L-BFGS-B",
                                    bounds=self.LOG_BOUNDS)
            if best is None or res.fun < best.fun:
                best = res
        r, alpha, a, b = np.exp(best.x)
        self.params_ = {"r": float(r), "alpha": float(alpha), "a": float(a), "b": float(b)}
        self.loglik_ = float(self._loglik(np.exp(best.x), x, tx, t, counts).sum())
        return self

    @staticmethod
    def _loglik(params, x, tx, t, counts=None):
        """Each customer's log-likelihood (the paper's equation 6). ``counts``:
        ``np.unique(x, return_inverse=True)``; the terms that depend on the repeat count
        alone (the special functions) are then computed once per distinct count."""
        r, alpha, a, b = params
        ux, at = counts if counts is not None else (x, slice(None))
        with np.errstate(divide="ignore", invalid="ignore"):
            per_count = (special.gammaln(r + ux) - special.gammaln(r) + r * np.log(alpha)
                         + special.betaln(a, b + ux) - special.betaln(a, b))
            repeat = np.log(a) - np.log(np.maximum(b + ux - 1, 1e-300))
        a3 = -(r + x) * np.log(alpha + t)
        with np.errstate(divide="ignore", invalid="ignore"):
            a4 = np.where(x > 0, repeat[at] - (r + x) * np.log(alpha + tx), -np.inf)
        return per_count[at] + np.logaddexp(a3, a4)

    def _check(self):
        if not hasattr(self, "params_"):
            raise RuntimeError("fit the model first")
        return self.params_["r"], self.params_["alpha"], self.params_["a"], self.params_["b"]

    def probability_alive(self, frequency, recency, T) -> np.ndarray:
        """P(still active at T | history). Always 1 for customers with no repeat purchase:
        never use it alone as a churn score."""
        r, alpha, a, b = self._check()
        x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.where(x > 0, a / np.maximum(b + x - 1, 1e-300)
                             * ((alpha + t) / (alpha + tx)) ** (r + x), 0.0)
        return 1.0 / (1.0 + ratio)

    def expected_purchases(self, horizon, frequency, recency, T) -> np.ndarray:
        """Expected number of purchases in (T, T + horizon] given the history."""
        r, alpha, a, b = self._check()
        x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        h = np.asarray(horizon, dtype=float)
        z = h / (alpha + t + h)
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        term = (1 - ((alpha + t) / (alpha + t + h)) ** (r + x) * hyp)
        # valid for a < 1 too: both factors change sign (a == 1 is a removable point)
        a_safe = a if abs(a - 1) > 1e-9 else 1 + 1e-9
        return (a + b + x - 1) / (a_safe - 1) * term * self.probability_alive(x, tx, t)

    def probability_no_purchase(self, horizon, frequency, recency, T) -> np.ndarray:
        """P(no purchase in (T, T + horizon] | history): the BG/NBD churn probability.

        A customer makes no purchase in the window if already inactive at T, or if
        active and the Poisson process produces no purchase in it (dropout happens only
        right after a purchase). Given activity at T, the purchase rate is
        Gamma(r + x, alpha + T), so
        ``P = 1 - P(alive) * (1 - ((alpha + T) / (alpha + T + h)) ** (r + x))``.
        """
        r, alpha, a, b = self._check()
        x, t = np.asarray(frequency, dtype=float), np.asarray(T, dtype=float)
        h = np.asarray(horizon, dtype=float)
        quiet_if_alive = ((alpha + t) / (alpha + t + h)) ** (r + x)
        return 1.0 - self.probability_alive(frequency, recency, T) * (1.0 - quiet_if_alive)

    def rates_if_alive(self, frequency, recency, T) -> tuple[np.ndarray, np.ndarray]:
        """Purchase rate and dropout hazard of a customer who is still active, per time
        unit: ``(E[lambda | alive], E[lambda p | alive])``.

        Given activity at T, the purchase rate is Gamma(r + x, alpha + T) and the dropout
        probability Beta(a, b + x), independently. A customer drops out after each
        purchase with probability p, so the remaining lifetime is a geometric number of
        Exp(lambda) gaps: exactly Exp(lambda p). Its hazard is taken at the posterior
        means, E[lambda] E[p] = (r + x) / (alpha + T) x a / (a + b + x).
        """
        r, alpha, a, b = self._check()
        x, t = np.asarray(frequency, dtype=float), np.asarray(T, dtype=float)
        rate = (r + x) / (alpha + t)
        return rate, rate * a / (a + b + x)

    def median_time_to_next_purchase(self, frequency, recency, T) -> np.ndarray:
        """The time after T by which the customer has more likely than not bought again
        (same unit as T); NaN when P(alive) is 1/2 or less (never more likely than not).

        From :meth:`probability_no_purchase`: P(a purchase in (T, T + h]) = P(alive) x
        (1 - ((alpha + T) / (alpha + T + h)) ** (r + x)) = 1/2 solves to
        h = (alpha + T) * (k ** -1 - 1) with k = (1 - 1 / (2 P(alive))) ** (1 / (r + x)).
        """
        r, alpha, a, b = self._check()
        x, t = np.asarray(frequency, dtype=float), np.asarray(T, dtype=float)
        alive = self.probability_alive(frequency, recency, T)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(alive > 0.5, (1 - 0.5 / alive) ** (1 / (r + x)), np.nan)
            return np.where(k > 0, (alpha + t) * (1 / k - 1), np.nan)

    def expected_purchases_new(self, horizon) -> np.ndarray:
        """Expected purchases in (0, horizon] of a newly acquired customer."""
        r, alpha, a, b = self._check()
        h = np.asarray(horizon, dtype=float)
        z = h / (alpha + h)
        a_safe = a if abs(a - 1) > 1e-9 else 1 + 1e-9
        return (a + b - 1) / (a_safe - 1) * (1 - (alpha / (alpha + h)) ** r
                                         * special.hyp2f1(r, b, a + b - 1, z))


#: The most customers the population parameters of BG/NBD and Gamma-Gamma are fitted on
#: (:func:`fit_bgnbd`, :func:`fit_gamma_gamma`); every customer gets their own posterior.
BGNBD_FIT_CUSTOMERS = 50_000


def _fit_rows(summary: pd.DataFrame, max_customers: int | None) -> pd.DataFrame:
    """At most ``max_customers`` rows of ``summary``, evenly spaced (the same data gives
    the same rows)."""
    if max_customers is None or len(summary) <= max_customers:
        return summary
    return summary.iloc[fit_positions(len(summary), max_customers)]


def fit_positions(n: int, max_customers: int = BGNBD_FIT_CUSTOMERS) -> np.ndarray:
    """The positions :func:`_fit_rows` keeps of ``n`` rows."""
    if n <= max_customers:
        return np.arange(n)
    return np.linspace(0, n - 1, max_customers).round().astype(int)


def fit_bgnbd(summary: pd.DataFrame, *, max_customers: int | None = None) -> BetaGeoModel:
    """BG/NBD fitted on an :func:`rfm_summary`, on at most ``max_customers`` of its rows
    (evenly spaced, so the same data gives the same fit): four population parameters need
    tens of thousands of customers, not millions, and the fit's time grows with the rows.

    Raises
    ------
    ValueError
        When BG/NBD cannot be fitted (too few repeat customers).
    """
    rows = _fit_rows(summary, max_customers)
    return BetaGeoModel().fit(rows["frequency"], rows["recency"], rows["T"])


def fit_gamma_gamma(summary: pd.DataFrame, *, max_customers: int | None = None
                    ) -> GammaGammaModel:
    """Gamma-Gamma fitted on an :func:`rfm_summary`, on at most ``max_customers`` of its
    rows (the same rows as :func:`fit_bgnbd`'s).

    Raises
    ------
    ValueError
        When it cannot be fitted (too few repeat customers).
    """
    rows = _fit_rows(summary, max_customers)
    return GammaGammaModel().fit(rows["frequency"], rows["monetary_value"])


def expected_alive_time(hazard, window) -> np.ndarray:
    """Expected time alive within ``window`` of a customer alive now whose remaining
    lifetime is exponential with ``hazard`` (same time unit): ``(1 - exp(-h w)) / h``,
    and ``w`` when the hazard is 0."""
    h = np.asarray(hazard, dtype=float)
    w = np.asarray(window, dtype=float)
    hw = h * w
    with np.errstate(divide="ignore", invalid="ignore"):
        # -expm1(-hw) / hw is 1 - hw / 2 + ... : exact near 0, where 1 - exp loses digits
        share = np.where(hw > 1e-12, -np.expm1(-hw) / np.where(hw > 1e-12, hw, 1.0), 1.0)
    return w * share


@dataclass
class GammaGammaModel:
    """Gamma-Gamma model of spend per transaction (Fader & Hardie 2013).

    Fitted on customers with at least one repeat transaction, from their number of
    repeat transactions ``frequency`` and the mean value of those ``monetary_value``.

    Attributes
    ----------
    params_ : dict with ``p``, ``q``, ``gamma``.
    """

    penalizer: float = 0.0

    def fit(self, frequency, monetary_value) -> GammaGammaModel:
        x = np.asarray(frequency, dtype=float)
        m = np.asarray(monetary_value, dtype=float)
        keep = (x > 0) & (m > 0)
        x, m = x[keep], m[keep]
        if len(x) < 10:
            raise ValueError("Gamma-Gamma needs at least 10 customers with repeat purchases")

        def nll(log_params):
            p, q, g = np.exp(log_params)
            ll = (special.gammaln(p * x + q) - special.gammaln(p * x) - special.gammaln(q)
                  + q * np.log(g) + (p * x - 1) * np.log(m) + p * x * np.log(x)
                  - (p * x + q) * np.log(g + m * x))
            return -ll.sum() + self.penalizer * np.sum(log_params ** 2)

        res = optimize.minimize(nll, np.log([1.0, 1.0, np.mean(m)]), method="L-BFGS-B")
        p, q, g = np.exp(res.x)
        self.params_ = {"p": float(p), "q": float(q), "gamma": float(g)}
        self.loglik_ = float(-res.fun)
        return self

    def expected_spend(self, frequency, monetary_value) -> np.ndarray:
        """Expected value of a future transaction; the population mean when frequency is 0."""
        if not hasattr(self, "params_"):
            raise RuntimeError("fit the model first")
        p, q, g = self.params_["p"], self.params_["q"], self.params_["gamma"]
        x = np.asarray(frequency, dtype=float)
        m = np.asarray(monetary_value, dtype=float)
        population = p * g / (q - 1) if q > 1 else np.nan
        individual = (g + m * x) * p / (p * x + q - 1)
        return np.where(x > 0, individual, population)

    def customer_lifetime_value(self, bgnbd: BetaGeoModel, frequency, recency, T,
                                monetary_value, *, months: int = 12,
                                monthly_discount_rate: float = 0.01,
                                time_unit_days: float = 7.0) -> np.ndarray:
        """Discounted expected spend over the next ``months`` months."""
        spend = self.expected_spend(frequency, monetary_value)
        per_month = DAYS_PER_MONTH / time_unit_days
        total = np.zeros(len(np.atleast_1d(frequency)))
        previous = np.zeros_like(total)
        for month in range(1, months + 1):
            cumulative = bgnbd.expected_purchases(month * per_month, frequency, recency, T)
            total += (cumulative - previous) * spend / (1 + monthly_discount_rate) ** month
            previous = cumulative
        return total
