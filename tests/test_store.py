"""The run store: each step's table written once, joined on read, exported at the end."""
import csv
import datetime as dt
import json

import pandas as pd
import pytest

from analysis.store import RunStore


def _three_steps(folder):
    store = RunStore(folder)
    store.write_profile_table(pd.DataFrame({
        "customer_id": ["c3", "c1", "c2"], "recency_days": [5, 50, 500],
        "segment": ["Loyal", "New", "Lost"], "churn_probability": [0.9, 0.9, 0.9]}))
    # the scores cover two of the three customers, in another order, and say why in
    # churn_reasons (shown as reasons)
    store.write_scores(pd.DataFrame({
        "customer_id": ["c2", "c3"], "churn_probability": [0.8, 0.1],
        "churn_reasons": ["no order for 500 days", "orders often"]}))
    store.write_decisions(pd.DataFrame({
        "customer_id": ["c1", "c2", "c3"], "action": ["Nurture", "Win back", "Nurture"]}))
    return store


def test_read_customers_joins_the_steps_tables_later_step_wins(tmp_path):
    store = _three_steps(tmp_path)
    out = store.read_customers()
    # the profile's customers in the profile's order; the contract's columns first
    assert out["customer_id"].tolist() == ["c3", "c1", "c2"]
    assert list(out.columns) == ["customer_id", "segment", "churn_probability", "action",
                                 "reasons", "recency_days"]
    # the scores replace the profile's churn_probability; a customer without a score
    # has none (not the profile's stale value)
    assert out["churn_probability"].tolist()[0] == 0.1
    assert pd.isna(out["churn_probability"].iloc[1])
    assert out["churn_probability"].iloc[2] == 0.8
    assert out["reasons"].fillna("").tolist() == ["orders often", "", "no order for 500 days"]
    assert out["action"].tolist() == ["Nurture", "Nurture", "Win back"]
    few = store.read_customers(["action", "customer_id", "no_such_column"])
    assert list(few.columns) == ["action", "customer_id"]
    assert store.customer_columns() == list(out.columns)


def test_tables_in_the_profiles_order_are_lined_up_as_a_join_would(tmp_path):
    # the steps write the profile's customers in its order: read without a join, the
    # table must be the join's (same rows, values, columns)
    store = RunStore(tmp_path)
    ids = ["c3", "c1", "c2"]
    store.write_profile_table(pd.DataFrame({"customer_id": ids, "segment": ["a", "b", "c"]}))
    store.write_scores(pd.DataFrame({"customer_id": ids, "churn_probability": [0.1, 0.2, 0.3]}))
    store.write_decisions(pd.DataFrame({"customer_id": ids, "action": ["x", "y", "z"]}))
    joined = (pd.read_parquet(store.profile_table)
              .merge(pd.read_parquet(store.scores_table), on="customer_id")
              .merge(pd.read_parquet(store.decisions_table), on="customer_id"))
    out = store.read_customers(["customer_id", "segment", "churn_probability", "action"])
    pd.testing.assert_frame_equal(out, joined[out.columns], check_dtype=False)


def test_the_largest_are_read_with_their_columns_largest_first(tmp_path):
    # (the scores in another order than the profile's, one customer without one, two
    # customers tied: the first in the profile's order comes first)
    store = RunStore(tmp_path)
    store.write_profile_table(pd.DataFrame({
        "customer_id": ["c5", "c4", "c3", "c2", "c1"], "segment": list("abcde")}))
    store.write_scores(pd.DataFrame({
        "customer_id": ["c1", "c2", "c3", "c5"], "churn_probability": [0.5, 0.9, 0.2, 0.9],
        "churn_reasons": ["r1", "r2", "r3", "r5"]}))
    top = store.largest("churn_probability", 3, ["customer_id", "segment", "reasons",
                                                 "churn_probability"])
    assert top.to_dict("list") == {"customer_id": ["c5", "c2", "c1"],
                                   "segment": ["a", "d", "e"], "reasons": ["r5", "r2", "r1"],
                                   "churn_probability": [0.9, 0.9, 0.5]}
    assert store.largest("churn_probability", 1, ["reasons"])["reasons"].tolist() == ["r5"]
    # the rows asked for, by id, in the profile's order
    some = store.read_customers(["customer_id", "segment"], ids=["c1", "c4"])
    assert some.to_dict("list") == {"customer_id": ["c4", "c1"], "segment": ["b", "e"]}


def test_no_step_rewrites_an_earlier_steps_table(tmp_path):
    store = _three_steps(tmp_path)
    before = store.profile_table.read_bytes()
    store.export_customers()
    store.read_customers()
    assert store.profile_table.read_bytes() == before
    assert "action" not in pd.read_parquet(store.profile_table)


def test_export_is_the_join_and_a_run_before_the_store_reads_its_export(tmp_path):
    store = _three_steps(tmp_path / "new")
    written = store.export_customers()
    pd.testing.assert_frame_equal(pd.read_parquet(written["customers"]),
                                  store.read_customers())
    old = RunStore(tmp_path / "old")
    old.folder.mkdir()
    pd.read_parquet(written["customers"]).to_parquet(old.export, index=False)
    assert old.read_customers(["customer_id", "action"])["action"].tolist() == [
        "Nurture", "Nurture", "Win back"]
    with pytest.raises(FileNotFoundError, match="profile step"):
        RunStore(tmp_path / "empty").read_customers()


def test_scoring_date_and_horizon_are_read_from_what_the_steps_recorded(tmp_path):
    store = RunStore(tmp_path)
    assert store.scoring_date() is None and store.horizon_days() is None
    (tmp_path / "profile.json").write_text(json.dumps({"as_of": "2026-03-01"}))
    (tmp_path / "models.json").write_text(json.dumps({"horizon_days": 120}))
    assert store.scoring_date() == dt.date(2026, 3, 1) and store.horizon_days() == 120


def test_customer_csv_neutralises_formulas_and_parquet_keeps_them(tmp_path):


    ids = ['=HYPERLINK("http://x","click")', "+SUM(1+1)*cmd|' /C calc'!A0", "-2+3",
           "@SUM(1)", "\tx", "\rx", "c7"]
    customers = pd.DataFrame({
        "customer_id": ids,
        "segment": pd.Categorical(["Champions", "-12", "@risk", "Loyal", "=1", "a", "b"]),
        "predicted_value": [-5.0, 1.5, 0.0, 2.0, -0.25, 3.0, 4.0],
        "reasons": ["-12", "spent 5", "", "+3 orders", "x", "=cmd", "ok"]})
    store = RunStore(tmp_path)
    store.write_profile_table(customers)
    written = store.export_customers()
    with open(written["customers_csv"], newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    cells = pd.DataFrame(rows, columns=header)
    assert cells["customer_id"].tolist() == ["'" + i for i in ids[:-1]] + ["c7"]
    assert cells["segment"].tolist() == ["Champions", "'-12", "'@risk", "Loyal", "'=1", "a", "b"]
    assert cells["reasons"].tolist() == ["'-12", "spent 5", "", "'+3 orders", "x", "'=cmd", "ok"]
    assert cells["predicted_value"].tolist() == ["-5.0", "1.5", "0.0", "2.0", "-0.25", "3.0", "4.0"]
    back = pd.read_parquet(written["customers"])
    pd.testing.assert_frame_equal(back, customers)                 # Parquet: values as given




def test_no_ids_read_no_customers(tmp_path):
    """A list of no customers (a run whose campaign is empty) reads an empty table with
    the columns asked for, as a list of some does, not pyarrow's error."""
    store = RunStore(tmp_path)
    store.write_profile_table(pd.DataFrame({"customer_id": ["c1", "c2"],
                                            "segment": ["Loyal", "New"]}))
    store.write_scores(pd.DataFrame({"customer_id": ["c1", "c2"],
                                     "churn_probability": [0.1, 0.2]}))
    some = store.read_customers(["customer_id", "segment", "churn_probability"], ids=["c2"])
    none = store.read_customers(["customer_id", "segment", "churn_probability"], ids=[])
    assert some["segment"].tolist() == ["New"] and len(none) == 0
    assert list(none.columns) == list(some.columns)
    assert dict(none.dtypes) == dict(some.dtypes)


def test_a_profile_table_written_as_part_files_is_read_as_one(tmp_path):
    """On a cluster Spark's executors write the profile's table as a folder of part
    files (with Spark's _SUCCESS marker): the store reads it as the one table."""
    folder = tmp_path / "segments" / "customers.parquet"
    folder.mkdir(parents=True)
    pd.DataFrame({"customer_id": ["c1", "c2"], "segment": ["Loyal", "New"]}).to_parquet(
        folder / "part-00000.parquet", index=False)
    pd.DataFrame({"customer_id": ["c3"], "segment": ["Lost"]}).to_parquet(
        folder / "part-00001.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    store = RunStore(tmp_path)
    store.write_scores(pd.DataFrame({"customer_id": ["c3", "c1", "c2"],
                                     "churn_probability": [0.3, 0.1, 0.2]}))
    assert store.n_customers() == 3 and store.profile_columns() == ["customer_id", "segment"]
    out = store.read_customers(["segment", "churn_probability"])
    assert out.to_dict("list") == {"segment": ["Loyal", "New", "Lost"],
                                   "churn_probability": [0.1, 0.2, 0.3]}


def _store_in_parts(folder, n=23, *, lined_up=False):
    """A run store whose later steps' tables are in other orders than the profile's (in
    its order when ``lined_up``, as the steps write them), the decisions in part files
    (as Spark's executors write them): categories and texts, missing values, ties, a
    customer with no score (every customer scored when lined up), a text a spreadsheet
    would run."""
    import numpy as np

    rng = np.random.default_rng(3)
    ids = [f"c{i:02d}" for i in rng.permutation(n)]
    store = RunStore(folder)
    store.write_profile_table(pd.DataFrame({
        "customer_id": ids,
        "segment": pd.Categorical(rng.choice(["Loyal", "New", "=Lost"], n)),
        "spend_365d": rng.integers(0, 4, n).astype(float),
        "active": rng.random(n) < 0.5}))
    scored = ids if lined_up else [i for i in ids if i != ids[4]][::-1]
    store.write_scores(pd.DataFrame({
        "customer_id": scored, "churn_probability": rng.choice([0.1, 0.5, np.nan], len(scored)),
        "churn_reasons": [f"why {i}" if k % 3 else None for k, i in enumerate(scored)]}))
    decided = pd.DataFrame({
        "customer_id": ids if lined_up else sorted(ids),
        "action": rng.choice(["Retain", "Grow", "Win back"], n),
        "incremental_profit": rng.choice([0.0, 1.0, 2.5, np.nan], n)})
    store.decisions_table.mkdir(parents=True)
    for k, part in enumerate((decided.iloc[:9], decided.iloc[9:]) if lined_up
                             else (decided.iloc[12:], decided.iloc[:12])):
        part.to_parquet(store.decisions_table / f"part-{k:05d}.parquet", index=False)
    return store


@pytest.mark.parametrize("lined_up", [False, True])
def test_the_table_streamed_in_parts_is_the_table_read_whole(tmp_path, monkeypatch, lined_up):
    """Streamed a few customers at a time (joined by DuckDB; read side by side where the
    steps' tables hold the customers in the profile's order), the table is what
    read_customers reads (the same rows in the same order, values and types); a list
    filtered and sorted largest first, missing last, ties in the profile's order, is the
    pandas sort of it."""
    from analysis import store as store_module

    store = _store_in_parts(tmp_path, lined_up=lined_up)
    joins = []
    real = store_module.duck_connection
    monkeypatch.setattr(store_module, "duck_connection",
                        lambda *a, **k: joins.append(1) or real(*a, **k))
    whole = store.read_customers()
    parts = list(store.stream(rows=5))
    assert len(parts) == 5 and max(len(p) for p in parts) == 5
    assert all(p.dtypes.equals(whole.dtypes) for p in parts)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
    assert bool(joins) != lined_up           # (DuckDB joined the tables unless lined up)
    some = ["customer_id", "incremental_profit", "reasons", "segment"]
    listed = pd.concat(store.stream(some, grouped_by="action", rows=4,
                                    largest_first=("incremental_profit", "churn_probability")),
                       ignore_index=True)
    expected = pd.concat(whole[whole["action"] == action].sort_values(
        ["incremental_profit", "churn_probability"], ascending=False, kind="stable")
        for action in sorted(whole["action"].unique()))
    pd.testing.assert_frame_equal(listed, expected[some].reset_index(drop=True))
    assert store.known("reasons") == whole["reasons"].notna().sum() > 0
    assert store.known("no_such_column") == 0


@pytest.mark.parametrize("lined_up", [False, True])
def test_the_export_streamed_is_the_export_written_whole(tmp_path, monkeypatch, lined_up):
    """customers.csv written a part at a time is, to the byte, write_csv of the whole
    table (header once, formulas neutralised), and customers.parquet reads back as it."""
    from analysis import data
    from analysis import store as store_module

    store = _store_in_parts(tmp_path, lined_up=lined_up)
    whole = store.read_customers()
    data.write_csv(tmp_path / "whole.csv", whole)
    monkeypatch.setattr(store_module, "STREAM_ROWS", 4)       # (6 parts)
    written = store.export_customers()
    assert written["customers_csv"].read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert "'=Lost" in written["customers_csv"].read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(written["customers"]), whole)


def test_a_later_step_holding_a_customer_twice_stops_the_stream(tmp_path):
    store = _store_in_parts(tmp_path)
    twice = pd.read_parquet(store.decisions_table).iloc[[0, 0]]
    twice.to_parquet(store.decisions_table / "part-00009.parquet", index=False)
    with pytest.raises(ValueError, match="1 customers have more than one row"):
        list(store.stream())


def test_the_first_and_the_largest_are_found_where_the_table_lies(tmp_path):
    """head and largest read a few customers (DuckDB's top rows), as pandas would pick
    them from the whole table: the profile's order; largest first, ties in the profile's
    order, none without a value."""
    store = _store_in_parts(tmp_path)
    whole = store.read_customers()
    some = ["customer_id", "segment", "reasons"]
    pd.testing.assert_frame_equal(store.head(7, some), whole[some].head(7))
    top = store.largest("incremental_profit", 9, some)
    expected = whole.nlargest(9, "incremental_profit", keep="first")[some]
    pd.testing.assert_frame_equal(top, expected.reset_index(drop=True))
    assert len(store.largest("incremental_profit", 1_000, some)) == \
        whole["incremental_profit"].notna().sum()


def test_a_column_named_filename_is_read_as_any_other(tmp_path):
    """A table may hold a column named as DuckDB's file-name column (a snapshot keeps its
    export's columns): it is read, and the order is the profile's."""
    store = RunStore(tmp_path)
    store.write_profile_table(pd.DataFrame({"customer_id": ["b", "a", "c"],
                                            "filename": ["x.pdf", "y.pdf", "z.pdf"]}))
    assert pd.concat(store.stream(rows=2, largest_first=("filename",))).to_dict("list") == {
        "customer_id": ["c", "a", "b"], "filename": ["z.pdf", "y.pdf", "x.pdf"]}
    assert store.head(2)["filename"].tolist() == ["x.pdf", "y.pdf"]
