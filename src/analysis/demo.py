"""A synthetic but realistic CRM world, deterministic for a seed, with its ground truth.

The process (all times in days, vectorised over customers):

- **Acquisition** — signups spread over four years with growth and a year-end peak;
  the first order is placed on the signup day.
- **Purchasing** — each customer orders as a Poisson process with their own rate
  ``lambda ~ Gamma`` (heterogeneous), modulated by seasonality (peak in December).
- **Dropout** — each customer is alive for an exponential lifetime with their own hazard
  ``mu ~ Gamma`` scaled by latent satisfaction (Pareto/NBD-like, close to BG/NBD). A
  complaint multiplies the hazard (more if left unresolved); low satisfaction raises it.
- **Spend** — order values follow the Gamma-Gamma model: each customer has a mean order
  value drawn from a Gamma; order lines split the order across categories the customer
  likes, with category margins, a per-customer return propensity and cancellations.
- **Channels** — each order goes through a channel (the customer's preferred one most of
  the time); cost to serve differs by channel (``world.json``).
- **Protected attributes** — gender and age band are drawn independently of everything.
- **Retention campaigns** — monthly randomised campaigns over the last year of the data
  (``n_campaigns`` dates, ``campaign_every_days`` apart, the first
  ``campaign_days_before_end`` days before the end). A persistent control group
  (``control_share`` of all customers, drawn once, independently of everything) is never
  contacted. Every other customer is given, at random and once, one campaign month (a
  customer gets at most one retention offer a year); they are contacted that month if
  they signed up at least 30 days before it. Each campaign's table rows are its contacted
  customers (``treated``) and the control group's eligible members (not treated): both
  are random samples of the customers eligible that month, so each campaign is a
  randomised experiment; the control rows of one customer recur month after month. For
  a customer still active, the contact lowers the remaining dropout hazard by a
  heterogeneous share ``treatment_effect`` (larger for store and phone customers and for
  unhappy ones). ``n_campaigns=1`` gives the single-campaign world.

The ground truth (true rates, dropout dates, treatment effects, and every order in the
365 days after the data ends) goes to ``ground_truth/``, which the pipeline never reads.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

__all__ = ["DemoWorld", "generate_demo", "write_demo"]

CATEGORIES = ("electronics", "home", "fashion", "beauty", "grocery", "sports", "toys", "books")
CATEGORY_MARGIN = (0.12, 0.30, 0.45, 0.50, 0.18, 0.35, 0.40, 0.25)
CHANNELS = ("online", "store", "phone", "marketplace")
CHANNEL_SHARE = (0.55, 0.25, 0.08, 0.12)
CHANNEL_COST_PER_ORDER = {"online": 1.5, "store": 6.0, "phone": 9.0, "marketplace": 3.0}
REGIONS = ("North", "South", "East", "West", "Central")
GENDERS = ("female", "male", "undisclosed")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")


@dataclass(frozen=True)
class DemoWorld:
    """Parameters of the generated world (written to ``ground_truth/world.json``)."""

    n_customers: int = 20_000
    seed: int = 42
    start: dt.date = dt.date(2022, 1, 1)
    end: dt.date = dt.date(2025, 12, 31)          # last day of data
    future_days: int = 365                          # simulated after the end, ground truth only
    rate_shape: float = 0.9                         # lambda ~ Gamma(shape, mean 1/mean_gap_days)
    mean_gap_days: float = 40.0
    hazard_shape: float = 1.5                       # mu ~ Gamma(shape, mean 1/mean_lifetime_days)
    mean_lifetime_days: float = 640.0
    satisfaction_hazard: float = 0.45               # hazard x exp(-0.45 * satisfaction z-score)
    complaint_every_days: float = 1100.0            # mean time to a complaint (average customer)
    complaint_hazard_resolved: float = 1.8
    complaint_hazard_unresolved: float = 4.0
    gg_p: float = 6.0                               # order value ~ Gamma(p, rate nu)
    gg_q: float = 4.0                               # nu ~ Gamma(q, rate gamma)
    gg_gamma: float = 30.0
    seasonality: float = 0.35
    cancel_share: float = 0.03
    n_campaigns: int = 12                           # monthly randomised retention campaigns
    campaign_every_days: int = 30
    campaign_days_before_end: int = 360             # the first campaign
    control_share: float = 0.2                      # persistent control group, never contacted

    @property
    def as_of(self) -> dt.date:
        return self.end + dt.timedelta(days=1)

    @property
    def campaign_date(self) -> dt.date:
        """The first campaign's date."""
        return self.end - dt.timedelta(days=self.campaign_days_before_end)

    @property
    def campaign_dates(self) -> list[dt.date]:
        """Every campaign's date, oldest first."""
        return [self.campaign_date + dt.timedelta(days=k * self.campaign_every_days)
                for k in range(self.n_campaigns)]


def generate_demo(world: DemoWorld) -> dict[str, pd.DataFrame]:
    """Simulate the world.

    Returns
    -------
    dict of DataFrame
        ``transactions`` (order_id, customer_id, order_date, category, channel, status,
        quantity, amount, margin), ``customers`` (customer_id, signup_date, region,
        gender, age_band), ``interactions`` (customer_id, date, type, score, resolved),
        ``campaign`` (customer_id, campaign_date, treated), and the ground truth:
        ``truth_customers`` (one row per customer) and ``truth_future_orders``.
    """
    rng = np.random.default_rng(np.random.PCG64(world.seed))
    n = world.n_customers
    t_end = float((world.as_of - world.start).days)            # data is t < t_end
    t_stop = t_end + world.future_days                          # simulate to here

    # --- customers: acquisition with growth and a year-end peak
    signup = _seasonal_times(rng, n, 0.0, t_end - 30.0, world, growth=0.6)
    satisfaction = rng.standard_normal(n)
    lam = rng.gamma(world.rate_shape, 1.0 / (world.mean_gap_days * world.rate_shape), n)
    mu = rng.gamma(world.hazard_shape, 1.0 / (world.mean_lifetime_days * world.hazard_shape), n)
    mu = mu * np.exp(-world.satisfaction_hazard * satisfaction)
    nu = rng.gamma(world.gg_q, 1.0 / world.gg_gamma, n)         # rate of order value
    cat_pref = rng.dirichlet(np.full(len(CATEGORIES), 0.6), n)
    pref_channel = rng.choice(len(CHANNELS), n, p=CHANNEL_SHARE)
    return_prop = rng.beta(1.0, 19.0, n)

    # --- dropout, raised by a first complaint (memoryless, so exact)
    kappa = np.exp(-0.5 * satisfaction) / world.complaint_every_days
    first_complaint = signup + rng.exponential(1.0 / kappa)
    resolved_first = rng.random(n) < 0.7
    base_life = rng.exponential(1.0 / mu)
    multiplier = np.where(resolved_first, world.complaint_hazard_resolved,
                          world.complaint_hazard_unresolved)
    after = rng.exponential(1.0 / (mu * multiplier))
    complained = first_complaint < signup + base_life
    death = np.where(complained, first_complaint + after, signup + base_life)

    # --- randomized retention campaigns with a heterogeneous effect: a contact made while
    # the customer is still active lowers their remaining dropout hazard by `effect`
    # (for an exponential lifetime: the remaining life is stretched by 1 / (1 - effect)).
    # A persistent control group is never contacted; everyone else is given one campaign
    # month at random and contacted then if signed up 30 days before it.
    t_campaigns = np.array([float((d - world.start).days) for d in world.campaign_dates])
    control = rng.random(n) < world.control_share
    month = rng.integers(0, world.n_campaigns, n)
    t_contact = t_campaigns[month]
    treated = ~control & (signup < t_contact - 30)
    effect = np.clip(0.20 + 0.30 * np.isin(pref_channel, [1, 2]) + 0.20 * (satisfaction < 0)
                     + rng.normal(0, 0.05, n), 0.0, 0.85)
    saved = treated & (death >= t_contact)
    death = np.where(saved, t_contact + (death - t_contact) / (1 - effect), death)

    # --- orders: first on signup day, then a seasonal Poisson process until dropout
    life_end = np.minimum(death, t_stop)
    cust, t = _poisson_events(rng, signup, life_end, lam, world)
    cust = np.concatenate([np.arange(n), cust])
    t = np.concatenate([signup, t])
    order = np.lexsort((t, cust))
    cust, t = cust[order], t[order]
    day = np.floor(t).astype(np.int64)
    n_orders = len(cust)
    order_value = rng.gamma(world.gg_p, 1.0 / nu[cust])
    channel = np.where(rng.random(n_orders) < 0.75, pref_channel[cust],
                       rng.choice(len(CHANNELS), n_orders, p=CHANNEL_SHARE))
    cancelled = rng.random(n_orders) < world.cancel_share

    # --- order lines: 1-4 per order, categories from the customer's preferences
    n_lines = np.minimum(1 + rng.poisson(0.6, n_orders), 4)
    line_order = np.repeat(np.arange(n_orders), n_lines)
    line_cust = cust[line_order]
    category = _draw_categories(rng, cat_pref, line_cust)
    weight = rng.exponential(1.0, len(line_order))
    weight = weight / np.bincount(line_order, weight)[line_order]
    amount = np.maximum(np.round(order_value[line_order] * weight, 2), 0.99)
    margin_rate = np.asarray(CATEGORY_MARGIN)[category] + rng.normal(0, 0.04, len(amount))
    margin = np.round(amount * margin_rate, 2)
    quantity = 1 + rng.poisson(0.4, len(amount))
    returned = rng.random(len(amount)) < return_prop[line_cust]
    status = np.where(cancelled[line_order], 1, np.where(returned, 2, 0))

    ids = np.array([f"C{i:07d}" for i in range(1, n + 1)], dtype=object)
    dates = _to_dates(world.start, day[line_order])
    lines = pd.DataFrame({
        "order_id": pd.Series([f"O{i:09d}" for i in range(1, n_orders + 1)],
                              dtype=object).to_numpy()[line_order],
        "customer_id": ids[line_cust],
        "order_date": dates,
        "category": np.asarray(CATEGORIES, dtype=object)[category],
        "channel": np.asarray(CHANNELS, dtype=object)[channel[line_order]],
        "status": np.asarray(["completed", "cancelled", "returned"], dtype=object)[status],
        "quantity": quantity,
        "amount": amount,
        "margin": margin,
    })
    in_data = day[line_order] < t_end
    transactions = lines[in_data].reset_index(drop=True)
    future = lines[~in_data].reset_index(drop=True)

    # --- interactions: complaints (first + later ones) and satisfaction surveys
    seen_end = np.minimum(death, t_end)
    c_mask = complained & (first_complaint < t_end)
    more_c, more_t = _poisson_events(rng, np.where(c_mask, first_complaint, seen_end),
                                     seen_end, np.where(c_mask, kappa, 0.0), world,
                                     seasonal=False)
    s_cust, s_t = _poisson_events(rng, signup, seen_end, np.full(n, 1 / 300), world,
                                  seasonal=False)
    score = np.clip(np.round(3.6 + 0.9 * satisfaction[s_cust] + rng.normal(0, 0.7, len(s_t))),
                    1, 5)
    c_cust = np.concatenate([np.flatnonzero(c_mask), more_c])
    c_t = np.concatenate([first_complaint[c_mask], more_t])
    c_resolved = np.concatenate([resolved_first[c_mask], rng.random(len(more_c)) < 0.7])
    interactions = pd.DataFrame({
        "customer_id": np.concatenate([ids[c_cust], ids[s_cust]]),
        "date": _to_dates(world.start, np.floor(np.concatenate([c_t, s_t])).astype(np.int64)),
        "type": np.concatenate([np.full(len(c_cust), "complaint", dtype=object),
                                np.full(len(s_cust), "survey", dtype=object)]),
        "score": np.concatenate([np.full(len(c_cust), np.nan), score]),
        "resolved": pd.array(np.concatenate([c_resolved, np.zeros(len(s_cust), bool)]),
                             dtype="boolean"),
    })
    interactions.loc[interactions["type"] == "survey", "resolved"] = pd.NA
    interactions = interactions.sort_values(["date", "customer_id"], kind="stable")
    interactions = interactions.reset_index(drop=True)

    customers = pd.DataFrame({
        "customer_id": ids,
        "signup_date": _to_dates(world.start, np.floor(signup).astype(np.int64)),
        "region": np.asarray(REGIONS, dtype=object)[rng.choice(len(REGIONS), n,
                                                               p=(.22, .2, .2, .2, .18))],
        "gender": np.asarray(GENDERS, dtype=object)[rng.choice(3, n, p=(.49, .47, .04))],
        "age_band": np.asarray(AGE_BANDS, dtype=object)[rng.choice(6, n, p=(.1, .22, .22, .19,
                                                                           .15, .12))],
    })
    rows = []
    for k, (t_k, date) in enumerate(zip(t_campaigns, world.campaign_dates, strict=True)):
        contacted = treated & (month == k)
        held_out = control & (signup < t_k - 30)
        rows.append(pd.DataFrame({"customer_id": ids[contacted | held_out],
                                  "campaign_date": pd.Timestamp(date),
                                  "treated": contacted[contacted | held_out]}))
    campaign = pd.concat(rows, ignore_index=True)
    as_of = float((world.as_of - world.start).days)
    truth = pd.DataFrame({
        "customer_id": ids,
        "purchase_rate_per_day": lam,
        "dropout_hazard_per_day": mu,
        # the hazard at the end of the data: raised by a complaint made before it,
        # lowered by the past campaign for those it reached while active
        "dropout_hazard_now_per_day": mu * np.where(complained & (first_complaint < as_of),
                                                    multiplier, 1.0)
        * np.where(saved, 1 - effect, 1.0),
        "mean_order_value": world.gg_p / nu,
        "satisfaction_z": satisfaction,
        # beyond a century the date is irrelevant (and datetime64[ns] ends in 2262)
        "dropout_date": _to_dates(world.start, np.floor(np.minimum(death, t_stop + 36_500))
                                  .astype(np.int64)),
        "alive_at_as_of": death >= as_of,
        "control_group": control,
        "treated": treated,
        "contact_date": pd.Series(_to_dates(world.start, t_contact.astype(np.int64))).where(
            treated),
        "treatment_effect": effect,          # the hazard share a contact takes off
        "saved_by_campaign": saved,          # contacted while still active
        "preferred_channel": np.asarray(CHANNELS, dtype=object)[pref_channel],
    })
    return {"transactions": transactions, "customers": customers,
            "interactions": interactions, "campaign": campaign,
            "truth_customers": truth, "truth_future_orders": future}


def write_demo(out_dir: str | Path, *, n_customers: int = 20_000, seed: int = 42,
               fmt: Literal["parquet", "csv"] = "parquet") -> dict[str, Path]:
    """Generate the demo world and write it under ``out_dir``.

    Inputs go to ``out_dir/<table>.<fmt>``; the ground truth to ``out_dir/ground_truth/``
    (always Parquet, plus ``world.json``).

    Returns
    -------
    dict of Path
        Paths written, by table name.
    """
    world = DemoWorld(n_customers=n_customers, seed=seed)
    frames = generate_demo(world)
    out_dir = Path(out_dir)
    (out_dir / "ground_truth").mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in frames.items():
        if name.startswith("truth_"):
            path = out_dir / "ground_truth" / f"{name.removeprefix('truth_')}.parquet"
            frame.to_parquet(path, index=False)
        elif fmt == "csv":
            path = out_dir / f"{name}.csv"
            frame.to_csv(path, index=False, date_format="%Y-%m-%d")
        else:
            path = out_dir / f"{name}.parquet"
            frame.to_parquet(path, index=False)
        written[name] = path
    meta = {k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in asdict(world).items()}
    meta.update(as_of=world.as_of.isoformat(), campaign_date=world.campaign_date.isoformat(),
                campaign_dates=[d.isoformat() for d in world.campaign_dates],
                categories=dict(zip(CATEGORIES, CATEGORY_MARGIN, strict=True)),
                channel_cost_per_order=CHANNEL_COST_PER_ORDER,
                rows={k: len(v) for k, v in frames.items()})
    (out_dir / "ground_truth" / "world.json").write_text(json.dumps(meta, indent=2))
    written["world"] = out_dir / "ground_truth" / "world.json"
    return written


# --------------------------------------------------------------------------- helpers


def _season(t: np.ndarray, world: DemoWorld) -> np.ndarray:
    """Relative purchase intensity on day t (1 on average, peak mid-December)."""
    doy = (np.asarray(t) + world.start.timetuple().tm_yday - 1) % 365.25
    return 1.0 + world.seasonality * np.cos(2 * np.pi * (doy - 350) / 365.25)


def _poisson_events(rng: np.random.Generator, start: np.ndarray, stop: np.ndarray,
                    rate: np.ndarray, world: DemoWorld, *, seasonal: bool = True):
    """Event times of independent Poisson processes on [start_i, stop_i), by thinning."""
    span = np.maximum(stop - start, 0.0)
    peak = 1.0 + world.seasonality if seasonal else 1.0
    counts = rng.poisson(rate * peak * span)
    cust = np.repeat(np.arange(len(start)), counts)
    t = start[cust] + rng.random(len(cust)) * span[cust]
    if seasonal:
        keep = rng.random(len(t)) * peak < _season(t, world)
        cust, t = cust[keep], t[keep]
    return cust, t


def _seasonal_times(rng: np.random.Generator, n: int, t0: float, t1: float,
                    world: DemoWorld, *, growth: float) -> np.ndarray:
    """n signup times on [t0, t1) with linear growth and seasonality (rejection sampling)."""
    out = np.empty(0)
    peak = (1 + growth) * (1 + world.seasonality)
    while len(out) < n:
        t = t0 + rng.random(2 * n) * (t1 - t0)
        density = (1 + growth * (t - t0) / (t1 - t0)) * _season(t, world)
        out = np.concatenate([out, t[rng.random(2 * n) * peak < density]])
    return out[:n]


def _draw_categories(rng: np.random.Generator, pref: np.ndarray, cust: np.ndarray) -> np.ndarray:
    """One category per line from each line's customer's preference vector."""
    k = pref.shape[1]
    cum = np.cumsum(pref, axis=1)
    cum[:, -1] = 1.0
    flat = (cum + np.arange(len(pref))[:, None]).ravel()
    u = rng.random(len(cust))
    pos = np.searchsorted(flat, cust + u, side="right")
    return np.minimum(pos - cust * k, k - 1)


def _to_dates(start: dt.date, days: np.ndarray) -> pd.Series:
    base = np.datetime64(start, "D")
    return pd.Series((base + days.astype("timedelta64[D]")).astype("datetime64[ns]"))


# --------------------------------------------------------------------------- snapshot mode

#: Columns of the snapshot demo, in the layout of the public telecom churn exports.
SNAPSHOT_SERVICES = ("OnlineSecurity", "OnlineBackup", "DeviceProtection", "TechSupport",
                     "StreamingTV", "StreamingMovies")


def generate_snapshot_demo(n_customers: int = 7_000, seed: int = 42
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A subscription business as one table per customer, with a churn flag.

    Churn is drawn from a true probability that is non-linear in tenure (most leave in
    the first months), higher on month-to-month contracts and fibre (much more so
    without tech support: an interaction), with electronic checks, paperless billing
    and, on month-to-month contracts only, with higher charges. Gender and the senior
    flag are drawn independently and have no effect. ``TotalCharges`` is blank (a
    space) for customers in their first month, as in the public exports.

    Returns
    -------
    customers : the export (``customerID`` .. ``Churn`` Yes/No).
    truth : ``customerID`` and ``churn_probability`` (the true probability).
    """
    rng = np.random.default_rng(np.random.PCG64(seed))
    n = n_customers
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    ids = [f"{d:04d}-{''.join(w)}" for d, w in zip(
        rng.choice(10_000, n, replace=False), rng.choice(letters, (n, 5)), strict=True)]
    tenure = np.where(rng.random(n) < 0.3, rng.integers(0, 7, n),
                      rng.integers(0, 73, n))
    contract_p = np.column_stack([np.clip(0.85 - tenure / 90, 0.15, 1), 0.25 + 0 * tenure,
                                  np.clip(tenure / 80, 0.02, 1)])
    contract_p /= contract_p.sum(axis=1, keepdims=True)
    u = rng.random(n)[:, None] > np.cumsum(contract_p, axis=1)
    contract = np.array(["Month-to-month", "One year", "Two year"])[u.sum(axis=1)]
    internet = rng.choice(["DSL", "Fiber optic", "No"], n, p=[0.34, 0.44, 0.22])
    phone = rng.random(n) < 0.9
    services = {s: np.where(internet == "No", "No internet service",
                            np.where(rng.random(n) < 0.4, "Yes", "No"))
                for s in SNAPSHOT_SERVICES}
    payment = rng.choice(["Electronic check", "Mailed check", "Bank transfer (automatic)",
                          "Credit card (automatic)"], n, p=[0.34, 0.23, 0.22, 0.21])
    paperless = rng.random(n) < 0.59
    n_services = sum((v == "Yes").astype(int) for v in services.values())
    monthly = np.round(18.0 + 5.0 * phone + np.where(internet == "DSL", 25.0, 0.0)
                       + np.where(internet == "Fiber optic", 50.0, 0.0) + 5.5 * n_services
                       + rng.normal(0, 2.5, n), 2).clip(18.25)
    total = np.round(monthly * tenure * rng.normal(1.0, 0.03, n).clip(0.9, 1.1), 2)
    mtm, fiber = contract == "Month-to-month", internet == "Fiber optic"
    no_support = services["TechSupport"] == "No"
    logit = (-1.2 - 2.6 * (1 - np.exp(-tenure / 9.0)) + 1.3 * mtm
             - 1.1 * (contract == "Two year") + 0.5 * fiber + 0.9 * (fiber & no_support)
             + 0.45 * (payment == "Electronic check") + 0.25 * paperless
             + 0.03 * mtm * (monthly - 65.0) - 0.35 * (services["OnlineSecurity"] == "Yes"))
    p = 1.0 / (1.0 + np.exp(-logit))
    churn = rng.random(n) < p
    yes_no = np.array(["No", "Yes"])
    frame = pd.DataFrame({
        "customerID": ids,
        "gender": rng.choice(["Female", "Male"], n),
        "SeniorCitizen": (rng.random(n) < 0.16).astype(int),
        "Partner": yes_no[(rng.random(n) < 0.48).astype(int)],
        "Dependents": yes_no[(rng.random(n) < 0.3).astype(int)],
        "tenure": tenure,
        "PhoneService": yes_no[phone.astype(int)],
        "MultipleLines": np.where(~phone, "No phone service",
                                  yes_no[(rng.random(n) < 0.42).astype(int)]),
        "InternetService": internet,
        **services,
        "Contract": contract,
        "PaperlessBilling": yes_no[paperless.astype(int)],
        "PaymentMethod": payment,
        "MonthlyCharges": monthly,
        "TotalCharges": np.where(tenure == 0, " ", np.char.mod("%.2f", total)),
        "Churn": yes_no[churn.astype(int)],
    })
    return frame, pd.DataFrame({"customerID": ids, "churn_probability": p})


def write_snapshot_demo(out_dir: str | Path, *, n_customers: int = 7_000, seed: int = 42
                        ) -> dict[str, Path]:
    """Write the snapshot demo as ``OUT/customers.csv`` (the export) and its ground truth
    (``OUT/ground_truth/snapshot_truth.parquet``)."""
    out_dir = Path(out_dir)
    (out_dir / "ground_truth").mkdir(parents=True, exist_ok=True)
    frame, truth = generate_snapshot_demo(n_customers, seed)
    written = {"customers": out_dir / "customers.csv",
               "truth": out_dir / "ground_truth" / "snapshot_truth.parquet"}
    frame.to_csv(written["customers"], index=False)
    truth.to_parquet(written["truth"], index=False)
    return written
