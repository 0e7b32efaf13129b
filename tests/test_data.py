import csv
import datetime as dt
import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from analysis.config import load_config
from analysis import data
from analysis.data import (
    load_dataset,
    neutralise_csv_cells,
    quality_summary,
    write_csv,
    write_processed,
)
from analysis.errors import DataContractError

from .conftest import write_config

TODAY = dt.date(2026, 1, 15)
HEADER = "order_id,customer_id,order_date,amount,status\n"


def load_csv(tmp_path, text, *, table_options=None, extra=None, name="tx.csv",
             encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    spec = {"path": name, **(table_options or {})}
    cfg = load_config(write_config(tmp_path, {"transactions": spec}, **(extra or {})))
    return load_dataset(cfg, today=TODAY).tables["transactions"]


def rules_of(table):
    return dict(zip(table.quarantine["source_row"], table.quarantine["rule"], strict=True))


# --------------------------------------------------------------------------- loaders


def test_csv_with_semicolon_decimal_comma_and_thousands(tmp_path):
    table = load_csv(tmp_path, "customer_id;order_date;amount\n007;2024-01-02;1.234,50\n"
                               "008;2024-01-03;€ 12,00\n",
                     table_options={"sep": ";", "decimal": ",", "thousands": "."})
    assert table.data["amount"].tolist() == [1234.5, 12.0]
    assert table.data["customer_id"].tolist() == ["007", "008"]  # leading zeros kept


def test_whitespace_separated_without_header(tmp_path):
    table = load_csv(tmp_path, " 00001 19970101  1   11.77\n 00002 19970112  5   77.00\n",
                     table_options={"sep": "whitespace", "header": False,
                                    "names": ["cid", "d", "n", "v"], "date_format": "%Y%m%d",
                                    "columns": {"customer_id": "cid", "order_date": "d",
                                                "amount": "v", "quantity": "n"}})
    assert table.data["customer_id"].tolist() == ["00001", "00002"]
    assert table.data["order_date"].tolist() == [pd.Timestamp("1997-01-01"),
                                                 pd.Timestamp("1997-01-12")]
    assert table.data["quantity"].tolist() == [1.0, 5.0]


def test_parquet_and_excel_load_the_same_rows(tmp_path):
    frame = pd.DataFrame({"customer_id": ["a", "b"], "order_date": ["2024-01-01", "2024-02-01"],
                          "amount": [10.0, 20.5]})
    frame.to_excel(tmp_path / "tx.xlsx", index=False)
    typed = frame.assign(order_date=pd.to_datetime(frame["order_date"]))
    typed.to_parquet(tmp_path / "tx.parquet", index=False)
    out = []
    for name in ("tx.xlsx", "tx.parquet"):
        cfg = load_config(write_config(tmp_path, {"transactions": name}))
        out.append(load_dataset(cfg, today=TODAY)["transactions"])
    for data in out:
        assert data["customer_id"].tolist() == ["a", "b"]
        assert data["amount"].tolist() == [10.0, 20.5]
        assert data["order_date"].dt.strftime("%Y-%m-%d").tolist() == ["2024-01-01", "2024-02-01"]


def test_utf8_bom_is_read_transparently(tmp_path):
    table = load_csv(tmp_path, "\ufeffcustomer_id,order_date,amount\nx,2024-01-01,5\n")
    assert table.data["customer_id"].tolist() == ["x"]


def test_wrong_encoding_stops_with_advice(tmp_path):
    path = tmp_path / "tx.csv"
    path.write_bytes("customer_id,order_date,amount\nJosé,2024-01-01,5\n".encode("latin-1"))
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    with pytest.raises(DataContractError) as err:
        load_dataset(cfg, today=TODAY)
    assert err.value.rule == "encoding" and "encoding" in str(err.value)


def test_latin1_file_loads_when_configured(tmp_path):
    table = load_csv(tmp_path, "customer_id,order_date,amount,category\nx,2024-01-01,5,Café\n",
                     encoding="latin-1", table_options={"encoding": "latin-1"})
    assert table.data["category"].tolist() == ["Café"]


# --------------------------------------------------------------------------- stops


@pytest.mark.parametrize("text, rule", [
    ("", "empty_file"),
    ("customer_id,order_date,amount\n", "no_rows"),
])
def test_empty_and_header_only_files_stop(tmp_path, text, rule):
    with pytest.raises(DataContractError) as err:
        load_csv(tmp_path, text)
    assert err.value.rule == rule
    assert str(tmp_path / "tx.csv") in str(err.value)


def test_missing_file_stops(tmp_path):
    cfg = load_config(write_config(tmp_path, {"transactions": "absent.csv"}))
    with pytest.raises(DataContractError, match="not found") as err:
        load_dataset(cfg)
    assert err.value.rule == "file_exists"


def test_missing_required_column_names_it_and_the_columns_found(tmp_path):
    with pytest.raises(DataContractError) as err:
        load_csv(tmp_path, "customer_id,order_date\nx,2024-01-01\n")
    assert err.value.rule == "required_column" and err.value.column == "amount"
    assert err.value.examples == ["customer_id", "order_date"]


def test_a_line_export_with_unit_prices_gets_its_amount_from_quantity_and_price(tmp_path):
    """A common export (an online retailer's invoice lines) has a quantity and a unit
    price but no line total: mapped to ``quantity`` and ``unit_price``, each line's
    amount is their product; a line whose price does not parse or is empty is set aside
    under its own rule, and so are guest lines and returns of negative quantity."""
    text = ("Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n"
            "536365,85123A,HEART HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom\n"
            "536365,71053,WHITE LANTERN,6,12/1/2010 8:26,3.39,17850.0,United Kingdom\n"
            "536366,22633,HAND WARMER,6,12/1/2010 8:28,1.85,,United Kingdom\n"
            "C536379,D,Discount,-1,12/1/2010 9:41,27.50,14527.0,United Kingdom\n"
            "536367,84879,BIRD ORNAMENT,32,12/1/2010 8:34,abc,13047.0,United Kingdom\n"
            "536368,22960,JAM MAKING SET,4,12/1/2010 8:35,,13047.0,United Kingdom\n"
            "536369,21756,BATH BUILDING,3,12/1/2010 8:35,5.95,13047.0,United Kingdom\n")
    table = load_csv(tmp_path, text, name="retail.csv", table_options={
        "date_format": "%m/%d/%Y %H:%M",
        "columns": {"customer_id": "Customer ID", "order_id": "Invoice",
                    "order_date": "InvoiceDate", "quantity": "Quantity",
                    "unit_price": "Price"}})
    assert rules_of(table) == {3: "missing_customer_id", 4: "negative_quantity",
                               5: "unparseable_unit_price", 6: "missing_amount"}
    assert table.data["amount"].tolist() == pytest.approx([6 * 2.55, 6 * 3.39, 3 * 5.95])
    assert table.data["customer_id"].tolist() == ["17850", "17850", "13047"]  # not 17850.0
    assert "unit_price" not in table.data.columns
    assert "amount computed as quantity × unit_price (the file has no amount)" in table.notes
    q = table.quarantine.set_index("source_row")
    assert q.loc[5, "detail"] == "unit_price='abc' is not a number"
    assert q.loc[6, "raw:Price"] != q.loc[6, "raw:Price"]              # empty: kept empty
    # a unit price without a quantity is not an amount: the stop names both ways
    with pytest.raises(DataContractError, match="or map quantity and unit_price") as err:
        load_csv(tmp_path, "customer_id,order_date,unit_price\nx,2024-01-01,5\n")
    assert err.value.rule == "required_column" and err.value.column == "amount"


def test_times_with_offsets_from_utc_count_on_the_day_of_their_own_clock(tmp_path):
    """Exports from systems that write ISO times with an offset ("Z", "+02:00", mixed
    from row to row, as a shop in several countries writes them) load rather than stop
    with pandas' "Mixed timezones" error; each time counts on its own clock's day, in
    every chunk, as a typed column with a zone does."""
    text = ("customer_id,order_date,amount\n"
            "a,2024-01-01T23:30:00-05:00,5\n"      # 04:30 the next day in UTC
            "a,2024-01-02T10:00:00Z,5\n"
            "b,2024-01-03 08:00:00+0200,5\n"
            "b,2024-01-04,5\n"
            "c,2024-01-05T25:00:00+01:00,5\n")     # no such hour
    for chunk in ({}, {"chunk_rows": 3}):
        if chunk:
            from analysis.data import load_table
            cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
            table = load_table(cfg.tables["transactions"], table="transactions", config=cfg,
                               today=TODAY, **chunk)
        else:
            table = load_csv(tmp_path, text)
        assert table.data["order_date"].dt.strftime("%Y-%m-%d").tolist() == [
            "2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
        assert rules_of(table) == {5: "unparseable_date"}


def test_ids_written_as_floats_match_and_tables_that_match_nobody_are_counted(tmp_path):
    """An integer id written as a float ("17850.0", a spreadsheet's export of a column with
    blanks) is the integer's id, as in a typed file; the summary counts, per table beside
    the order log, how many of its customers have an order there, so that ids written
    differently in two files ("C-7" and "7") are caught rather than matching nobody."""
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n17850.0,2024-01-01,5\n"
                                     "13047,2024-01-02,5\n,2024-01-03,5\n")
    pd.DataFrame({"customer_id": [17850.0, 13047.0, 99.0],
                  "region": ["N", "S", "E"]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "i.csv").write_text("customer_id,date,type\nC-17850,2024-01-01,complaint\n"
                                    "C-13047,2024-01-01,ticket\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv", "customers": "c.parquet",
                                              "interactions": "i.csv"}))
    dataset = load_dataset(cfg, today=TODAY)
    assert dataset["transactions"]["customer_id"].tolist() == ["17850", "13047"]
    tables = quality_summary(dataset)["tables"].set_index("table")
    assert tables.loc["customers", "customers_in_order_log"] == 2        # of 3
    assert tables.loc["interactions", "customers_in_order_log"] == 0     # of 2
    assert pd.isna(tables.loc["transactions", "customers_in_order_log"])


def test_a_campaign_table_names_its_groups_as_campaign_tools_do(tmp_path):
    """A past campaign's groups are read from the words campaign tools and analysts
    write ("Test"/"Control", "treatment", "hold-out", "mailed"), besides true/false; a
    word that is neither is set aside with its value."""
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\na,2024-01-01,5\n")
    (tmp_path / "camp.csv").write_text(
        "customer_id,campaign_date,treated\n" + "".join(
            f"c{i},2024-01-01,{w}\n" for i, w in enumerate(
                ["Test", "Control", "treatment", "Hold-Out", "mailed", "not contacted",
                 "yes", "0", "maybe"])))
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv", "campaign": "camp.csv"}))
    campaign = load_dataset(cfg, today=TODAY).tables["campaign"]
    assert campaign.data["treated"].tolist() == [True, False, True, False, True, False, True,
                                                 False]
    assert rules_of(campaign) == {9: "unparseable_treated"}


def test_interaction_labels_of_service_tools_are_understood_and_the_rest_counted(tmp_path):
    """Service tools label contacts in longer words ("Complaint - Billing", "Support
    ticket", "NPS survey response"): each counts as the type it names; labels the
    features do not use ("Chat") are kept, and the summary says how many there are."""
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\na,2024-01-01,5\n")
    (tmp_path / "i.csv").write_text(
        "customer_id,date,type\n" + "".join(
            f"a,2024-01-0{i + 1},{w}\n" for i, w in enumerate(
                ["Complaint - Billing", "Support ticket", "NPS survey response", "complaints",
                 "Chat", "chat", "Email"])))
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv", "interactions": "i.csv"}))
    dataset = load_dataset(cfg, today=TODAY)
    assert dataset["interactions"]["type"].tolist() == [
        "complaint", "ticket", "survey", "complaint", "chat", "chat", "email"]
    notes = quality_summary(dataset)["notes"]
    assert notes["note"].tolist() == [
        "3 interactions of types the features do not use (complaints, tickets and surveys "
        "are): 'chat' 2, 'email' 1"]


def test_accounting_and_erp_negatives_are_refunds(tmp_path):
    """Accounting exports write a negative amount in parentheses, ERP exports with a
    trailing minus (German decimals too); both are negative amounts (refunds), and only
    a value that is neither is set aside."""
    text = ("customer_id;order_date;amount\n"
            "a;2024-01-01;1.234,50\n"
            "a;2024-01-02;(1.234,50)\n"
            "a;2024-01-03;12,50-\n"
            "a;2024-01-04;€ (3,20)\n"
            "a;2024-01-05;1-2\n")
    table = load_csv(tmp_path, text, table_options={"sep": ";", "decimal": ",",
                                                    "thousands": "."})
    assert table.data["amount"].tolist() == [1234.5, -1234.5, -12.5, -3.2]
    assert rules_of(table) == {5: "unparseable_amount"}


def test_a_small_last_chunk_of_bad_rows_does_not_stop_a_good_file(tmp_path):
    """Whether a column is "mostly not parseable" (a wrong date format or decimal mark:
    the run stops) is judged on the file read so far, not chunk by chunk: a file whose
    last chunk happens to hold only a bad row sets that row aside; a file that is mostly
    bad still stops, at the first chunk that shows it."""
    from analysis.data import load_table

    good = "".join(f"a,2024-01-{d:02d},5\n" for d in range(1, 11))
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n" + good
                                     + "a,2024-13-01,abc\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    table = load_table(cfg.tables["transactions"], table="transactions", config=cfg,
                       today=TODAY, chunk_rows=2)
    assert table.n_processed == 10 and rules_of(table) == {11: "unparseable_date"}
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n"
                                     + "a,01/02/2024,5\n" * 3 + good)
    with pytest.raises(DataContractError, match="2 of 2 dates do not match") as err:
        load_table(cfg.tables["transactions"], table="transactions", config=cfg,
                   today=TODAY, chunk_rows=2)
    assert err.value.rule == "date_format"


def test_wrong_separator_is_diagnosed(tmp_path):
    with pytest.raises(DataContractError, match="seems to use ';'"):
        load_csv(tmp_path, "customer_id;order_date;amount\nx;2024-01-01;5\n")


def test_mostly_unparseable_dates_stop_with_examples(tmp_path):
    rows = "".join(f"c{i},{i % 28 + 1:02d}/01/2024,5\n" for i in range(10))
    with pytest.raises(DataContractError) as err:
        load_csv(tmp_path, "customer_id,order_date,amount\n" + rows)
    assert err.value.rule == "date_format" and err.value.column == "order_date"
    assert err.value.n_rows == 10 and err.value.examples[0] == "01/01/2024"


def test_column_renamed_by_case_and_spaces_is_matched_and_noted(tmp_path):
    table = load_csv(tmp_path, "Customer ID, Order_Date ,AMOUNT\nx,2024-01-01,5\n",
                     table_options={"columns": {"customer_id": "customer id",
                                                "order_date": "order_date"}})
    assert table.data["amount"].tolist() == [5.0]
    assert any("AMOUNT" in note for note in table.notes)


# --------------------------------------------------------------------------- row rules


def test_each_row_rule_quarantines_with_its_reason(tmp_path):
    rows = [
        "1,a,2024-01-01,10,completed",     # 1 ok
        "2, a ,2024-01-02,11,Completed",   # 2 ok: id whitespace, status case
        "3,,2024-01-03,12,completed",      # 3 missing customer id
        "4,b,2024-13-01,13,completed",     # 4 unparseable date
        "5,b,,14,completed",               # 5 missing date
        "6,b,2024-01-05,abc,completed",    # 6 unparseable amount
        "7,b,2024-01-06,inf,completed",    # 7 non-finite amount
        "8,b,2030-01-01,15,completed",     # 8 date in the future
        "9,b,1970-01-01,16,completed",     # 9 date too old
        "10,b,2024-01-07,5e12,completed",  # 10 amount out of range
        "11,b,2024-01-08,17,lost",         # 11 unknown status
        "1,a,2024-01-01,10,completed",     # 12 duplicate of row 1
        "12,c,2024-01-09,-5,refunded",     # 13 ok: a refund
        "13,c,2024-01-10,0,canceled",      # 14 ok: cancelled, zero amount
        "14,c,2024-01-11,,completed",      # 15 missing amount
    ]
    table = load_csv(tmp_path, HEADER + "\n".join(rows) + "\n")
    assert rules_of(table) == {3: "missing_customer_id", 4: "unparseable_date",
                               5: "missing_date", 6: "unparseable_amount",
                               7: "non_finite_amount", 8: "date_in_future",
                               9: "date_too_old", 10: "amount_out_of_range",
                               11: "unknown_status", 12: "duplicate_row",
                               15: "missing_amount"}
    assert table.n_read == 15 and table.n_processed + table.n_quarantined == table.n_read
    data = table.data
    assert data["customer_id"].tolist() == ["a", "a", "c", "c"]
    assert data["status"].tolist() == ["completed", "completed", "returned", "cancelled"]
    q = table.quarantine.set_index("source_row")
    assert q.loc[4, "detail"] == "order_date='2024-13-01' is not a date"
    assert q.loc[4, "raw:order_date"] == "2024-13-01"  # the original value is kept


def test_status_and_category_text_is_cleaned_per_value_and_kept_per_row(tmp_path):
    # the text rules run once per distinct value; each row gets its own value's result
    table = load_csv(tmp_path, "customer_id,order_date,amount,status,category\n"
                               "a,2024-01-01,5, Completed ,toys\n"
                               "a,2024-01-02,5,,\n"
                               "b,2024-01-03,5,  , Toys \n"
                               "b,2024-01-04,-5,REFUNDED,toys\n"
                               "c,2024-01-05,5,lost,  \n"
                               "c,2024-01-06,5,completed,books\n")
    assert rules_of(table) == {5: "unknown_status"}
    assert table.data["status"].tolist() == ["completed", "completed", "completed",
                                             "returned", "completed"]
    assert table.data["category"].tolist() == ["toys", "unknown", "Toys", "toys", "books"]
    assert table.quarantine.loc[0, "detail"] == "status='lost' is not one of " \
                                                "completed/cancelled/returned"


def test_negative_quantity_is_quarantined(tmp_path):
    table = load_csv(tmp_path, "customer_id,order_date,amount,quantity\n"
                               "a,2024-01-01,5,-1\na,2024-01-02,5,2\n")
    assert rules_of(table) == {1: "negative_quantity"}


def test_duplicates_without_order_ids_are_kept_by_default(tmp_path):
    text = "customer_id,order_date,amount\na,2024-01-01,5\na,2024-01-01,5\n"
    assert load_csv(tmp_path, text).n_processed == 2
    forced = load_csv(tmp_path, text, extra={"cleaning": {"dedupe": "always"}})
    assert rules_of(forced) == {2: "duplicate_row"}


def test_cost_becomes_margin(tmp_path):
    table = load_csv(tmp_path, "customer_id,order_date,amount,cost\na,2024-01-01,10,6.5\n")
    assert table.data["margin"].tolist() == [3.5]


def test_customers_table_duplicates_and_pii(tmp_path):
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\na,2024-01-01,5\n")
    (tmp_path / "c.csv").write_text("customer_id,signup_date,region,email\n"
                                    "a,2023-05-01,North,a@x.org\na,2023-06-01,South,b@x.org\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv", "customers": "c.csv"},
                                   pii=["email"]))
    table = load_dataset(cfg, today=TODAY).tables["customers"]
    assert "email" not in table.data.columns
    assert table.data["region"].tolist() == ["North"]
    assert rules_of(table) == {2: "duplicate_customer"}
    assert not [c for c in table.quarantine.columns if "email" in c]   # not even set aside


def test_pseudonymized_ids_are_keyed_stable_and_everywhere(tmp_path, monkeypatch, capsys):
    from analysis import cli
    from analysis.data import pseudonymize
    from analysis.errors import ConfigError

    ids = pd.Series(["a", "b", "a"], dtype="object")
    one, again, other = (pseudonymize(ids, key=k) for k in ("k1", "k1", "k2"))
    assert one.tolist() == again.tolist() and one[0] == one[2] and one[0] != one[1]
    assert one[0] != other[0] and one[0].startswith("P") and len(one[0]) == 17
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\n a ,2024-01-01,5\n"
                                     "b,2024-01-02,oops\n")
    config = write_config(tmp_path, {"transactions": "tx.csv"},
                          output={"processed_dir": "p", "reports_dir": "r",
                                  "pseudonymize_ids": True})
    monkeypatch.delenv("CSL_PSEUDONYM_KEY", raising=False)
    with pytest.raises(ConfigError, match="CSL_PSEUDONYM_KEY"):
        load_config(config)
    monkeypatch.setenv("CSL_PSEUDONYM_KEY", "k1")
    table = load_dataset(load_config(config), today=TODAY).tables["transactions"]
    assert table.data["customer_id"].tolist() == [one[0]]
    assert table.quarantine["raw:customer_id"].tolist() == [one[1]]
    assert cli.main(["pseudonym", "--config", str(config), "a", "b"]) == 0
    assert capsys.readouterr().out.splitlines() == ["id,pseudonym", f"a,{one[0]}",
                                                    f"b,{one[1]}"]


def test_interactions_types_and_resolved_flags(tmp_path):
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\na,2024-01-01,5\n")
    (tmp_path / "i.csv").write_text("customer_id,date,type,score,resolved\n"
                                    "a,2024-01-02,Complaint,,no\na,2024-01-03,NPS,4,\n"
                                    "a,2024-01-04,,3,\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv",
                                              "interactions": "i.csv"}))
    table = load_dataset(cfg, today=TODAY).tables["interactions"]
    assert table.data["type"].tolist() == ["complaint", "survey"]
    assert table.data["resolved"].tolist()[0] is False or table.data["resolved"].iloc[0] == False  # noqa: E712
    assert rules_of(table) == {3: "missing_type"}


# --------------------------------------------------------------------------- outputs


def test_write_processed_keeps_clean_and_quarantined_rows(tmp_path):
    table_text = HEADER + "1,a,2024-01-01,10,completed\n2,b,notadate,5,completed\n"
    (tmp_path / "tx.csv").write_text(table_text)
    raw_digest = hashlib.sha256((tmp_path / "tx.csv").read_bytes()).hexdigest()
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    dataset = load_dataset(cfg, today=TODAY)
    written = write_processed(dataset, tmp_path / "out")
    quarantine = pd.read_csv(written["quarantine_transactions"], dtype=str)
    assert quarantine[["source_row", "rule"]].values.tolist() == [["2", "unparseable_date"]]
    summary = json.loads(written["data_quality"].read_text())
    assert summary["tables"][0]["rows_read"] == 2
    assert summary["quarantine"][0]["rule"] == "unparseable_date"
    pd.testing.assert_frame_equal(pd.read_parquet(written["transactions"]),
                                  dataset["transactions"], check_dtype=False)
    assert len(quarantine) == dataset.tables["transactions"].n_quarantined == 1
    # the raw file is never modified
    assert hashlib.sha256((tmp_path / "tx.csv").read_bytes()).hexdigest() == raw_digest


def test_quality_summary_counts_statuses_refunds_and_missing(tmp_path):
    table_text = HEADER + ("1,a,2024-01-01,10,completed\n2,a,2024-01-02,-4,returned\n"
                           "3,b,2024-02-01,0,cancelled\n")
    (tmp_path / "tx.csv").write_text(table_text)
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    summary = quality_summary(load_dataset(cfg, today=TODAY))
    measures = dict(zip(summary["transactions"]["measure"], summary["transactions"]["value"],
                        strict=True))
    assert measures["refund lines (negative amount)"] == 1
    assert measures["zero-amount lines"] == 1
    assert measures["status cancelled"] == 1 and measures["revenue (completed)"] == 10.0
    assert summary["tables"].loc[0, "customers"] == 2
    assert summary["monthly"]["revenue"].tolist() == [10.0]  # only completed lines
    assert np.all(summary["missing"]["n_missing"] == 0)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_reading_in_chunks_gives_the_same_tables(tmp_path, fmt):
    """Chunks of 7 rows: duplicates across chunk borders, bad rows' file rows and the
    processed rows are the same as when the whole file is one chunk."""
    from analysis.data import load_table

    rng = np.random.default_rng(3)
    n = 60
    frame = pd.DataFrame({
        "order_id": [f"O{i:03d}" for i in range(n)],
        "customer_id": [f"{i % 9:04d}" for i in range(n)],
        "order_date": ["2024-03-01"] * n,
        "amount": rng.integers(1, 500, n).astype(str),
        "status": ["completed"] * n,
    })
    frame.loc[[5, 20, 41], "amount"] = "n/a"                       # unparseable
    frame.loc[[8, 30], "order_date"] = "2027-01-01"                 # in the future
    frame = pd.concat([frame, frame.iloc[[2, 13, 33]]], ignore_index=True)  # copies later
    frame.loc[n + 3] = frame.loc[12]                                # copy in the next chunk
    cust = pd.DataFrame({"customer_id": ["a", "b", "c", "a", "d", "b", "e", "f", "a"],
                         "signup_date": ["2023-01-01"] * 9})
    if fmt == "csv":
        frame.to_csv(tmp_path / "tx.csv", index=False)
        cust.to_csv(tmp_path / "cu.csv", index=False)
    else:
        frame.to_parquet(tmp_path / "tx.parquet", index=False, row_group_size=5)
        cust.to_parquet(tmp_path / "cu.parquet", index=False)
    cfg = load_config(write_config(tmp_path, {"transactions": f"tx.{fmt}",
                                              "customers": f"cu.{fmt}"}))
    for table in ("transactions", "customers"):
        whole = load_table(cfg.tables[table], table=table, config=cfg, today=TODAY)
        chunked = load_table(cfg.tables[table], table=table, config=cfg, today=TODAY,
                             chunk_rows=7 if table == "transactions" else 2)
        assert chunked.n_read == whole.n_read == len(frame if table == "transactions" else cust)
        pd.testing.assert_frame_equal(chunked.data, whole.data)
        pd.testing.assert_frame_equal(chunked.quarantine, whole.quarantine)
    tx = load_table(cfg.tables["transactions"], table="transactions", config=cfg, today=TODAY,
                    chunk_rows=7)
    assert rules_of(tx) == {6: "unparseable_amount", 21: "unparseable_amount",
                            42: "unparseable_amount", 9: "date_in_future", 31: "date_in_future",
                            61: "duplicate_row", 62: "duplicate_row", 63: "duplicate_row",
                            64: "duplicate_row"}
    cu = load_table(cfg.tables["customers"], table="customers", config=cfg, today=TODAY,
                    chunk_rows=2)
    assert rules_of(cu) == {4: "duplicate_customer", 6: "duplicate_customer",
                            9: "duplicate_customer"}


# --------------------------------------------------------------------------- CSV for people

#: Cells a spreadsheet would evaluate (OWASP's CSV injection examples), and a number
#: stored as text.
FORMULAS = ['=HYPERLINK("http://x","click")', "+SUM(1+1)*cmd|' /C calc'!A0", "-2+3",
            "@SUM(1)", "\tx", "\rx", "-12"]


def csv_cells(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_neutralise_csv_cells_quotes_formula_text_and_nothing_else():
    n = len(FORMULAS)
    frame = pd.DataFrame({
        "text": pd.Series(FORMULAS, dtype="object"),
        "string": pd.Series(FORMULAS, dtype="string"),
        "category": pd.Categorical(FORMULAS),
        "mixed": pd.Series([-5.0, "=1", None, "a-b", "", 3, "'=already"], dtype="object"),
        "amount": np.linspace(-5.0, 1.0, n),
        "count": np.arange(-3, n - 3),
        "=evil header": ["plain"] * n,
    })
    before = frame.copy()
    out = neutralise_csv_cells(frame)
    quoted = ["'" + f for f in FORMULAS]
    for col in ("text", "string", "category"):
        assert out[col].tolist() == quoted, col
    assert out["mixed"].tolist()[:2] == [-5.0, "'=1"]
    assert out["mixed"].tolist()[3:] == ["a-b", "", 3, "'=already"]
    pd.testing.assert_series_equal(out["amount"], frame["amount"])  # numbers untouched
    pd.testing.assert_series_equal(out["count"], frame["count"])
    assert list(out.columns)[-1] == "'=evil header"
    pd.testing.assert_frame_equal(frame, before)                    # input not modified


def test_quarantine_csv_neutralises_formulas_in_raw_values(tmp_path):
    rows = [["customer_id", "order_date", "amount"], ["a", "2024-01-01", "5"],
            ['=HYPERLINK("http://x","click")', "notadate", "5"],
            ["\tx", "2024-01-01", "-2+3"],
            ["\rx", "@SUM(1)", "-12"]]
    with open(tmp_path / "tx.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}))
    dataset = load_dataset(cfg, today=TODAY)
    written = write_processed(dataset, tmp_path / "out")
    header, *cells = csv_cells(written["quarantine_transactions"])
    got = [dict(zip(header, row, strict=True)) for row in cells]
    assert [r["source_row"] for r in got] == ["2", "3", "4"]
    assert [r["raw:customer_id"] for r in got] == [
        """'=HYPERLINK("http://x","click")""", "'\tx", "'\rx"]
    assert [r["raw:order_date"] for r in got][2] == "'@SUM(1)"
    assert [r["raw:amount"] for r in got] == ["5", "'-2+3", "'-12"]
    # the quarantine in memory keeps the raw values
    q = dataset.tables["transactions"].quarantine
    assert q["raw:customer_id"].tolist()[-1] == "\rx"


def test_write_csv_writes_the_bytes_pandas_writes(tmp_path):
    """The CSVs people read are written by DuckDB (several times faster than pandas'
    ``to_csv`` on a million customers), byte for byte as ``to_csv`` writes them: text
    quoted only where needed, empty text and missing values as nothing, flags as
    True/False, float32 and float64 at their own shortest digits, times as pandas writes
    them, CRLF line ends; a frame of a kind it does not know goes through pandas."""
    frame = pd.DataFrame({
        "text": ["x", "", None, 'q"uote', "c,omma", "cr\rx", "nl\nx", " sp ", "=1"],
        "num": [1.5, np.nan, -0.0, 1e-7, 1e16, 123456789012.0, 0.1, np.inf, -2.0],
        "single": np.array([27.6171875, 0.1, np.nan, 1e-8, 3, -1.25, 7e20, 0, 2 / 3],
                           dtype="float32"),
        "flag": [True, False] * 4 + [True],
        "level": pd.Categorical(["u", None, "v", "u", "v", "u", "v", "u", "-u"]),
        "count": pd.array([1, None, 3, 4, 5, 6, 7, 8, 9], dtype="Int64"),
        "whole": np.arange(9, dtype="int64") - 4,
        "day": pd.to_datetime(["2026-01-02"] * 8 + [None]),
        "when": pd.to_datetime(["2026-01-02 03:04:05"] * 8 + ["2026-01-02 00:00:00"]),
        "with,comma": ["a"] * 9})
    assert data._csv_ready(neutralise_csv_cells(frame)) is not None    # DuckDB writes it
    written = write_csv(tmp_path / "fast.csv", frame).read_bytes()
    expected = neutralise_csv_cells(frame).to_csv(index=False, lineterminator="\r\n")
    assert written == expected.encode()
    assert written.count(b"\r\n") == 10 and b"'=1" in written and b"'-u" in written
    # a column of lists: pandas writes it, as before
    odd = frame.assign(text=[[1]] * 9)
    assert data._csv_ready(odd) is None
    # one column with a missing cell: DuckDB would write a blank line, which readers skip
    one = frame[["num"]]
    assert data._csv_ready(one) is None
    assert write_csv(tmp_path / "one.csv", one).read_bytes() == one.to_csv(
        index=False, lineterminator="\r\n").encode()
    assert write_csv(tmp_path / "odd.csv", odd).read_bytes() == neutralise_csv_cells(
        odd).to_csv(index=False, lineterminator="\r\n").encode()
