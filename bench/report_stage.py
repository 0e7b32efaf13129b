"""The report stage's work over every customer, on a run's folder, each part in a Python
process of its own (seconds and peak memory): the customer table people read
(``customers.parquet`` and ``customers.csv``, streamed from the run store), the lists
per action (one pass, sorted by DuckDB) and the executive page's figures (every section
of ``narrative``, querying the store where it lies). Also the same table written the way
the runner wrote it before (the joined table read whole into pandas, then written), and
whether the two ways' files are equal to the byte.

    python bench/report_stage.py bench/out/e2e-1m/processed/s19a bench/e2e-1m.yaml > out.json

The run folder is not changed: the tables are written into a temporary folder that links
the run's step tables. Prints one JSON object; copy it to ``bench/results/`` with a note.
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from analysis.bench import in_own_process
from analysis.memory import peak_rss_mb

PARTS = ("export", "whole", "lists", "page")
LIMIT = "2000MB"        # DuckDB's share of e2e-1m's 4 GB stage budget, as in a run


def linked(run: Path, out: Path) -> Path:
    """A folder whose step tables are the run's (links), for a run store to write into."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("segments", "models", "strategy", "profile.json", "models.json",
                 "data_quality.json"):
        if (run / name).exists() and not (out / name).exists():
            (out / name).symlink_to((run / name).resolve())
    return out


def one(part: str, run: Path, config: Path, out: Path) -> dict:
    from analysis.data import write_csv
    from analysis.store import RunStore

    start = time.perf_counter()
    if part == "export":
        RunStore(linked(run, out / "export")).export_customers(memory_limit=LIMIT)
    elif part == "whole":
        store = RunStore(linked(run, out / "whole"))
        table = store.read_customers()
        table.to_parquet(store.export, index=False)
        write_csv(store.export_csv, table)
    elif part == "lists":
        from analysis.narrative import write_lists

        write_lists(run, out / "lists", memory_limit=LIMIT)
    else:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        from analysis import narrative, plots

        page = narrative.load_page(config, run, run_id="bench", report_dir=out / "page")
        for section in ("title", "bottom_line", "lists", "key_numbers", "changes",
                        "portfolio", "churn", "value", "actions", "phaseout", "trust",
                        "data_and_assumptions", "for_analysts"):
            for block in getattr(narrative, section)(page):
                if isinstance(block, Figure):
                    plots.close(block)
    return {"seconds": round(time.perf_counter() - start, 1),
            "python_peak_mib": round(peak_rss_mb(resource.RUSAGE_SELF))}


if __name__ == "__main__" and sys.argv[1] == "--one":
    print(json.dumps(one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]),
                         Path(sys.argv[5]))))
elif __name__ == "__main__":
    run, config = Path(sys.argv[1]), Path(sys.argv[2])
    out = Path(tempfile.mkdtemp(prefix="report-stage-"))
    result = {"run": str(run), "duckdb_memory_limit": LIMIT}
    for part in PARTS:
        result[part] = in_own_process(__file__, part, run, config, out)
    result["equal"] = {name: (out / "export" / name).read_bytes()
                       == (out / "whole" / name).read_bytes()
                       for name in ("customers.csv",)}
    print(json.dumps(result, indent=2))
