import json

import pandas as pd
import pytest

from analysis.bench import BENCH_CUTOFF, bench_features, render_results
from analysis.features import LINE_INPUTS, build_features, connect


def test_feature_benchmark_on_a_small_world(tmp_path):
    report = bench_features(lines=20_000, out=tmp_path, repeats=1)
    for key in ("lines", "customers", "seconds_project", "seconds_pandas",
                "seconds_scan_bound", "peak_rss_mb", "identical"):
        assert key in report, key
    assert report["identical"] is True
    assert 15_000 < report["lines"] < 25_000 and report["customers"] > 500
    assert report["peak_rss_mb"] > 50
    written = json.loads((tmp_path / "features.json").read_text())
    assert written["lines"] == report["lines"]
    # other tooling reads these files: the keys stay exactly these
    assert list(written) == ["lines", "customers", "cutoff", "features", "repeats",
                             "seconds_project", "seconds_pandas", "seconds_scan_bound",
                             "all_seconds", "identical", "speedup_vs_pandas",
                             "ratio_to_scan_bound", "floor_columns",
                             "seconds_scan_bound_4_columns", "ratio_to_scan_bound_4_columns",
                             "memory_limit", "peak_rss_mb", "machine"]
    assert set(written["all_seconds"]) == {"project", "pandas", "scan_bound",
                                           "scan_bound_4_columns"}
    # the floor reads every column the features read (the demo has all eight)
    assert written["floor_columns"] == list(LINE_INPUTS)
    assert set(written["machine"]) == {"cpus", "python", "duckdb", "pandas", "self_rss_mb"}


def test_results_page_is_rendered_from_the_json_files(tmp_path):
    (tmp_path / "features-2m.json").write_text(json.dumps({
        "lines": 2_003_706, "customers": 98_442, "features": 33, "repeats": 3,
        "seconds_project": 1.7, "seconds_pandas": 4.5, "seconds_scan_bound": 0.14,
        "speedup_vs_pandas": 2.6, "ratio_to_scan_bound": 11.9, "peak_rss_mb": 508,
        "identical": True, "machine": {"cpus": 2, "python": "3.11", "duckdb": "2",
                                       "pandas": "3"}}))
    (tmp_path / "e2e-1k.json").write_text(json.dumps({
        "stage_seconds": {"01_data_quality.ipynb": 1.5, "render": 0.5},
        "profile": {"customers": 1234}}))
    page = render_results(tmp_path)
    assert ("| 2,003,706 | 98,442 | 33 | none | 3 | 1.70 | 4.50 | 4 | 0.14 | 2.6x | 11.9x | "
            "508 | yes |" in page)
    assert "1,234 customers" in page and "**2.0**" in page
    assert "--lines 2000000" in page
    # a result that measured both floors shows the four-column one in brackets
    (tmp_path / "features-2m.json").write_text(json.dumps({
        **json.loads((tmp_path / "features-2m.json").read_text()),
        "floor_columns": list(LINE_INPUTS), "seconds_scan_bound": 0.28,
        "ratio_to_scan_bound": 6.1, "seconds_scan_bound_4_columns": 0.14,
        "ratio_to_scan_bound_4_columns": 11.9}))
    assert ("| 1.70 | 4.50 | 8 | 0.28 (0.14) | 2.6x | 6.1x (11.9x) | 508 | yes |"
            in render_results(tmp_path))


def test_the_features_read_no_column_of_the_order_log_but_the_floors(small_demo):
    """The floor reads what the features read: the features of a log cut down to
    :data:`LINE_INPUTS` are those of the whole log."""
    tx = pd.read_parquet(small_demo / "transactions.parquet")
    assert set(tx.columns) - set(LINE_INPUTS), "the demo log has other columns too"
    whole = build_features(connect({"transactions": tx}), cutoff=BENCH_CUTOFF)
    cut = build_features(connect({"transactions": tx[list(LINE_INPUTS)]}), cutoff=BENCH_CUTOFF)
    assert len(whole) > 100
    pd.testing.assert_frame_equal(whole, cut)


def test_strategy_results_of_several_seeds_are_one_table_with_their_mean(tmp_path):
    for seed, capture, flags in ((1, 0.70, []), (2, 0.90, ["gender=f: x (ratio 0.5)"])):
        (tmp_path / f"strategy-20k-seed{seed}.json").write_text(json.dumps({
            "customers": 20_000, "seed": seed, "campaign_size": 1000 * seed,
            "campaign_matches_actions": True, "retention_method": "learned",
            "profit_capture_vs_oracle": capture, "profit_capture_pooled_ranking": 0.5,
            "profit_capture_churn_ranking": -0.2, "profit_capture_at_best_depth": 0.95,
            "qini_auuc": {"model": 1.0 * seed, "pooled": 0.5, "churn": -1.0},
            "phaseout_count": 4, "phaseout_true_value_top_half": 0, "fairness_flags": flags,
            "seconds_pipeline": 100.0}))
    page = render_results(tmp_path)
    assert "(20,000 customers, seeds 1, 2)" in page
    assert "| measure | seed 1 | seed 2 | mean |" in page
    assert "| 70.0% | 90.0% | 80.0% |" in page
    assert "| campaign file = the Retain actions | True | True | all |" in page
    assert "| 1.00 | 2.00 | 1.50 |" in page and "| fairness flags | 0 | 1 | 0.5 |" in page


def test_step_profile_times_nested_steps_and_their_peak_memory():
    import numpy as np

    from analysis.bench import StepProfile

    class Work:
        @staticmethod
        def allocate(n_mb):
            block = np.ones(n_mb * 2**20 // 8)        # touched: resident
            return float(block.sum())

        def inner(self):
            return [self.allocate(200) for _ in range(2)]

    profile = StepProfile()
    with profile, profile.step("stage"):
        profile.wrap(Work, "allocate")
        profile.wrap(Work, "inner", "two allocations")
        Work().inner()
        Work.allocate(1)
    assert isinstance(Work.__dict__["allocate"], staticmethod)     # put back as it was
    assert Work.allocate.__qualname__.endswith("Work.allocate")
    rows = {r["step"]: r for r in profile.table()}
    assert list(rows) == ["stage", "stage > two allocations",
                          "stage > two allocations > allocate", "stage > allocate"]
    assert rows["stage > two allocations > allocate"]["calls"] == 2
    assert rows["stage > allocate"]["calls"] == 1
    # a step's peak holds its own allocation; its parent's, its children's
    assert rows["stage > two allocations > allocate"]["peak_rss_mb"] >= 200
    assert rows["stage"]["peak_rss_mb"] >= rows["stage > two allocations"]["peak_rss_mb"] >= 200
    assert rows["stage"]["seconds"] >= rows["stage > two allocations"]["seconds"]


def test_stage_breakdown_is_rendered_side_by_side_with_nested_steps(tmp_path):
    def result(label, steps, seconds):
        return {"lines": 2_983_893, "customers": 172_000, "label": label,
                "memory_limit": "6GB", "stages": {"03_churn_model": {
                    "seconds": seconds, "peak_rss_mb": 1071, "load_average_before": 2.5,
                    "load_average_after": 3.0, "steps": [
                        {"step": "03_churn_model", "calls": 1, "seconds": seconds,
                         "peak_rss_mb": 1071}, *steps]}}}

    cell = "03_churn_model > cell 3: config = load_config(config_path)"
    (tmp_path / "stages-3m-main.json").write_text(json.dumps(result("main", [
        {"step": cell, "calls": 1, "seconds": 399.0, "peak_rss_mb": 1071},
        {"step": f"{cell} > fit_and_evaluate", "calls": 1, "seconds": 398.0,
         "peak_rss_mb": 1071},
        {"step": f"{cell} > fit_and_evaluate > build_snapshots", "calls": 3,
         "seconds": 39.3, "peak_rss_mb": 976}], 400.0)))
    (tmp_path / "stages-3m-speed.json").write_text(json.dumps(result("speed", [
        {"step": "03_churn_model > cell 3: config = load_config(config_path)", "calls": 1,
         "seconds": 370.0, "peak_rss_mb": 1000},
        {"step": f"{cell} > fit_and_evaluate", "calls": 1, "seconds": 369.0,
         "peak_rss_mb": 1000},
        {"step": f"{cell} > fit_and_evaluate > snapshots_by_cutoff", "calls": 1,
         "seconds": 11.5, "peak_rss_mb": 900}], 371.0)))
    page = render_results(tmp_path)
    assert "### 03_churn_model: 2,983,893 lines, 172,000 customers" in page
    assert "- main: 400.0 s, peak 1,071 MiB; load average 2.5 before, 3.0 after" in page
    assert "| step | main: calls | s | peak MiB | speed: calls | s | peak MiB |" in page
    assert "| fit_and_evaluate | 1 | 398.00 | 1,071 | 1 | 369.00 | 1,000 |" in page
    assert "| &nbsp;&nbsp;&nbsp;&nbsp;build_snapshots | 3 | 39.30 | 976 |  |  |  |" in page
    assert "| &nbsp;&nbsp;&nbsp;&nbsp;snapshots_by_cutoff |  |  |  | 1 | 11.50 | 900 |" in page
    # a step only one version has sits under its parent, after its predecessor
    rows = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| ")]
    start = rows.index("| fit_and_evaluate")
    assert set(rows[start + 1:start + 3]) == {"| &nbsp;&nbsp;&nbsp;&nbsp;build_snapshots",
                                              "| &nbsp;&nbsp;&nbsp;&nbsp;snapshots_by_cutoff"}


def test_a_way_measured_in_its_own_process_gives_its_json_or_a_clear_stop(tmp_path):
    """bench.in_own_process: ``python SCRIPT --one ARGS`` in a fresh process, its last
    printed line read as JSON; a failure stops with the script's name and error."""
    import os

    from analysis.bench import in_own_process
    from analysis.errors import AnalysisError

    script = tmp_path / "way.py"
    script.write_text(
        "import json, os, sys\n"
        "print('noise first')\n"
        "if sys.argv[2] == 'bad':\n"
        "    raise SystemExit('the way broke')\n"
        "print(json.dumps({'args': sys.argv[1:], 'pid': os.getpid()}))\n")
    got = in_own_process(script, "good", 3, tmp_path / "out")
    assert got["args"] == ["--one", "good", "3", str(tmp_path / "out")]
    assert got["pid"] != os.getpid()
    with pytest.raises(AnalysisError, match=r"way\.py --one bad failed:\n.*the way broke"):
        in_own_process(script, "bad")
