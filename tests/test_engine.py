"""The engine layer's DuckDB side: frames come through Arrow with the types DuckDB's own
``.df()`` gives (the feature code and the models rely on them)."""

from __future__ import annotations

import duckdb
import pandas as pd

from analysis.engine import DuckDBEngine, as_engine


def test_frames_through_arrow_have_the_types_of_duckdbs_df():
    con = duckdb.connect()
    query = """
        SELECT 'c' || i::VARCHAR AS text, i::BIGINT AS whole,
               CASE WHEN i % 2 = 0 THEN i END::BIGINT AS whole_missing,
               (i % 3)::INTEGER AS small, i / 4 AS ratio,
               CASE WHEN i % 2 = 0 THEN TRUE END AS flag_missing, i % 2 = 0 AS flag,
               DATE '2024-02-28' + i::INTEGER AS day,
               TIMESTAMP '2024-02-28 23:59:59.999999' AS moment,
               (i * 1.25)::DECIMAL(12, 2) AS money,
               CASE WHEN i = 1 THEN 'x' END AS text_missing
        FROM range(5) t(i)"""
    got, expected = DuckDBEngine(con).frame(query), con.execute(query).df()
    assert got.dtypes.to_dict() == expected.dtypes.to_dict()
    pd.testing.assert_frame_equal(got, expected)
    assert str(got["whole_missing"].dtype) == "Int64" and got["money"].dtype == "float64"


def test_an_engine_drops_only_what_it_made():
    con = duckdb.connect()
    con.execute("CREATE TABLE kept AS SELECT 1 AS x")
    eng = as_engine(con)
    assert as_engine(eng) is eng
    eng.table("t", "SELECT 2 AS x")
    eng.view("v", "SELECT x + 1 AS y FROM t")
    assert eng.rows("SELECT y FROM v") == [(3,)] and "v" in eng.views()
    assert eng.has("v") and eng.has("t") and eng.has("kept") and not eng.has("never_made")
    eng.drop("v", "t", "kept", "never_made")
    assert "v" not in eng.views() and not eng.has("v") and not eng.has("t")
    assert con.execute("SELECT COUNT(*) FROM duckdb_tables() WHERE table_name = 't'"
                       ).fetchall() == [(0,)]
    assert con.execute("SELECT x FROM kept").fetchall() == [(1,)]


def test_a_folder_of_parquet_part_files_reads_as_one_table(tmp_path):
    """Spark writes a table as a folder of part files: connect reads it as the table."""
    from analysis import features as F

    tx = pd.DataFrame({"customer_id": ["A", "A", "B", "C"],
                       "order_date": pd.to_datetime(["2024-01-01", "2024-02-01",
                                                     "2024-01-15", "2024-03-01"]),
                       "amount": [10.0, 20.0, 5.0, 7.5]})
    (tmp_path / "parts" / "transactions.parquet").mkdir(parents=True)
    tx.iloc[:2].to_parquet(tmp_path / "parts" / "transactions.parquet" / "part-0.parquet")
    tx.iloc[2:].to_parquet(tmp_path / "parts" / "transactions.parquet" / "part-1.parquet")
    got = F.build_features(F.connect(tmp_path / "parts"), cutoff="2024-04-01")
    expected = F.build_features(F.connect({"transactions": tx}), cutoff="2024-04-01")
    assert len(got) == 3
    pd.testing.assert_frame_equal(got, expected)
