import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from analysis import explain
from analysis import features as F
from analysis import models as M
from analysis.demo import DemoWorld, generate_demo
from analysis.errors import InsufficientDataError
from analysis.store import RunStore


# --------------------------------------------------------------------------- metrics


def test_churn_metrics_on_hand_data():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    perfect = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.1, 0.2, 0.1, 0.0])
    m = M.churn_metrics(y, perfect)
    assert m["roc_auc"] == 1.0 and m["pr_auc"] == 1.0
    assert m["capture_top20"] == pytest.approx(2 / 3) and m["lift_top20"] == pytest.approx(
        (2 / 2) / 0.3)
    assert m["brier"] == pytest.approx(np.mean((perfect - y) ** 2))
    rank_only = M.churn_metrics(y, -perfect, probabilities=False)
    assert rank_only["roc_auc"] == 0.0 and "brier" not in rank_only


def test_expected_calibration_error_is_zero_when_bins_match():
    y = np.array([1, 0] * 50)
    p = np.full(100, 0.5)
    assert M.churn_metrics(y, p)["ece"] == pytest.approx(0.0)
    assert M.churn_metrics(y, np.full(100, 0.9))["ece"] == pytest.approx(0.4)


def test_value_metrics_and_gini():
    actual = np.array([0.0, 0.0, 10.0, 50.0, 100.0])
    assert M.normalized_gini(actual, actual) == pytest.approx(1.0)
    assert M.normalized_gini(actual, -actual) < 0
    m = M.value_metrics(actual, np.array([1.0, 1.0, 12.0, 40.0, 90.0]))
    assert m["mae"] == pytest.approx((1 + 1 + 2 + 10 + 10) / 5)
    assert m["top_decile_capture"] == pytest.approx(100 / 160)
    assert m["total_actual"] == 160.0


def test_decile_table_capture_sums_to_one():
    rng = np.random.default_rng(0)
    actual = rng.exponential(10, 1000)
    table = M.decile_table(actual, actual + rng.normal(0, 1, 1000))
    assert table["n"].tolist() == [100] * 10
    assert table["cumulative_capture"].iloc[-1] == pytest.approx(1.0)
    assert table["mean_actual"].is_monotonic_decreasing


def test_calibration_choice_and_json_safe_application():
    rng = np.random.default_rng(1)
    margin = rng.normal(0, 2, 4000)
    true_p = 1 / (1 + np.exp(-(0.5 * margin - 0.3)))
    y = (rng.random(4000) < true_p).astype(int)
    cal = M.choose_calibration(margin, y)
    assert cal["method"] in {"isotonic", "platt"} and set(cal["cv_brier"]) == {"isotonic",
                                                                                "platt"}
    platt = M._fit_calibration("platt", margin, y)
    assert platt["slope"] == pytest.approx(0.5, abs=0.08)
    iso = M._fit_calibration("isotonic", margin, y)
    p = M.apply_calibration(iso, margin)
    assert np.all(np.diff(p[np.argsort(margin)]) >= -1e-12)  # monotone


def test_honest_cutoffs_never_overlap():
    ev, va, tr = M.honest_cutoffs(as_of=dt.date(2025, 1, 1), horizon_days=90, n_train=4,
                                  step_days=30, first_date=dt.date(2023, 1, 1))
    assert ev == dt.date(2024, 10, 3) and va == ev - dt.timedelta(days=90)
    assert all(c + dt.timedelta(days=90) <= va for c in tr) and len(tr) == 4
    _, _, short = M.honest_cutoffs(as_of=dt.date(2025, 1, 1), horizon_days=90, n_train=4,
                                   step_days=30, first_date=dt.date(2024, 3, 1))
    assert short == []


def test_accuracy_by_group_needs_enough_of_each_class():
    rng = np.random.default_rng(0)
    n = 300
    ev = pd.DataFrame({"frequency": np.r_[np.ones(100), np.full(200, 5)],
                       "churned": np.r_[np.r_[np.ones(5), np.zeros(95)], rng.random(200) < .4],
                       "churn_model": rng.random(n), "future_spend": rng.random(n),
                       "value_model": rng.random(n), "value_last_period": rng.random(n)})
    out = M.metrics_by_group(ev).set_index("group")
    assert np.isnan(out.loc["1 purchase day", "churn_auc"])     # 5 churners: noise
    assert 0 < out.loc["4+ purchase days", "churn_auc"] < 1


def test_skipped_models_leave_risk_unknown_and_say_why(tmp_path):
    customers = pd.DataFrame({"customer_id": ["a", "b"], "spend_365d": [365.0, -10.0]})
    RunStore(tmp_path).write_profile_table(customers)
    out = M.write_skipped_models(tmp_path, reason="the data is too short", horizon_days=90,
                                 as_of=dt.date(2026, 1, 1), history_days=180)
    # 365 spent over the 180 days of data -> 182.5 over 90 days; refunds floor at 0
    assert out["predicted_value"].tolist() == pytest.approx([182.5, 0.0])
    assert out["churn_probability"].isna().all()
    assert M.skipped_reason(tmp_path) == "the data is too short"
    assert RunStore(tmp_path).horizon_days() == 90
    # the scores are the models step's own table, read back joined to the profile
    back = RunStore(tmp_path).read_customers(["customer_id", "predicted_value"])
    assert back["predicted_value"].tolist() == pytest.approx([182.5, 0.0])
    with pytest.raises(InsufficientDataError, match="too short"):
        M.read_model_run(tmp_path)


def test_reason_codes_on_hand_built_contributions():
    """Top pushes in order, stopping at the first that does not push; the usual rhythm
    joins a recency reason; "down" reverses the sign; missing values are said so."""
    from analysis.explain import reason_codes

    feats = pd.DataFrame({"recency_days": [120.0, 10.0, 45.0],
                          "frequency": [3, 12, 1],
                          "complaints_90d": [1.0, 0.0, np.nan],
                          "gap_median_days": [30.0, 7.0, np.nan]})
    shap = pd.DataFrame({"recency_days": [0.9, -0.2, 0.5],
                         "frequency": [0.1, 0.4, -0.3],
                         "complaints_90d": [0.3, -0.1, 0.2],
                         "gap_median_days": [0.0, 0.0, 0.0], "bias": [-1.0, -1.0, -1.0]})
    up = reason_codes(shap, feats).tolist()
    assert up == ["no order for 120 days; usually orders every 30 days; "
                  "1 complaint(s) in the last 90 days; 3 purchase days so far",
                  "12 purchase days so far",
                  "no order for 45 days; complaints in last 90 days: not known"]
    down = reason_codes(shap, feats, direction="down", top=2).tolist()
    assert down == ["", "no order for 10 days; usually orders every 7 days; "
                        "0 complaint(s) in the last 90 days", "1 purchase days so far"]


def test_rfm_lookup_uses_training_cells():
    train = pd.DataFrame({"recency_days": [1, 2, 300, 400] * 5, "frequency": [9, 8, 1, 1] * 5,
                          "monetary_total": [900, 800, 10, 20] * 5,
                          "churned": [0, 0, 1, 1] * 5})
    score = pd.DataFrame({"recency_days": [1, 400, 1], "frequency": [10, 1, 1],
                          "monetary_total": [1000, 20, 5]})
    # the third customer's cell (recent, one purchase, tiny spend) was never seen: mean
    assert M.rfm_lookup(train, score, target="churned").tolist() == [0.0, 1.0, 0.5]


def test_model_feature_names_are_safe_unique_and_map_back():
    columns = ["Revenue [USD]", "Score<5", "a]b", "a)b", "a)b_2", "a[b", "plain", 7,
               "x<y", "xlty"]
    names = M.model_feature_names(columns)
    assert list(names) == columns
    assert len(set(names.values())) == len(columns)                         # unique
    assert not [n for n in names.values() if set(n) & set("[]<") or not isinstance(n, str)]
    assert {v: k for k, v in names.items()} == dict(zip(names.values(), columns, strict=True))
    assert names["Revenue [USD]"] == "Revenue (USD)" and names["Score<5"] == "Scorelt5"
    # safe names are kept; a replaced one that clashes gets the next free suffix
    assert [names[c] for c in ("a)b", "a)b_2", "a]b", "a[b", "x<y", "xlty", 7)] == [
        "a)b", "a)b_2", "a)b_3", "a(b", "xlty_2", "xlty", "7"]
    assert M.model_feature_names(columns) == names                          # deterministic


def test_models_take_any_column_name_and_answer_in_it(tmp_path):
    """Order-log mode: customer attributes keep the user's column names, which may hold
    characters XGBoost refuses; predictions, SHAP and the saved model work with them."""
    rng = np.random.default_rng(4)
    n = 600
    frame = pd.DataFrame({"customer_id": [f"c{i}" for i in range(n)],
                          "recency_days": rng.integers(0, 300, n).astype(float),
                          "Revenue [USD]": rng.gamma(2.0, 50.0, n),
                          "Plan<2024>": rng.choice(["basic", "pro"], n)})
    risk = frame["recency_days"] / 300 + (frame["Plan<2024>"] == "basic") * 0.3
    y = (rng.random(n) < risk.clip(0, 0.95)).astype(int)
    columns = M.feature_columns(frame)
    X = M.prepare_matrix(frame, columns, M.categories_of(frame, columns))
    model = M.ChurnModel(n_estimators=50).fit(X[:400], y[:400], X[400:], y[400:])
    value = M.ValueModel(n_estimators=50).fit(X[:400], frame["Revenue [USD]"][:400],
                                              X[400:], frame["Revenue [USD]"][400:])
    shap = model.contributions(X)
    assert list(shap.columns) == ["recency_days", "Revenue [USD]", "Plan<2024>", "bias"]
    assert np.allclose(shap.sum(axis=1), model._margin(X), atol=1e-3)
    assert shap["Plan<2024>"].abs().sum() > 0                       # the model used it
    written = model.save(tmp_path, "churn", {"calibration": model.calibration_})
    meta = json.loads(written["metadata"].read_text())
    assert meta["features"] == columns
    assert meta["model_feature_names"] == ["recency_days", "Revenue (USD)", "Planlt2024>"]
    back = M.ChurnModel(**meta["params"])
    back.booster_ = xgb.Booster()
    back.booster_.load_model(str(written["model"]))
    back.best_iteration_, back.calibration_ = meta["best_iteration"], meta["calibration"]
    back.features_, back.categories_ = meta["features"], meta["categories"]
    assert np.allclose(back.predict_proba(X), model.predict_proba(X))
    assert (value.predict(X) > 0).all()


# --------------------------------------------------------------------------- champion and challengers


def test_logistic_explains_itself_exactly_and_reads_back_from_json():
    """The logistic regression predicts from its own extracted parameters exactly as the
    scikit-learn fit does (blanks, unseen levels included); its SHAP values add up to the
    log-odds and average zero over the training rows; JSON round trip predicts the same."""
    import json

    rng = np.random.default_rng(2)
    n = 1500
    X = pd.DataFrame({"x": rng.normal(size=n).astype("float32"),
                      "spend": np.where(rng.random(n) < 0.2, np.nan,
                                        rng.exponential(50, n)).astype("float32"),
                      "plan": pd.Categorical(np.where(rng.random(n) < 0.1, None,
                                                      rng.choice(["a", "b", "c"], n)))})
    y = (rng.random(n) < 1 / (1 + np.exp(-(X["x"] + (X["plan"] == "a"))))).astype(int)
    model = M.LogisticChurn().fit(X, y)
    sklearn_p = model.pipeline_.predict_proba(M._objects(X))[:, 1]
    assert np.allclose(model.predict_proba(X), sklearn_p, atol=1e-6)
    shap = model.contributions(X)
    assert list(shap.columns) == ["x", "spend", "plan", "bias"]
    assert np.allclose(shap.sum(axis=1), model.log_odds(X), atol=1e-4)
    assert np.allclose(shap.drop(columns="bias").mean(), 0, atol=1e-4)
    back = M.LogisticChurn.from_dict(json.loads(json.dumps(model.to_dict())))
    unseen = X.head(3).assign(plan=pd.Categorical(["z", None, "b"]))
    assert np.array_equal(back.predict_proba(unseen), model.predict_proba(unseen))
    assert np.allclose(model.predict_proba(unseen),
                       model.pipeline_.predict_proba(M._objects(unseen))[:, 1], atol=1e-6)


def test_churn_choice_is_the_lowest_log_loss_with_brier_breaking_ties():
    y = np.array([1, 0, 1, 0])
    table = M.churn_selection(y, {"model": np.array([0.6, 0.4, 0.6, 0.4]),
                                  "logistic": np.array([0.9, 0.1, 0.9, 0.1]),
                                  "blend": np.array([0.75, 0.25, 0.75, 0.25])})
    assert table["log_loss"].tolist() == pytest.approx(
        [-np.log(0.6), -np.log(0.9), -np.log(0.75)])
    assert M.chosen_method(table) == "logistic" and table["chosen"].sum() == 1
    tie = pd.DataFrame({"method": ["model", "blend"], "log_loss": [0.3, 0.3],
                        "brier": [0.2, 0.1]})
    assert M.chosen_method(M._mark_choice(tie, "log_loss", "brier")) == "blend"


def test_value_choice_is_the_lowest_tweedie_deviance():
    actual = np.array([0.0, 4.0, -2.0])          # a net refund counts as zero spend
    table = M.value_selection(actual, {"model": np.array([1.0, 4.0, 1.0]),
                                       "last_period": np.array([0.0, 0.0, 0.0])})
    # Tweedie deviance, power 1.5: 2 (y^.5/-.25 + 2 y mu^-.5 + 2 mu^.5)
    dev = lambda y, mu: 2 * (-4 * np.sqrt(y) + 2 * y / np.sqrt(mu) + 2 * np.sqrt(mu))  # noqa: E731
    by = table.set_index("method")
    assert by.loc["model", "tweedie_deviance"] == pytest.approx(
        np.mean([dev(0, 1), dev(4, 4), dev(0, 1)]))
    # a forecast of zero counts as one cent: confidently wrong for the customer who buys
    assert by.loc["last_period", "tweedie_deviance"] == pytest.approx(
        np.mean([dev(0, 0.01), dev(4, 0.01), dev(0, 0.01)]))
    assert by.loc["last_period", "mae"] == pytest.approx((0 + 4 + 2) / 3)
    assert M.chosen_method(table) == "model"


def _planted_world(truth: str, n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Five standard-normal features and churn drawn from a planted log-odds: linear in
    the features, or an interaction no linear model can express (the sign of x0 * x1)."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 5)).astype("float32"),
                     columns=[f"x{i}" for i in range(5)])
    if truth == "linear":
        logit = 1.5 * X["x0"] - X["x1"] + 0.5 * X["x2"] - 0.5
    else:
        logit = 3.0 * np.sign(X["x0"] * X["x1"])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit.to_numpy()))).astype(int)
    return X, y


@pytest.mark.parametrize(("truth", "n", "expected"), [
    ("linear", 400, {"logistic", "blend"}),       # few rows, truth a logistic model
    ("interaction", 4000, {"model", "blend"}),    # what trees can learn and lines cannot
])
def test_churn_choice_follows_the_planted_truth(truth, n, expected):
    X, y = _planted_world(truth, n, seed=3)
    Xv, yv = _planted_world(truth, n, seed=4)
    churn, logistic, selection = M.fit_churn_candidates(X, y, Xv, yv, seed=5)
    chosen = M.chosen_method(selection)
    assert chosen in expected, selection
    assert chosen == selection.loc[selection["log_loss"].idxmin(), "method"]
    assert set(selection["method"]) == set(M.CHURN_CANDIDATES)
    # the choosing half is the half XGBoost never stopped or calibrated on, and the
    # recorded scores are the candidates' on it
    tune, choose = M.split_validation(yv, seed=5)
    assert not set(tune) & set(choose) and len(tune) + len(choose) == n
    p = M.candidate_probabilities(churn, logistic, Xv.iloc[choose])
    expected_ll = M.churn_selection(yv[choose], p).set_index("method")["log_loss"]
    assert selection.set_index("method")["log_loss"].to_dict() == pytest.approx(
        expected_ll.to_dict())
    assert np.allclose(p["blend"], (p["model"] + p["logistic"]) / 2)


def test_the_choice_is_said_in_plain_words():
    metrics = pd.DataFrame({"roc_auc": [0.846, 0.850, 0.853], "ece": [0.02, 0.03, 0.01]},
                           index=["model", "logistic", "blend"])
    text = M.describe_choice("blend", metrics, candidates=M.CHURN_CANDIDATES)
    assert text.startswith("Churn risk comes from a blend of the XGBoost model and a "
                           "logistic regression, which predicted churn best")
    assert "AUC of 0.853" in text and "0.846 for the XGBoost model and 0.850 for a " \
        "logistic regression." in text and "log loss" not in text
    with pytest.raises(ValueError, match="kind must be one of"):
        M.describe_choice("model", metrics, candidates=("model",), kind="spend")


def test_the_choice_names_the_population_it_was_tested_on():
    metrics = pd.DataFrame({"roc_auc": [0.78, 0.765, 0.77]}, index=["model", "logistic", "blend"])
    text = M.describe_choice("model", metrics, candidates=M.CHURN_CANDIDATES,
                             population="the 1,234 customers still active on 2024-01-01")
    assert "tested on the 1,234 customers still active on 2024-01-01, whom it never saw, " \
        "it separates churners from stayers with an AUC of 0.780" in text


def _planted_evaluation(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """600 active customers with a weak signal, 400 lapsed or lost ones who all churn and
    whom every score calls churners (as "days since last order" does)."""
    rng = np.random.default_rng(seed)
    y_active = (rng.random(600) < 0.3).astype(int)
    s_active = np.clip(0.3 + 0.2 * (y_active - 0.3) + rng.normal(0, 0.2, 600), 0.01, 0.9)
    stages = ["active"] * 200 + ["new"] * 200 + ["at risk"] * 200 + ["lapsed"] * 100 + \
        ["lost"] * 300
    evaluation = pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(1000)], "lifecycle_stage": stages,
        "churned": np.concatenate([y_active, np.ones(400, dtype=int)]),
        "churn_model": np.concatenate([s_active, np.full(400, 0.95)]),
        "churn_bgnbd": np.concatenate([s_active, np.full(400, 0.95)]),   # rank-only
    })
    return evaluation, y_active, s_active


def test_active_population_accuracy_leaves_out_the_easy_lost_customers():
    evaluation, y_active, s_active = _planted_evaluation()
    everyone = M.churn_metrics_table(evaluation, population="all").set_index("method")
    active = M.churn_metrics_table(evaluation, population="active").set_index("method")
    assert list(active.index) == ["model", "bgnbd"]          # only the methods present
    assert set(active["population"]) == {"active"} and set(everyone["population"]) == {"all"}
    assert everyone.loc["model", "n"] == 1000 and active.loc["model", "n"] == 600
    assert active.loc["model", "roc_auc"] < everyone.loc["model", "roc_auc"] - 0.1
    # computed over the active rows only, exactly as churn_metrics would on them
    alone = M.churn_metrics(y_active, s_active)
    assert active.loc["model", "roc_auc"] == pytest.approx(alone["roc_auc"])
    assert active.loc["model", "churn_rate"] == pytest.approx(y_active.mean())
    assert active.loc["model", "brier"] == pytest.approx(alone["brier"])
    assert "brier" not in active.columns or np.isnan(active.loc["bgnbd", "brier"])
    # runs written before stages were recorded: everyone is the population
    old = M.churn_metrics_table(evaluation.drop(columns="lifecycle_stage"), population="active")
    assert old.set_index("method").loc["model", "n"] == 1000
    # a population of churners only has no AUC, but keeps its size
    lost = M.churn_metrics_table(evaluation.iloc[600:], population="all")
    assert lost.loc[0, "n"] == 400 and "roc_auc" not in lost
    with pytest.raises(ValueError, match="population must be one of"):
        M.churn_metrics_table(evaluation, population="lost")


def test_the_churn_choice_can_be_made_on_the_active_customers_only():
    X, y = _planted_world("linear", 400, seed=3)
    Xv, yv = _planted_world("linear", 400, seed=4)
    active = np.arange(400) % 3 != 0
    _, _, selection = M.fit_churn_candidates(X, y, Xv, yv, seed=5, population=active)
    _, choose = M.split_validation(yv, seed=5)
    assert set(selection["n"]) == {int(active[choose].sum())}


# --------------------------------------------------------------------------- on the demo world


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    world = DemoWorld(n_customers=4_000, seed=5)
    frames = generate_demo(world)
    con = F.connect({name: frames[name] for name in ("transactions", "customers",
                                                     "interactions")})
    run = M.fit_and_evaluate(con, as_of=world.as_of, horizon_days=90, n_cutoffs=14,
                             step_days=30, exclude=("gender", "age_band"), seed=1)
    return world, frames, con, run


def test_a_large_validation_snapshot_is_sampled_and_the_evaluation_beyond_its_cap(demo_run):
    world, _, con, run = demo_run
    capped = M.fit_and_evaluate(con, as_of=world.as_of, horizon_days=90, n_cutoffs=14,
                                step_days=30, exclude=("gender", "age_band"), seed=1,
                                max_valid_rows=1_000)
    # about 1,000 of the customers known at the evaluation cutoff (fewer are known at
    # the earlier validation cutoff), drawn before the features were built
    assert 700 <= capped.sizes["valid"] <= 1_050 < run.sizes["valid"]
    # below its cap (two million by default), the evaluation is every customer
    assert capped.sizes["eval"] == run.sizes["eval"] and run.sizes["eval_share"] == 1.0
    pd.testing.assert_series_equal(capped.evaluation["customer_id"],
                                   run.evaluation["customer_id"])
    assert M.evaluation_sample(run) == "" and "random" not in M.describe_training(run)
    # beyond it, a sample drawn by id, which every sentence counting its customers states
    known = con.execute(f"SELECT COUNT(DISTINCT customer_id) FROM lines WHERE order_date < "
                        f"DATE '{run.cutoffs['eval']}'").fetchone()[0]
    sampled = M.fit_and_evaluate(con, as_of=world.as_of, horizon_days=90, n_cutoffs=14,
                                 step_days=30, exclude=("gender", "age_band"), seed=1,
                                 max_eval_rows=known // 2)
    share = sampled.sizes["eval_share"]
    assert share == pytest.approx(0.5, abs=0.01)
    assert 0.4 * run.sizes["eval"] <= sampled.sizes["eval"] == len(sampled.evaluation) \
        <= 0.6 * run.sizes["eval"]
    assert set(sampled.evaluation["customer_id"]) < set(run.evaluation["customer_id"])
    assert f"a random {share:.1%} of the customers, drawn by id" in M.describe_training(
        sampled)
    assert sampled.churn_metrics.set_index("method").loc["model", "n"] == len(
        sampled.evaluation)


def oracle_churn_probability(frame: pd.DataFrame, *, cutoff: dt.date, horizon: int,
                             world: DemoWorld) -> np.ndarray:
    """The best possible churn score with the ground truth's individual rates and the
    observable history (the recency): P(churn) = 1 - P(alive | recency) x P(buys | alive).

    With purchase rate lambda (scaled by the horizon's seasonality) and dropout hazard mu,
    a customer silent for d days is alive with probability
    e^{-(l+m)d} / (e^{-(l+m)d} + m/(l+m) (1 - e^{-(l+m)d})) (the Pareto/NBD posterior with
    known rates), and, alive, buys nothing in H days with probability
    m/(l+m) (1 - e^{-(l+m)H}) + e^{-(l+m)H}.
    """
    from analysis.demo import _season

    t0 = (cutoff - world.start).days
    season = _season(np.arange(t0, t0 + horizon), world).mean()
    lam_past = frame["purchase_rate_per_day"].to_numpy()
    lam = lam_past * season
    mu = frame["dropout_hazard_per_day"].to_numpy()
    d = frame["recency_days"].to_numpy()
    silent = np.exp(-(lam_past + mu) * d)
    alive = silent / (silent + mu / (lam_past + mu) * (1 - silent))
    total = lam + mu
    p_none = mu / total * (1 - np.exp(-total * horizon)) + np.exp(-total * horizon)
    return 1 - alive * (1 - p_none)


@pytest.mark.e2e
def test_churn_model_is_close_to_the_oracle_and_beats_baselines(demo_run):
    world, frames, _, run = demo_run
    m = run.churn_metrics.set_index("method")
    assert m.loc["model", "roc_auc"] >= m.loc["logistic", "roc_auc"] - 0.005
    assert m.loc["model", "roc_auc"] > m.loc["rfm", "roc_auc"]
    assert m.loc["model", "brier"] < m.loc["rfm", "brier"]
    cutoff = dt.date.fromisoformat(run.cutoffs["eval"])
    recency = F.build_features(F.connect({"transactions": frames["transactions"]}),
                               cutoff=cutoff)[["customer_id", "recency_days"]]
    ev = run.evaluation.merge(frames["truth_customers"], on="customer_id").merge(
        recency, on="customer_id")
    oracle = oracle_churn_probability(ev, cutoff=cutoff, horizon=90, world=world)
    oracle_auc = M.churn_metrics(ev["churned"], oracle)["roc_auc"]
    assert m.loc["model", "roc_auc"] >= oracle_auc - 0.03, (m.loc["model", "roc_auc"],
                                                             oracle_auc)


@pytest.mark.e2e
def test_value_model_beats_last_period(demo_run):
    _, _, _, run = demo_run
    v = run.value_metrics.set_index("method")
    assert v.loc["model", "mae"] < v.loc["last_period", "mae"]
    assert v.loc["model", "gini"] > v.loc["last_period", "gini"]
    assert 0.7 < v.loc["model", "total_predicted"] / v.loc["model", "total_actual"] < 1.3


@pytest.mark.e2e
def test_scores_reasons_and_saved_models(demo_run, tmp_path):
    _, _, con, run = demo_run
    scores = run.scores
    assert scores["churn_probability"].between(0, 1).all()
    assert (scores["predicted_value"] >= 0).all()
    assert scores["churn_reasons"].str.len().gt(5).mean() > 0.95
    assert not scores["churn_reasons"].str.contains("_1|nan|None").any()
    written = M.write_model_run(run, tmp_path, fingerprint="abc", versions={"x": "1"})
    back = M.read_model_run(tmp_path)
    # the saved models (the logistic regression as JSON too) score as the run did
    assert np.allclose(M.candidate_probabilities(back.churn, back.logistic, run.score_features)[
        back.churn_chosen], scores["churn_probability"])
    assert np.allclose(back.value.predict(run.score_features),
                       run.value.predict(run.score_features))
    # SHAP values computed in chunks are the same, and add up to the model's margin
    X = run.score_features.iloc[:500]
    whole = run.churn.contributions(X, chunk_rows=500)
    assert np.array_equal(run.churn.contributions(X, chunk_rows=37).to_numpy(),
                          whole.to_numpy())
    assert np.allclose(whole.sum(axis=1), run.churn._margin(X), atol=1e-3)
    meta = written["churn_metadata"].read_text()
    assert '"data_fingerprint": "abc"' in meta and '"calibration"' in meta
    # the global drivers are those of the SHAP values; a reader can ask for some tables only
    pd.testing.assert_frame_equal(back.churn_drivers,
                                  explain.global_drivers(run.churn_shap, run.score_features))
    some = M.read_model_run(tmp_path, tables=("churn_metrics", "churn_drivers"))
    assert some.churn_shap is None and some.score_features is None and some.scores is None
    pd.testing.assert_frame_equal(some.churn_metrics, back.churn_metrics)
    assert some.churn_chosen == run.churn_chosen and some.value_chosen == run.value_chosen
    pd.testing.assert_frame_equal(some.churn_selection, run.churn_selection,
                                  check_dtype=False)
    with pytest.raises(ValueError, match="unknown model tables"):
        M.read_model_run(tmp_path, tables=("shap",))
    # the model matrix is float32 (XGBoost's own precision): the same model, half the memory
    assert {str(t) for t in run.score_features.dtypes} <= {"float32", "category"}
    assert not [p for p in tmp_path.rglob("*") if p.suffix in {".pkl", ".pickle", ".joblib"}]


@pytest.mark.e2e
def test_the_chosen_methods_score_and_models_json_records_every_method(demo_run, tmp_path):
    import json

    _, _, con, run = demo_run
    M.write_model_run(run, tmp_path, fingerprint="abc", versions={})
    summary = json.loads((tmp_path / "models.json").read_text())
    for kind, candidates, score in (("churn", M.CHURN_CANDIDATES, "log_loss"),
                                    ("value", M.VALUE_CANDIDATES, "tweedie_deviance")):
        entry = summary[kind]
        assert entry["chosen"] in candidates and set(entry["selection"]) == set(candidates)
        # the choice is the lowest recorded validation score ...
        assert entry["chosen"] == min(entry["selection"],
                                      key=lambda m, e=entry, s=score: e["selection"][m][s])
        # ... made on the validation customers XGBoost did not stop or calibrate on (for
        # churn, those of them active at the validation cutoff: the decision's population)
        chose_on = run.sizes["valid_choose_active" if kind == "churn" else "valid_choose"]
        assert {v["n"] for v in entry["selection"].values()} == {chose_on}
        # every method is judged out of time, the chosen one and the blend included
        assert entry[entry["chosen"]]["roc_auc" if kind == "churn" else "mae"] >= 0
    assert 0 < run.sizes["valid_choose_active"] < run.sizes["valid_choose"]
    assert all("roc_auc" in summary["churn"][m] for m in (*M.CHURN_CANDIDATES, "rfm",
                                                          "bgnbd", "model_uncalibrated"))
    assert summary["churn"]["model"]["roc_auc"] == run.churn_metrics.set_index(
        "method").loc["model", "roc_auc"]                        # readers of churn.model
    # the customers' scores are the chosen methods'
    X = run.score_features
    assert np.allclose(run.scores["churn_probability"], M.candidate_probabilities(
        run.churn, run.logistic, X)[run.churn_chosen])
    assert np.allclose(run.churn_shap, M.candidate_contributions(
        run.churn_chosen, run.churn, run.logistic, X))
    if run.value_chosen == "model":
        assert np.allclose(run.scores["predicted_value"], run.value.predict(X))
    assert np.allclose(run.evaluation["churn_blend"], (run.evaluation["churn_model"]
                                                       + run.evaluation["churn_logistic"]) / 2)
    table = M.comparison_table(run.churn_metrics, run.churn_selection, run.churn_chosen)
    assert table.loc[table["chosen"], "method"].tolist() == [run.churn_chosen]
    assert table.set_index("method")["validation_log_loss"].notna().to_dict() == {
        "model": True, "model_uncalibrated": False, "logistic": True, "blend": True,
        "rfm": False, "bgnbd": False}


@pytest.mark.e2e
def test_predictions_ignore_rows_after_the_cutoff(demo_run):
    _, frames, _, run = demo_run
    cutoff = dt.date.fromisoformat(run.cutoffs["eval"])
    tx = frames["transactions"]
    changed = tx.assign(amount=np.where(tx["order_date"] >= pd.Timestamp(cutoff),
                                        tx["amount"] * 5, tx["amount"]))
    before, after = (
        F.build_features(F.connect({"transactions": t, "customers": frames["customers"],
                                    "interactions": frames["interactions"]}),
                         cutoff=cutoff, horizon_days=90, labels=False,
                         exclude_attributes=("gender", "age_band"))
        for t in (tx, changed))
    cats = run.churn.categories_
    x1 = M.prepare_matrix(before, run.churn.features_, cats)
    x2 = M.prepare_matrix(after, run.churn.features_, cats)
    assert np.array_equal(run.churn.predict_proba(x1), run.churn.predict_proba(x2))
    assert np.array_equal(run.value.predict(x1), run.value.predict(x2))


@pytest.mark.e2e
def test_cdnow_holdout_model_beats_bgnbd(tmp_path):
    from analysis.bench import bench_cdnow

    from .conftest import require_cdnow

    report = bench_cdnow(data_dir=require_cdnow(), out=tmp_path)
    h = report["holdout"]
    assert h["actual"]["transactions"] == 19_684 and h["actual"]["share_no_purchase"] == \
        pytest.approx(0.701, abs=0.001)
    bg, model = h["bgnbd_gg"], h["model"]
    # the literature's figures for BG/NBD + Gamma-Gamma
    assert bg["transactions_mae"] == pytest.approx(0.819, abs=0.002)
    assert bg["spend_gini"] == pytest.approx(0.672, abs=0.002)
    assert bg["churn_auc"] == pytest.approx(0.763, abs=0.002)
    assert model["spend_mae"] < bg["spend_mae"]
    assert model["spend_gini"] > bg["spend_gini"]
    assert model["spend_top_decile_capture"] > bg["spend_top_decile_capture"]
    assert model["churn_auc"] > bg["churn_auc"]
    assert (tmp_path / "cdnow.md").is_file()


# --------------------------------------------------------------------------- short histories


def one_year_log(small_demo, days=365):
    """The last ``days`` of the demo world's orders, with only the three required columns."""
    tx = pd.read_parquet(small_demo / "transactions.parquet")
    last = tx["order_date"].max()
    keep = tx["order_date"] > last - pd.Timedelta(days=days)
    return tx.loc[keep, ["customer_id", "order_date", "amount"]].reset_index(drop=True)


def test_a_year_of_history_gives_every_active_customer_a_churn_risk(small_demo):
    from analysis.segments import assign_lifecycle

    con = F.connect({"transactions": one_year_log(small_demo)})
    as_of = F.resolve_as_of(con)
    horizon = F.resolve_horizon_days(con, horizon_days="auto", cutoff=as_of, step_days=30)
    assert 30 <= horizon <= F.suggest_horizon_days(con, cutoff=as_of)
    run = M.fit_and_evaluate(con, as_of=as_of, horizon_days=horizon, n_cutoffs=14,
                             step_days=30)
    assert run.sizes["train_cutoffs"] >= 3
    life = assign_lifecycle(F.build_features(con, cutoff=as_of))
    active = life.loc[life["lifecycle_stage"].isin(["new", "active", "at risk"]), "customer_id"]
    scored = run.scores.set_index("customer_id").reindex(active)
    assert len(active) > 100
    assert scored["churn_probability"].between(0, 1).all()
    assert scored["predicted_value"].notna().all()


def test_too_short_for_labels_bgnbd_scores_everyone_and_is_checked(tmp_path, small_demo):
    lines = one_year_log(small_demo, days=150)
    con = F.connect({"transactions": lines})
    as_of = F.resolve_as_of(con)
    features = F.build_features(con, cutoff=as_of)
    features[["customer_id", "spend_365d"]].to_parquet(tmp_path / "customers.parquet")
    with pytest.raises(InsufficientDataError):
        M.fit_and_evaluate(con, as_of=as_of, horizon_days=60, n_cutoffs=14, step_days=30)
    out = M.write_skipped_models(tmp_path, reason="too short", horizon_days=60, as_of=as_of,
                                 history_days=150, con=con)
    assert out["churn_probability"].between(0, 1).all() and len(out) == len(features)
    # more purchases expected means less chance of none: the two agree in order
    assert np.corrcoef(out["churn_probability"], out["expected_purchases"])[0, 1] < -0.5
    fallback = M.label_free_fallback(tmp_path)
    assert fallback["method"] == M.LABEL_FREE_METHOD
    check = fallback["check"]
    assert check["cutoff"] == (as_of - dt.timedelta(days=60)).isoformat()
    # the demo world's customers follow a purchase rhythm: BG/NBD ranks churners well
    assert check["churn_auc"] > 0.7 and 0 < check["brier"] < 0.25
    recent = out.merge(features[["customer_id", "recency_days"]], on="customer_id")
    assert recent.loc[recent["recency_days"] <= 14, "churn_probability"].mean() < \
        recent.loc[recent["recency_days"] >= 100, "churn_probability"].mean()
