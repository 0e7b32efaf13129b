"""Snapshot (subscription) mode: typing, label parsing, the cross-validated churn model
against the ground-truth oracle, value, survival, and a full run on a messy telecom-style
export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis import snapshot as SN
from analysis.config import DAYS_PER_MONTH, SnapshotParams, load_config
from analysis.data import load_dataset
from analysis.demo import generate_snapshot_demo, write_snapshot_demo
from analysis.errors import DataContractError

from .conftest import write_config


def test_feature_types_of_a_messy_export():
    n = 200
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "customer_id": [f"id{i}" for i in range(n)],
        "churn": rng.random(n) < 0.3,
        "charges": np.where(np.arange(n) % 20 == 0, " ", rng.random(n).round(2).astype(str)),
        "plan": rng.choice(["basic", "pro", "max"], n),
        "note": [f"called on day {i}, said {i * 7 % 13}" for i in range(n)],
        "account_ref": [f"R{i:05d}" for i in range(n)],
        "country": "DE",
        "gender": rng.choice(["f", "m"], n),
        "age": rng.integers(18, 80, n),
        "RowNumber": np.arange(1, n + 1),                       # a row counter ...
        "account_no": rng.permutation(np.arange(70_001, 70_001 + n + 40))[:n].astype(str),
        "score": rng.permutation(n) * 3,                # ... all different, not a count
    })
    types = SN.feature_types(frame, exclude=("Gender",)).set_index("column")
    # a running number (a row number; a sequential account number, as text, with gaps)
    # is an id, not a feature, whether the file stores it as numbers or as text
    assert types.loc["RowNumber", "kind"] == types.loc["account_no", "kind"] == "excluded"
    assert "running number" in types.loc["RowNumber", "reason"]
    assert "running number" in types.loc["account_no", "reason"]
    assert types.loc["score", "kind"] == "numeric"       # distinct, but spread 3x wider
    assert types.loc["charges", "kind"] == "numeric" and types.loc["charges", "n_blank"] == 10
    assert types.loc["plan", "kind"] == "categorical"
    assert types.loc["age", "kind"] == "numeric"
    assert types.loc["account_ref", "kind"] == "excluded"
    assert "id-like" in types.loc["account_ref", "reason"]
    assert types.loc["country", "reason"] == "a single value"
    assert types.loc["gender", "kind"] == "excluded"                  # protected
    assert types.loc["churn", "kind"] == types.loc["customer_id", "kind"] == "excluded"
    X = SN.snapshot_matrix(frame, types.reset_index())
    assert list(X.columns) == ["charges", "plan", "age", "score"]
    assert X["charges"].isna().sum() == 10
    assert isinstance(X["plan"].dtype, pd.CategoricalDtype)


def _load(tmp_path, text, **snapshot):
    (tmp_path / "c.csv").write_text(text)
    cfg = load_config(write_config(tmp_path, {"customers": {
        "path": "c.csv", "columns": {"customer_id": "ID", "churn": "Left"}}},
        mode="snapshot", snapshot=snapshot))
    return load_dataset(cfg).tables["customers"]


def test_an_export_without_an_id_column_names_customers_by_their_row(tmp_path):
    """A snapshot export with no id column (many published churn files) names each
    customer by their row in the file, as the quarantine counts rows; an order log
    without customer ids still stops: its lines must be tied to their customer."""
    (tmp_path / "c.csv").write_text("Left,plan\nYes,a\n,b\nNo,a\n")
    cfg = load_config(write_config(tmp_path, {"customers": {
        "path": "c.csv", "columns": {"churn": "Left"}}}, mode="snapshot"))
    table = load_dataset(cfg).tables["customers"]
    assert table.data["customer_id"].tolist() == ["1", "3"]
    assert table.quarantine["source_row"].tolist() == [2]          # the blank label
    assert any("named by its row in the file" in note for note in table.notes)
    (tmp_path / "tx.csv").write_text("order_date,amount\n2024-01-01,5\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    with pytest.raises(DataContractError) as err:
        load_dataset(cfg)
    assert err.value.rule == "required_column" and err.value.column == "customer_id"


def test_churn_label_in_any_case_with_blanks_quarantined(tmp_path):
    table = _load(tmp_path, "ID,Left,plan\n1,Yes,a\n2, no ,b\n3,YES,a\n4,,b\n5,No,a\n",
                  churn_positive="yes")
    assert table.data["churn"].tolist() == [True, False, True, False]
    assert table.quarantine["rule"].tolist() == ["missing_churn"]


def test_churn_label_with_named_values_and_numbers(tmp_path):
    assert _load(tmp_path, "ID,Left\n1,Churned\n2,Stayed\n3,churned\n",
                 churn_positive="Churned").data["churn"].tolist() == [True, False, True]
    assert _load(tmp_path, "ID,Left\n1,1\n2,0\n3,0\n",
                 churn_positive=1).data["churn"].tolist() == [True, False, False]


def test_churn_label_problems_stop_with_the_values_found(tmp_path):
    with pytest.raises(DataContractError, match="two values") as err:
        _load(tmp_path, "ID,Left\n1,yes\n2,no\n3,maybe\n")
    assert err.value.rule == "churn_label" and err.value.column == "churn"
    with pytest.raises(DataContractError, match="not one of the labels") as err:
        _load(tmp_path, "ID,Left\n1,Churned\n2,Stayed\n", churn_positive="Yes")
    assert err.value.examples == ["churned", "stayed"]
    (tmp_path / "c.csv").write_text("ID,plan\n1,a\n")
    cfg = load_config(write_config(tmp_path, {"customers": {"path": "c.csv",
                                                            "columns": {"customer_id": "ID"}}},
                                   mode="snapshot"))
    with pytest.raises(DataContractError, match="churn label column") as err:
        load_dataset(cfg)
    assert err.value.rule == "required_column"


def test_remaining_value_by_hand():
    params = SnapshotParams(discount_rate=0.0, max_years=1.0)
    months, value = SN.remaining_value(np.array([0.5, 1e-9]), np.array([10.0, 10.0]),
                                       params=params)
    # p = 0.5 a month: 0.5 + 0.25 + ... over 12 months = 1 - 0.5**12; p ~ 0: 12 months
    assert months[0] == pytest.approx(1 - 0.5 ** 12) and months[1] == pytest.approx(12, rel=1e-4)
    assert value.tolist() == pytest.approx([10 * (1 - 0.5 ** 12), 120], rel=1e-4)
    quarterly = SnapshotParams(discount_rate=0.0, max_years=1.0, churn_period_months=3)
    m3, _ = SN.remaining_value(np.array([1 - 0.5 ** 3]), np.array([1.0]), params=quarterly)
    assert m3[0] == pytest.approx(1 - 0.5 ** 12)          # same monthly survival


def test_kaplan_meier_by_hand():
    tenure = pd.Series([1, 2, 2, 3, 4])
    churned = pd.Series([True, False, True, True, False])
    km = SN.kaplan_meier(tenure, churned)
    # at 1: 1 of 5 -> 0.8; at 2: 1 of 4 -> 0.6; at 3: 1 of 2 -> 0.3; at 4: 0 of 1
    assert km["survival"].tolist() == pytest.approx([0.8, 0.6, 0.3, 0.3])
    assert km["median_tenure"].iloc[0] == 3.0


def test_one_feature_rule_finds_the_informative_column():
    rng = np.random.default_rng(1)
    n = 2000
    contract = rng.choice(["monthly", "yearly"], n)
    X = pd.DataFrame({"noise": rng.random(n),
                      "contract": pd.Categorical(contract)})
    y = (rng.random(n) < np.where(contract == "monthly", 0.5, 0.1)).astype(int)
    feature, rule = SN.one_feature_rule(X, y)
    assert feature == "contract"
    assert rule["rates"]["monthly"] == pytest.approx(0.5, abs=0.05)


def test_cross_validated_model_is_close_to_the_oracle_and_ties_or_beats_logistic(tmp_path):
    write_snapshot_demo(tmp_path, n_customers=5_000, seed=11)
    cfg = load_config(write_config(tmp_path, {"customers": {
        "path": "customers.csv", "columns": {"customer_id": "customerID", "churn": "Churn",
                                             "tenure": "tenure",
                                             "recurring_revenue": "MonthlyCharges",
                                             "total_revenue": "TotalCharges"}}},
        mode="snapshot", protected=["gender", "SeniorCitizen"]))
    table = load_dataset(cfg).tables["customers"]
    assert table.n_quarantined == 0
    assert table.data["total_revenue"].isna().sum() == (table.data["tenure"] == 0).sum() > 0
    run = SN.fit_churn_cv(table.data, params=cfg.snapshot, exclude=cfg.protected)
    truth = pd.read_parquet(tmp_path / "ground_truth" / "snapshot_truth.parquet")
    ev = run.evaluation.merge(truth.rename(columns={"customerID": "customer_id"}),
                              on="customer_id")
    oracle = roc_auc_score(ev["churned"], ev["churn_probability"])
    auc = run.churn_metrics.set_index("method")["roc_auc"]
    assert auc["model"] > oracle - 0.03
    assert auc["model"] >= auc["logistic"] - 0.01          # beats or ties within noise
    assert auc["model"] > auc["rule"] + 0.03
    assert len(ev) == len(table.data) and ev["churn_model"].between(0, 1).all()
    assert set(run.types.loc[run.types["kind"] == "excluded", "column"]) >= {
        "customer_id", "churn", "gender", "SeniorCitizen"}
    assert not {"gender", "SeniorCitizen"} & set(run.score_features.columns)
    assert run.scores["churn_reasons"].str.len().gt(0).mean() > 0.9
    import datetime as dt

    c = SN.profile_snapshot(table.data, config=cfg, as_of=dt.date(2026, 1, 1),
                            scores=run.scores).customers
    current = c["lifecycle_stage"] != "lost"
    months = 90 / DAYS_PER_MONTH
    # expected revenue over the horizon: below the full run rate, by the churn risk
    assert (c.loc[current, "predicted_value"] <= c.loc[current, "revenue_month"] * months
            + 1e-9).all()
    assert (c.loc[~current, "predicted_value"] == 0).all()
    riskier = c.loc[current].sort_values("churn_probability")
    ratio = riskier["predicted_value"] / (riskier["revenue_month"] * months)
    assert ratio.iloc[: len(ratio) // 10].mean() > ratio.iloc[-len(ratio) // 10:].mean()


def _planted_export(truth: str, n: int, seed: int) -> pd.DataFrame:
    """A snapshot export whose churn flag is drawn from a planted log-odds: linear in
    five numeric columns, or an interaction no linear model can express."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    logit = (1.5 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] - 0.5 if truth == "linear"
             else 3.0 * np.sign(x[:, 0] * x[:, 1]))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(5)])
    return frame.assign(customer_id=[f"c{i}" for i in range(n)],
                        churn=rng.random(n) < 1 / (1 + np.exp(-logit)))


@pytest.mark.parametrize(("truth", "n", "expected"), [
    ("linear", 400, {"logistic", "blend"}),       # few rows, truth a logistic model
    ("interaction", 2000, {"model", "blend"}),    # what trees can learn and lines cannot
])
def test_cross_validation_chooses_by_inner_log_loss_and_scores_with_the_choice(
        tmp_path, truth, n, expected):
    import json

    from analysis.models import CHURN_CANDIDATES

    run = SN.fit_churn_cv(_planted_export(truth, n, seed=8), params=SnapshotParams())
    selection = run.selection.set_index("method")
    assert run.chosen in expected, run.selection
    assert run.chosen == selection["log_loss"].idxmin()
    # the inner held-out quarters of the training folds, pooled: never the outer test
    assert set(selection.index) == set(CHURN_CANDIDATES)
    assert (selection["n"] == 5 * round(0.25 * 0.8 * n)).all()
    # every customer's probability is the chosen method's out-of-fold one
    assert np.array_equal(run.scores["churn_probability"],
                          run.evaluation[f"churn_{run.chosen}"])
    ev = run.evaluation
    assert np.allclose(ev["churn_blend"], (ev["churn_model"] + ev["churn_logistic"]) / 2)
    SN.write_snapshot_run(run, tmp_path, horizon_days=90)
    churn = json.loads((tmp_path / "models.json").read_text())["churn"]
    assert churn["chosen"] == run.chosen
    assert all("roc_auc" in churn[m] for m in (*CHURN_CANDIDATES, "rule"))
    assert churn["selection"][run.chosen]["log_loss"] == selection.loc[run.chosen,
                                                                       "log_loss"]
    back = SN.read_snapshot_run(tmp_path)
    assert back.chosen == run.chosen and np.array_equal(
        back.logistic.predict_proba(run.score_features),
        run.logistic.predict_proba(run.score_features))


@pytest.mark.e2e
def test_a_messy_telecom_export_gives_the_full_report_without_code(telco_run):
    result = telco_run
    customers = pd.read_parquet(result.processed_dir / "customers.parquet")
    assert len(customers) == 1_500 and customers["churn_probability"].between(0, 1).all()
    current = customers["lifecycle_stage"] != "lost"
    assert customers.loc[current, "remaining_value"].gt(0).all()
    assert customers["action"].notna().all()
    page = (result.report_dir / "index.html").read_text()
    assert "<script" not in page.lower() and "Traceback" not in page
    assert page.count('src="data:image/png;base64') >= 6
    for heading in ("1. Key numbers", "3. Portfolio", "4. Churn", "5. Value",
                    "6. Recommended actions", "7. Phase-out review", "8. How much to trust",
                    "9. Data quality"):
        assert heading in page, heading
    assert "no purchase-based segments (RFM)" in page
    assert "cross-validation" in page and "Month-to-month" in page
    # survival curves by the column the config names (survival_by: Contract), one per group
    import re

    assert re.search(r"Survival over tenure[^<]*, by Contract\. [^<]*Month-to-month: "
                     r"(half gone after \d+ months|more than half still with us)", page)
    # the page names the method that scores, and models.json holds every method's figures
    import json

    churn = json.loads((result.processed_dir / "models.json").read_text())["churn"]
    assert "roc_auc" in churn[churn["chosen"]] and "blend" in churn
    assert "Churn risk comes from" in page and "held out from training" in page
    for name in ("snapshot_02_churn_model", "snapshot_03_portfolio", "snapshot_05_strategy"):
        assert (result.report_dir / "notebooks" / f"{name}.html").is_file()
    # columns whose names XGBoost refuses are features under their own names
    meta = json.loads((result.processed_dir / "models" / "churn.meta.json").read_text())
    assert {"Paperless [billing]", "Streaming<TV>"} <= set(meta["features"])


def test_any_column_name_is_a_feature_and_reports_keep_the_original_names(tmp_path):
    """Names XGBoost refuses ([, ], <), one of them clashing with another column once
    made safe: the model fits, and the drivers, reason codes and saved model speak of
    the columns as the export names them."""
    from analysis.explain import global_drivers

    frame, _ = generate_snapshot_demo(600, seed=3)
    weird = {"MonthlyCharges": "Revenue [USD]", "Contract": "Score<5", "tenure": "a]b",
             "TechSupport": "a)b"}
    data = frame[["customerID", "Churn", *weird]].rename(
        columns={"customerID": "customer_id", "Churn": "churn", **weird})
    data["churn"] = data["churn"].eq("Yes")
    run = SN.fit_churn_cv(data, params=SnapshotParams(cv_folds=3))
    originals = set(weird.values())
    assert set(run.churn.features_) == originals
    assert set(run.churn_shap.columns) == originals | {"bias"}
    drivers = global_drivers(run.churn_shap, run.score_features)
    assert set(drivers["feature"]) == set(drivers["label"]) == originals
    named = {phrase.partition(": ")[0] for text in run.scores["churn_reasons"]
             for phrase in text.split("; ") if phrase}
    assert {"Score<5", "a]b"} <= named <= originals
    assert run.churn_metrics.set_index("method").loc["model", "roc_auc"] > 0.7
    SN.write_snapshot_run(run, tmp_path, horizon_days=90)
    back = SN.read_snapshot_run(tmp_path)
    assert np.allclose(back.churn.predict_proba(run.score_features),
                       run.churn.predict_proba(run.score_features))
    meta = json.loads((tmp_path / "models" / "churn.meta.json").read_text())
    assert set(meta["features"]) == originals
    assert sorted(meta["model_feature_names"]) == ["Revenue (USD)", "Scorelt5", "a)b", "a)b_2"]


def test_an_export_without_revenue_is_ranked_by_risk_and_never_valued(tmp_path):
    """Many published churn exports have no revenue column. Their customers are then of
    unknown value, not of value 0 nor all "high value": no tier, no money figure, no
    profit; the customers at high churn risk get the low-cost retention contact, costed
    but not valued; every money figure on the page reads "unknown", and the page says
    why once per section that needs revenue (the key numbers leave their money cards
    out)."""
    from analysis import data, narrative, strategy
    from analysis.store import RunStore
    from analysis.strategy import RETAIN_AUTOMATED

    from .conftest import shipped_config, write_yaml

    frame, _ = generate_snapshot_demo(600, seed=11)
    frame.drop(columns=["MonthlyCharges", "TotalCharges"]).to_csv(tmp_path / "export.csv",
                                                                  index=False)
    raw = shipped_config("snapshot", tmp_path, tables={"customers": tmp_path / "export.csv"})
    raw["tables"]["customers"]["columns"] = {
        "customer_id": "customerID", "churn": "Churn", "tenure": "tenure"}
    config_path = write_yaml(tmp_path / "snapshot.yaml", raw)
    config = load_config(config_path)
    folder = tmp_path / "run"
    data.quality_step(config, folder)
    SN.model_step(config, folder)
    decisions = strategy.strategy_step(config, folder)
    c = RunStore(folder).read_customers(["customer_id", "value_tier", "lifecycle_stage",
                                         "churn_probability", "predicted_value",
                                         "remaining_value", "action"])
    assert (c["value_tier"] == "unknown").all()
    current = c["lifecycle_stage"] != "lost"
    assert c.loc[current, ["predicted_value", "remaining_value"]].isna().all().all()
    high = current & (c["churn_probability"] >= config.strategy.high_risk)
    assert high.sum() > 0
    assert (c.loc[high, "action"] == RETAIN_AUTOMATED).all()
    assert set(c.loc[~high, "action"]) <= {"Maintain", "No action - lapsed"}
    r = decisions.retention
    assert r["campaign_size"] == high.sum()
    assert r["campaign_cost"] == high.sum() * (config.strategy.contact_cost
                                               + config.strategy.offer_cost)
    assert r["expected_incremental_profit"] is None and r["roi"] is None
    acts = decisions.actions.set_index("action")
    # those who left bring nothing and cost nothing; what the others bring is unknown
    assert acts.loc["No action - lapsed", "total_profit"] == 0
    assert acts.drop(index="No action - lapsed")[["ordinary_profit", "total_profit"]].isna(
    ).all().all()
    # the page: no money made up, no "nan", and the reason given
    page = narrative.load_page(config_path, folder, run_id="t", report_dir=tmp_path / "rep")
    assert not page.revenue_known
    blocks = (narrative.bottom_line(page) + narrative.key_numbers(page)
              + narrative._snapshot_portfolio(page) + narrative.churn(page)
              + narrative.value(page) + narrative.actions(page) + narrative.phaseout(page))
    text = " ".join(b for b in blocks if isinstance(b, str))
    assert "nan" not in text.replace("nance", "") and "high-value" not in text
    assert "what they bring is unknown" in text and "unknown" in narrative.money(
        float("nan"), page)
    assert text.count("The export has no revenue column") == 3     # key numbers, portfolio, value
    assert f"a retention contact to {high.sum():,} customers at high churn risk" in text
    assert "Following the plan, expected profit" not in text
    assert "recurring revenue per month" not in text and "current customers" in text
    assert "value tier high" not in text                  # policy rows needing a value left out


def test_tenure_cohorts_of_an_export_without_revenue_have_unknown_revenue():
    """Revenue per tenure band is unknown (NaN) when no customer's revenue is known, not
    0; with revenue known, an empty band brings 0."""
    customers = pd.DataFrame({"customer_id": ["a", "b", "c"], "tenure_months": [2, 8, 30],
                              "churn": [True, False, False], "revenue_month": np.nan})
    unknown = SN.tenure_cohorts(customers)
    assert unknown["monthly_revenue"].isna().all()
    assert unknown["customers"].tolist() == [1, 1, 0, 1, 0]
    known = SN.tenure_cohorts(customers.assign(revenue_month=[10.0, 20.0, 5.0]))
    assert known["monthly_revenue"].tolist() == [10.0, 20.0, 0.0, 5.0, 0.0]
