"""Command line: a thin layer over the package's functions.

Expected failures (:class:`analysis.errors.AnalysisError`) print one readable message
and exit with the error's code; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.errors import AnalysisError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m analysis``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Customer Strategy Lab: profile customers, model churn and value, "
                    "decide actions, render reports.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("demo-data", help="generate the demo CRM world (with ground truth)",
                       description="Generate a synthetic CRM world, deterministic for a "
                                   "seed: transactions, customers, interactions, a past "
                                   "retention campaign, and the ground truth in "
                                   "OUT/ground_truth/.")
    p.add_argument("--customers", type=int, default=20_000, help="number of customers")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--out", type=Path, default=Path("data/raw/demo"), help="output folder")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet",
                   help="file format of the input tables")
    p.add_argument("--mode", choices=["transactions", "snapshot"], default="transactions",
                   help="transactions: an order log and CRM tables; snapshot: one "
                        "telecom-style table per customer with a churn flag (customers.csv)")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("validate", help="load, validate and clean the inputs; print a summary",
                       description="Run load + validate + clean for a config, write the "
                                   "processed tables and quarantine files, print the "
                                   "data-quality summary.")
    p.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for processed tables and quarantine files (default: "
                        "<processed_dir>/validate-<timestamp>)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("pseudonym", help="print the pseudonyms of customer ids",
                       description="For a config with output.pseudonymize_ids on: print "
                                   "'id,pseudonym' for each id given (or read one per line "
                                   "from standard input), with the key from the config's "
                                   "environment variable, to map report ids back.")
    p.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    p.add_argument("ids", nargs="*", help="customer ids (default: standard input)")
    p.set_defaults(func=_pseudonym)

    p = sub.add_parser("features", help="write point-in-time features and labels at a cutoff",
                       description="Features of every customer with a purchase before "
                                   "CUTOFF, and labels over [CUTOFF, CUTOFF + H days).")
    p.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    p.add_argument("--cutoff", required=True, type=_date, help="cutoff date YYYY-MM-DD")
    p.add_argument("--horizon-days", type=int, default=None,
                   help="label horizon in days (default: the config's)")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p.add_argument("--engine", choices=("duckdb", "spark"), default=None,
                   help="where the SQL runs (default: the config's analysis.engine); "
                        "spark uses the config's spark section")
    p.set_defaults(func=_features)

    p = sub.add_parser("run", help="run the whole pipeline and publish the report",
                       description="Execute the notebooks with papermill, render HTML with "
                                   "nbconvert, and publish data/processed/<run_id>/ and "
                                   "reports/<run_id>/; reports/latest moves only after a "
                                   "successful run. Exit codes: 0 ok, 2 config, 3 data, "
                                   "4 too little data, 5 notebook failed.")
    p.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    p.add_argument("--run-id", default=None, help="run folder name (default: UTC timestamp)")
    p.add_argument("--as-of", type=_date, default=None,
                   help="scoring date YYYY-MM-DD (default: config, else after last order)")
    p.add_argument("--notebooks", type=Path, default=None, help="notebooks folder")
    p.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="benchmarks (speed, memory, accuracy)",
                           description="Benchmarks; each writes OUT/<name>.json.")
    bench_sub = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    p = bench_sub.add_parser("features", help="feature build: DuckDB vs pandas vs scan floor",
                             description="Generate (or reuse) demo data of about LINES order "
                                         "lines, build the features at one cutoff with the "
                                         "project (DuckDB), with pandas and with a scan "
                                         "floor; medians of REPEATS runs to OUT/features.json.")
    _demo_data_arguments(p)
    p.add_argument("--repeats", type=int, default=3, help="runs per method (median)")
    p.add_argument("--memory-limit", default=None,
                   help="DuckDB memory limit for the project's build, e.g. 1GB (spills to "
                        "disk beyond it)")
    p.set_defaults(func=_bench_features)
    p = bench_sub.add_parser("spark", help="feature build: Spark (local mode) vs DuckDB",
                             description="Generate (or reuse) demo data of about LINES order "
                                         "lines and build the features at one cutoff on "
                                         "DuckDB and on Spark (needs `make spark`); one run "
                                         "each, to OUT/spark.json.")
    _demo_data_arguments(p)
    p.add_argument("--master", default="local[*]", help="Spark master (default local[*])")
    p.add_argument("--driver-memory", default="4g", help="Spark driver memory (default 4g)")
    p.set_defaults(func=_bench_spark)
    p = bench_sub.add_parser("stages", help="per-step seconds and memory inside the stages",
                             description="Generate (or reuse) the demo world of about LINES "
                                         "order lines and run the data-quality, profile, "
                                         "churn-model and strategy stages as their notebooks "
                                         "do, each in a "
                                         "fresh process, timing the steps inside them; writes "
                                         "OUT/stages.json.")
    _demo_data_arguments(p)
    p.add_argument("--memory-limit", default="6GB",
                   help="the run's memory budget per stage (analysis.memory_limit)")
    p.add_argument("--stage", action="append", default=None,
                   choices=["01_data_quality", "02_customer_profile", "03_churn_model",
                            "05_strategy"],
                   help="only this stage (repeat for several; the later stages need the "
                        "earlier ones' output in OUT); default: all four")
    p.add_argument("--label", default="", help="what was measured (a branch, a commit)")
    p.set_defaults(func=_bench_stages)
    p = bench_sub.add_parser("cdnow", help="CDNOW holdout: models vs BG/NBD + Gamma-Gamma",
                             description="Calibration 1997-01..09, holdout 1997-10..1998-06; "
                                         "writes OUT/cdnow.json and OUT/cdnow.md.")
    p.add_argument("--data", type=Path, required=True,
                   help="folder with CDNOW_master.txt and CDNOW_sample.txt")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_bench_cdnow)
    p = bench_sub.add_parser("strategy", help="strategy targeting vs the ground-truth oracle",
                             description="Generate a demo world, run the pipeline, and judge "
                                         "its retention targeting, phase-out list and "
                                         "fairness audit against the ground truth; writes "
                                         "OUT/strategy.json.")
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_bench_strategy)
    p = bench_sub.add_parser("results", help="render bench/RESULTS.md from bench/results/*.json",
                             description="Render the results table from the JSON files.")
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    p.set_defaults(func=_bench_results)
    bench.set_defaults(func=lambda args: bench.print_help())
    return parser


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from exc


def _demo_data(args: argparse.Namespace) -> int:
    from analysis.demo import write_demo, write_snapshot_demo

    if args.customers < 1:
        raise AnalysisError("--customers must be at least 1")
    if args.mode == "snapshot":
        written = write_snapshot_demo(args.out, n_customers=args.customers, seed=args.seed)
    else:
        written = write_demo(args.out, n_customers=args.customers, seed=args.seed,
                             fmt=args.format)
    for name, path in written.items():
        print(f"{name:>20}: {path}")
    return 0


def _pseudonym(args: argparse.Namespace) -> int:
    import os

    import pandas as pd

    from analysis.config import load_config
    from analysis.data import pseudonymize
    from analysis.errors import ConfigError

    config = load_config(args.config)
    if not config.output.pseudonymize_ids:
        raise ConfigError("output.pseudonymize_ids is off: reports carry the real ids",
                          path=args.config, key="output.pseudonymize_ids")
    ids = [i.strip() for i in (args.ids or sys.stdin.read().splitlines()) if i.strip()]
    codes = pseudonymize(pd.Series(ids, dtype="object"),
                         key=os.environ[config.output.pseudonym_key_env])
    print("id,pseudonym")
    for raw, code in zip(ids, codes, strict=True):
        print(f"{raw},{code}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.config import load_config
    from analysis.data import quality_step
    from analysis.report import default_run_id

    config = load_config(args.config)
    out = args.out or config.output.processed_dir / f"validate-{default_run_id()}"
    summary = quality_step(config, out)         # (a run's data step: on Spark with spark)
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.max_colwidth", 80):
        for row in summary["tables"].itertuples():
            print(f"{row.table}: {row.rows_read:,} rows read, {row.rows_processed:,} "
                  f"processed, {row.rows_quarantined:,} quarantined; {row.customers:,} "
                  f"customers; {row.date_min} to {row.date_max}")
        if len(summary["quarantine"]):
            print("\nquarantined rows by rule:")
            print(summary["quarantine"].to_string(index=False))
        if len(summary["transactions"]):
            print("\ntransactions:")
            print(summary["transactions"].to_string(index=False, header=False))
        if len(summary["notes"]):
            print("\nnotes:")
            print(summary["notes"].to_string(index=False))
    print(f"\nprocessed tables and quarantine files: {out}")
    for name in config.tables:
        print(f"  quarantine_{name}: {Path(out) / 'quarantine' / f'{name}.csv'}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from analysis import data
    from analysis.config import load_config
    from analysis.features import connect, connect_spark, resolve_horizon_days, write_features

    config = load_config(args.config)
    engine = args.engine or config.analysis.engine
    if engine == "spark":
        # loaded and validated by the executors, as in a run's data-quality step
        from analysis.engine import SparkEngine, spark_session

        spark = SparkEngine(spark_session(config.spark.master, config.spark.conf))
        tables = {name: (t.data.drop(data.FILE_ROW) if isinstance(t, data.SparkCleanTable)
                         else t.data)
                  for name, t in data.load_dataset_on_spark(config, spark).items()}
        con = connect_spark(tables, session=spark.session)
    else:
        dataset = data.load_dataset(config)
        con = connect({name: dataset.get(name) for name in dataset.tables})
    horizon = args.horizon_days or resolve_horizon_days(
        con, horizon_days=config.analysis.horizon_days, cutoff=args.cutoff)
    # (on Spark the executors write the table: the driver never holds it)
    n = write_features(con, args.out, cutoff=args.cutoff, horizon_days=horizon,
                       exclude_attributes=config.protected + config.pii)
    print(f"{n:,} customers at cutoff {args.cutoff}, horizon {horizon} days, "
          f"on {engine}: {args.out}")
    return 0


def _bench_features(args: argparse.Namespace) -> int:
    import json

    from analysis.bench import bench_features

    report = bench_features(lines=args.lines, out=args.out, repeats=args.repeats,
                            data_dir=args.data, memory_limit=args.memory_limit)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0 if report["identical"] else 1


def _demo_data_arguments(p: argparse.ArgumentParser) -> None:
    """--lines, --out and --data of the benchmarks on generated demo logs."""
    p.add_argument("--lines", type=int, required=True, help="order lines to generate")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with (or for) the demo data; default OUT/data-LINES")


def _bench_spark(args: argparse.Namespace) -> int:
    import json

    from analysis.bench import bench_spark

    report = bench_spark(lines=args.lines, out=args.out, data_dir=args.data,
                         master=args.master, driver_memory=args.driver_memory)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0 if report["equal"] else 1


def _bench_stages(args: argparse.Namespace) -> int:
    from analysis.bench import bench_stages

    bench_stages(lines=args.lines, out=args.out, data_dir=args.data,
                 memory_limit=args.memory_limit, label=args.label,
                 **({"stages": tuple(args.stage)} if args.stage else {}))
    return 0


def _bench_cdnow(args: argparse.Namespace) -> int:
    import json

    from analysis.bench import bench_cdnow

    report = bench_cdnow(data_dir=args.data, out=args.out)
    print(json.dumps(report, indent=2))
    return 0


def _bench_strategy(args: argparse.Namespace) -> int:
    import json

    from analysis.bench import bench_strategy

    print(json.dumps(bench_strategy(customers=args.customers, seed=args.seed, out=args.out),
                     indent=2))
    return 0


def _bench_results(args: argparse.Namespace) -> int:
    from analysis.bench import render_results

    args.out.write_text(render_results(args.results))
    print(args.out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from analysis.report import run_pipeline

    result = run_pipeline(args.config, run_id=args.run_id, as_of=args.as_of,
                          notebooks_dir=args.notebooks,
                          log=lambda line: print(line, flush=True))
    print(result.index_html)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
