import json

from analysis.bench import bench_features, render_results


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
                             "ratio_to_scan_bound", "memory_limit", "peak_rss_mb", "machine"]
    assert set(written["all_seconds"]) == {"project", "pandas", "scan_bound"}
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
    assert ("| 2,003,706 | 98,442 | 33 | none | 3 | 1.70 | 4.50 | 0.14 | 2.6x | 11.9x | 508 | yes |"
            in page)
    assert "1,234 customers" in page and "**2.0**" in page
    assert "--lines 2000000" in page


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
