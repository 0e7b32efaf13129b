"""The row rules judged after parsing (:data:`analysis.data.ROW_RULES`) and the
duplicates, which DuckDB judges over the whole file: precedence, what counts as a copy,
and the original values of rows set aside after the file was read (more on loading in
``tests/test_data.py``)."""

import datetime as dt

from analysis.config import load_config
from analysis.data import ROW_RULES, load_table

from .conftest import write_config

TODAY = dt.date(2026, 1, 15)


def load(tmp_path, text, *, chunk_rows=250_000, **extra):
    (tmp_path / "tx.csv").write_text(text)
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv"}, **extra))
    return load_table(cfg.tables["transactions"], table="transactions", config=cfg,
                      today=TODAY, chunk_rows=chunk_rows)


def test_a_row_breaking_several_rules_is_set_aside_for_the_first():
    names = [rule for rule, _, _ in ROW_RULES["transactions"]]
    assert names.index("date_in_future") < names.index("amount_out_of_range")
    assert names.index("non_finite_amount") < names.index("amount_out_of_range")
    assert names.index("negative_quantity") < names.index("non_finite_margin")


def test_precedence_and_details_of_the_row_rules(tmp_path):
    table = load(tmp_path, "order_id,customer_id,order_date,amount,quantity,cost\n"
                           "1,a,2031-01-01,5e12,1,1\n"    # future and out of range
                           "2,b,2024-01-01,inf,1,1\n"     # not finite, and out of range
                           "3,c,2024-01-01,-inf,-1,1\n"
                           "4,d,2024-01-01,5,-2,-inf\n"   # negative quantity; margin inf
                           "5,e,2024-01-01,5,1,inf\n"     # margin = amount - cost = -inf
                           "6,f,1970-01-01,5,1,1\n"
                           "7,g,2024-01-01,5,1,1\n")
    q = table.quarantine.set_index("source_row")
    assert q["rule"].to_dict() == {1: "date_in_future", 2: "non_finite_amount",
                                   3: "non_finite_amount", 4: "negative_quantity",
                                   5: "non_finite_margin", 6: "date_too_old"}
    assert q["detail"].to_dict() == {1: "order_date=2031-01-01", 2: "amount=inf",
                                     3: "amount=-inf", 4: "quantity=-2.0",
                                     5: "margin=-inf", 6: "order_date=1970-01-01"}
    assert table.data["order_id"].tolist() == ["7"]


def test_copies_are_judged_on_parsed_values(tmp_path):
    """A copy is a row whose parsed values all equal an earlier row's: ``5`` and
    ``5.00`` are the same amount, and so are ``0`` and ``-0.0``; another amount is not."""
    table = load(tmp_path, "order_id,customer_id,order_date,amount\n"
                           "1,a,2024-01-01,0\n1,a,2024-01-01,-0.0\n1,a,2024-01-01,5\n"
                           "1,a,2024-01-01,5.00\n1,a,2024-01-01,5.01\n",
                 chunk_rows=1)
    assert table.quarantine[["source_row", "rule"]].values.tolist() == [
        [2, "duplicate_row"], [4, "duplicate_row"]]
    assert table.data["amount"].tolist() == [0.0, 5.0, 5.01]


def test_a_copy_found_later_keeps_its_own_original_values(tmp_path):
    """Duplicates are judged once the whole file is read; the quarantine still holds
    each copy's own text (it parses to the same values as the row it copies)."""
    table = load(tmp_path, "order_id,customer_id,order_date,amount,status\n"
                           "1, a ,2024-01-01,5,Completed\n"
                           "2,b,2030-01-01,7,completed\n"
                           "3,b,2024-01-02,x,completed\n"
                           "1,a,2024-01-01,5.00,completed\n"
                           "1,a,2024-01-01,5,completed\n",
                 chunk_rows=2)
    q = table.quarantine
    assert q["source_row"].tolist() == [2, 3, 4, 5]                      # in file order
    assert q["rule"].tolist() == ["date_in_future", "unparseable_amount", "duplicate_row",
                                  "duplicate_row"]
    assert q["raw:customer_id"].tolist()[2:] == ["a", "a"]
    assert q["raw:amount"].tolist()[2:] == ["5.00", "5"]
    assert table.data["customer_id"].tolist() == ["a"]
    assert table.n_processed + table.n_quarantined == table.n_read == 5


def test_customer_ids_seen_before_are_set_aside_with_their_id(tmp_path):
    (tmp_path / "tx.csv").write_text("customer_id,order_date,amount\na,2024-01-01,5\n")
    (tmp_path / "c.csv").write_text("customer_id,signup_date\na,2023-01-01\nb,2031-01-01\n"
                                    "b,2023-01-01\n a,2023-02-01\n")
    cfg = load_config(write_config(tmp_path, {"transactions": "tx.csv", "customers": "c.csv"}))
    table = load_table(cfg.tables["customers"], table="customers", config=cfg, today=TODAY,
                       chunk_rows=1)
    assert table.quarantine[["source_row", "rule", "detail"]].values.tolist() == [
        [2, "date_in_future", "signup_date=2031-01-01"],
        [4, "duplicate_customer", "customer_id='a' seen before"]]
    assert table.data["customer_id"].tolist() == ["a", "b"]


def test_a_copy_matches_the_columns_the_contract_does_not_read_too(tmp_path):
    """Two lines of one order with the same date, quantity and amount but different
    products are two purchases, not a copy: the file's other columns (a product code, a
    description) count, in every chunk; only a line equal in every column is a copy."""
    text = ("order_id,customer_id,order_date,amount,quantity,stock_code,description\n"
            "1,a,2024-01-01,2.5,3,85123A,HEART T-LIGHT HOLDER\n"
            "1,a,2024-01-01,2.5,3,71053,WHITE LANTERN\n"          # another product
            "1,a,2024-01-01,2.5,3,85123A,HEART T-LIGHT HOLDER\n"  # a copy of row 1
            "1,a,2024-01-01,2.5,3,85123A,\n"                      # no description: not
            "1,a,2024-01-01,2.5,3,85123A,\n")                     # ... but this one is
    for chunk_rows in (250_000, 1):
        table = load(tmp_path, text, chunk_rows=chunk_rows)
        assert table.quarantine[["source_row", "rule"]].values.tolist() == [
            [3, "duplicate_row"], [5, "duplicate_row"]]
        assert table.n_processed == 3
        assert table.data["amount"].sum() == 7.5
    # the file's other columns are compared, not kept
    assert list(table.data.columns) == ["customer_id", "order_date", "amount", "quantity",
                                        "order_id", "status"]
