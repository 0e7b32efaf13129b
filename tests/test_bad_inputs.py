"""The bad-input suite: one generated input file per case, run through the data step of
every run (``python -m analysis validate``), each asserting its exact outcome: a clean
run with the problem counted and the bad rows quarantined with a reason, or a stop with
an exit code and a message naming the file, column, rule and examples. Never a raw
traceback. ``docs/bad_inputs.md`` lists the same cases for users (checked below).

Cases about the amount of data (one customer, a history shorter than a horizon, everyone
or no one churned) are judged where they bite: the profile and the models.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import cli
from analysis import features as F
from analysis import models as M
from analysis import segments as S
from analysis.config import AnalysisParams
from analysis.errors import InsufficientDataError

ROOT = Path(__file__).resolve().parents[1]
H = "order_id,customer_id,order_date,amount\n"


def rows(n: int, *, start: int = 0, customers: int = 5) -> str:
    """``n`` good lines: order ids from ``start``, dates in 2024, amounts 10.5 + i."""
    return "".join(f"{start + i},c{i % customers},2024-{i % 12 + 1:02d}-{i % 28 + 1:02d},"
                   f"{10.5 + i}\n" for i in range(n))


def one_percent_malformed() -> bytes:
    n = 1_000_000
    i = np.arange(n)
    dates = pd.Series(pd.to_datetime("2023-01-01") + pd.to_timedelta(i % 700, unit="D"))
    frame = pd.DataFrame({"order_id": i, "customer_id": "c" + (i % 50_000).astype(str),
                          "order_date": dates.dt.strftime("%Y-%m-%d"),
                          "amount": (i % 97 + 1).astype(float).astype(str)})
    bad = i % 100 == 7                       # exactly 1 %: half bad dates, half bad amounts
    frame.loc[bad & (i % 200 == 7), "order_date"] = "31/02/2024x"
    frame.loc[bad & (i % 200 == 107), "amount"] = "n/a"
    return frame.to_csv(index=False).encode()


@dataclass
class Case:
    name: str
    content: bytes | Callable[[], bytes]
    exit: int = 0
    fragments: tuple[str, ...] = ()          # in the message (stop) or the summary (clean)
    quarantine: dict[str, int] = field(default_factory=dict)   # rule -> rows
    processed: int | None = None
    options: dict = field(default_factory=dict)
    check: Callable[[pd.DataFrame], None] | None = None


def _amounts(expected):
    def check(data):
        assert data["amount"].tolist() == pytest.approx(expected)
    return check


def _ids(expected):
    def check(data):
        assert data["customer_id"].tolist() == expected
    return check


CASES = [
    Case("empty file", b"", exit=3, fragments=("rule: empty_file", "the file is empty")),
    Case("header only", H.encode(), exit=3,
         fragments=("rule: no_rows", "header but no data rows", "'amount'")),
    Case("wrong separator", ("order_id;customer_id;order_date;amount\n1;a;2024-01-05;10\n"
                             ).encode(), exit=3,
         fragments=("rule: required_column", "seems to use ';'")),
    Case("latin-1 file read as UTF-8",
         ("order_id,customer_id,order_date,amount,category\n1,a,2024-01-05,10,Bücher\n"
          ).encode("latin-1"), exit=3,
         fragments=("rule: encoding", "cannot be decoded as utf-8", "latin-1")),
    Case("latin-1 file with its encoding set",
         ("order_id,customer_id,order_date,amount,category\n1,a,2024-01-05,10,Bücher\n"
          ).encode("latin-1"), options={"encoding": "latin-1"}, processed=1,
         check=lambda d: d["category"].tolist() == ["Bücher"] or pytest.fail("category")),
    Case("UTF-8 with a byte-order mark", b"\xef\xbb\xbf" + (H + rows(3)).encode(),
         processed=3, check=lambda d: d["order_id"].notna().all() or pytest.fail("id")),
    Case("UTF-16", (H + rows(3)).encode("utf-16"), processed=3),
    Case("required column missing", b"order_id,customer_id,order_date\n1,a,2024-01-05\n",
         exit=3, fragments=("rule: required_column", "column: amount", "'order_date'")),
    Case("columns renamed by case and spaces",
         (" Order ID ,CUSTOMER_ID,Order Date,AMOUNT\n" + rows(3)).encode(), processed=3,
         fragments=("matched",)),
    Case("dates in three formats in one column",
         (H + rows(8) + "8,c1,05/01/2024,5\n9,c2,Jan 5 2024,6\n").encode(),
         quarantine={"unparseable_date": 2}, processed=8),
    Case("dates in the future", (H + rows(4) + "4,c1,2031-01-01,5\n").encode(),
         quarantine={"date_in_future": 1}, processed=4),
    Case("thousands separators, currency signs and decimal commas",
         ("order_id;customer_id;order_date;amount\n1;a;2024-01-05;€ 1.234,50\n"
          "2;b;2024-01-06;12,00 €\n3;c;2024-01-07;1.000\n").encode(),
         options={"sep": ";", "decimal": ",", "thousands": "."}, processed=3,
         check=_amounts([1234.5, 12.0, 1000.0])),
    Case("negative and zero amounts", (H + rows(2) + "2,c1,2024-03-01,-20\n"
                                          "3,c2,2024-03-02,0\n").encode(),
         processed=4, fragments=("refund lines (negative amount) 1", "zero-amount lines 1"),
         check=_amounts([10.5, 11.5, -20.0, 0.0])),
    Case("NaN and infinite amounts", (H + rows(2) + "2,c1,2024-03-01,nan\n3,c1,2024-03-01,inf\n"
                                      "4,c2,2024-03-02,-inf\n5,c3,2024-03-03,\n").encode(),
         quarantine={"unparseable_amount": 1, "non_finite_amount": 2, "missing_amount": 1},
         processed=2),
    Case("duplicated rows", (H + rows(3) + "2,c2,2024-03-03,12.5\n").encode(),
         quarantine={"duplicate_row": 1}, processed=3),
    Case("duplicated order ids with different amounts",
         (H + "1,a,2024-01-05,10\n1,a,2024-01-05,12\n2,b,2024-01-06,10\n").encode(),
         processed=3, check=_amounts([10.0, 12.0, 10.0])),
    Case("numeric ids with leading zeros",
         (H + "1,007,2024-01-05,10\n2,0042,2024-01-06,10\n").encode(),
         processed=2, check=_ids(["007", "0042"])),
    Case("ids with stray whitespace", (H + "1,  a ,2024-01-05,10\n2,a,2024-01-06,10\n"
                                           "3,\tb,2024-01-07,5\n").encode(),
         processed=3, check=_ids(["a", "a", "b"])),
    Case("a customer with one order", (H + rows(6, customers=3) + "9,solo,2024-05-05,8\n"
                                       ).encode(), processed=7),
    Case("a single category", ("order_id,customer_id,order_date,amount,category\n"
                               + "".join(f"{i},c{i % 3},2024-01-{i + 1:02d},5,books\n"
                                         for i in range(6))).encode(), processed=6),
    Case("extremely large values", (H + rows(3) + "3,c1,2024-03-01,1e12\n").encode(),
         quarantine={"amount_out_of_range": 1}, processed=3),
    Case("1 % of rows malformed in a 1M-row file", one_percent_malformed,
         quarantine={"unparseable_date": 5_000, "unparseable_amount": 5_000},
         processed=990_000),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    content = case.content() if callable(case.content) else case.content
    (tmp_path / "tx.csv").write_bytes(content)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bad-input", "tables": {"transactions": {"path": "tx.csv", **case.options}},
        "output": {"processed_dir": "processed", "reports_dir": "reports"}}))
    before = (tmp_path / "tx.csv").read_bytes()
    code = cli.main(["validate", "--config", str(config), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.exit, err
    assert (tmp_path / "tx.csv").read_bytes() == before          # raw input untouched
    if case.exit:
        assert err.startswith("error: ") and str(tmp_path / "tx.csv") in err
        for fragment in case.fragments:
            assert fragment in err
        return
    summary = " ".join(out.split())
    for fragment in case.fragments:
        assert fragment in summary
    quality = json.loads((tmp_path / "out" / "data_quality.json").read_text())
    table = next(t for t in quality["tables"] if t["table"] == "transactions")
    quarantined = pd.read_csv(tmp_path / "out" / "quarantine" / "transactions.csv", dtype=str,
                              keep_default_na=False)
    assert quarantined["rule"].value_counts().to_dict() == case.quarantine
    assert (quarantined["rule"] != "").all() and (quarantined["detail"] != "").all()
    assert table["rows_read"] == table["rows_processed"] + table["rows_quarantined"]
    if case.processed is not None:
        assert table["rows_processed"] == case.processed
    if case.check is not None:
        case.check(pd.read_parquet(tmp_path / "out" / "clean" / "transactions.parquet"))


def test_every_case_is_listed_for_users():
    page = (ROOT / "docs" / "bad_inputs.md").read_text()
    listed = {m.strip().casefold() for m in re.findall(r"^\| ([^|]+?) \|", page, re.M)}
    for case in CASES:
        assert case.name.casefold() in listed, case.name
    for name in AMOUNT_OF_DATA:
        assert name.casefold() in listed, name


# --------------------------------------------------------------------------- amount of data

AMOUNT_OF_DATA = ("a dataset with one customer", "a history shorter than one horizon",
                  "all customers churned", "no customer churned")


def _connect(lines: pd.DataFrame):
    return F.connect({"transactions": lines.assign(order_date=pd.to_datetime(
        lines["order_date"]))})


def _weekly(customers: int, start: str, end: str) -> pd.DataFrame:
    days = pd.date_range(start, end, freq="7D")
    return pd.DataFrame([{"order_id": f"{c}-{d:%Y%m%d}", "customer_id": f"c{c}",
                          "order_date": d, "amount": 20.0} for c in range(customers)
                         for d in days])


def test_a_dataset_with_one_customer_stops_with_a_clear_reason():
    con = _connect(_weekly(1, "2024-01-01", "2025-06-30"))
    with pytest.raises(InsufficientDataError) as err:
        S.profile_customers(con, as_of=dt.date(2025, 7, 1), params=AnalysisParams())
    assert err.value.exit_code == 4
    assert "1 customer(s) with a purchase" in str(err.value)
    assert "analysis.min_customers" in str(err.value)


def _fit(con, as_of):
    return M.fit_and_evaluate(con, as_of=as_of, horizon_days=90, n_cutoffs=6, step_days=30)


def test_a_history_shorter_than_one_horizon_skips_the_models():
    con = _connect(_weekly(300, "2025-05-01", "2025-06-30"))
    with pytest.raises(InsufficientDataError, match="too short"):
        _fit(con, dt.date(2025, 7, 1))


def test_all_customers_churned_skips_the_models():
    # scored a year after the last order: every snapshot's customers churned
    con = _connect(_weekly(300, "2023-01-01", "2024-06-30"))
    with pytest.raises(InsufficientDataError, match=r"\(\d[\d,]* churned\).*20 non-churners"):
        _fit(con, dt.date(2025, 7, 1))


def test_no_customer_churned_skips_the_models():
    con = _connect(_weekly(300, "2023-01-01", "2025-06-30"))
    with pytest.raises(InsufficientDataError, match=r"\(0 churned\)"):
        _fit(con, dt.date(2025, 7, 1))
