import hashlib
import json
import os
import re

import pandas as pd
import pytest
import yaml

from analysis import cli
from analysis.errors import DataContractError, PipelineError
from analysis.report import NOTEBOOKS, html_table, paragraph, run_pipeline

EVIL = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def test_paragraph_escapes_values_but_keeps_formatting():
    out = paragraph("Segment {name} has {n:,} customers ({share:.0%}).", name=EVIL,
                    n=12345, share=0.256)
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;" in out and "12,345 customers (26%)" in out


def test_html_table_escapes_cells_and_labels():
    frame = pd.DataFrame({"segment": [EVIL], "share": [0.5]})
    out = html_table(frame, formats={"share": ".0%"}, labels={"segment": EVIL})
    assert "<script>" not in out and "onerror=\"" not in out
    assert "50%" in out


def test_kernel_memory_is_the_peak_of_the_process_started_in_the_block():
    import subprocess
    import sys

    from analysis.report import KernelMemory

    hold = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); import time; time.sleep(1)"
    with KernelMemory() as memory:
        subprocess.run([sys.executable, "-c", hold], check=True)
    assert 200 <= memory.peak_mib < 600
    with KernelMemory() as small:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.6)"], check=True)
    assert 0 < small.peak_mib < 100          # a later, smaller stage is not given the earlier peak


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, small_demo):
    folder = tmp_path_factory.mktemp("run")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "e2e", "tables": {
            "transactions": {"path": str(small_demo / "transactions.parquet")},
            "customers": {"path": str(small_demo / "customers.parquet")},
            "interactions": {"path": str(small_demo / "interactions.parquet")},
            "campaign": {"path": str(small_demo / "campaign.parquet")}},
        "protected": ["gender", "age_band"],
        "output": {"processed_dir": "processed", "reports_dir": "reports"}}))
    lines = []
    global RAW_BEFORE
    RAW_BEFORE = checksums(small_demo)
    result = run_pipeline(config, run_id="first", log=lines.append)
    return folder, config, result, lines


RAW_BEFORE: dict[str, str] = {}


def checksums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.parquet"))}


def pickled_files(*folders):
    """Files whose content is a pickle (or joblib) stream, whatever their name."""
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                head = p.open("rb").read(2)
                if p.suffix in {".pkl", ".pickle", ".joblib"} or (
                        len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)):
                    found.append(p)
    return found


@pytest.mark.e2e
def test_run_publishes_a_self_contained_report(good_run):
    folder, _, result, lines = good_run
    latest = folder / "reports" / "latest"
    assert latest.is_symlink() and latest.resolve() == result.report_dir.resolve()
    page = (latest / "index.html").read_text()
    assert "<script" not in page.lower()                     # no code runs in the report
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from outside
    assert page.count('src="data:image/png;base64') >= 5      # charts embedded
    assert "Traceback" not in page and "In&nbsp;[" not in page
    assert 'class="jp-InputArea' not in page and 'class="jp-InputPrompt' not in page
    assert "Customer strategy report: e2e" in page
    for name in NOTEBOOKS[:-1]:
        html_name = name.replace(".ipynb", ".html")
        assert (result.report_dir / "notebooks" / html_name).is_file()
        assert f'href="notebooks/{html_name}"' in page   # linked from the executive page
    assert any(f"stage 2/{len(NOTEBOOKS)} 02_customer_profile.ipynb done" in line for line in lines)


@pytest.mark.e2e
def test_run_writes_customers_and_metrics(good_run):
    _, _, result, _ = good_run
    customers = pd.read_csv(result.processed_dir / "customers.csv", dtype={"customer_id": str})
    for col in ("customer_id", "segment", "value_tier", "lifecycle_stage", "cluster_name",
                "churn_probability", "predicted_value", "action", "expected_profit"):
        assert customers[col].notna().all(), col
    assert customers["reasons"].notna().mean() > 0.95
    assert customers["churn_probability"].between(0, 1).all()
    models = result.processed_dir / "models"
    assert (models / "churn.json").is_file() and (models / "value.meta.json").is_file()
    assert not pickled_files(result.processed_dir, result.report_dir)
    assert customers["customer_id"].is_unique
    metrics = json.loads((result.processed_dir / "metrics.json").read_text())
    assert set(metrics["stage_seconds"]) >= set(NOTEBOOKS)
    assert "pandas" in metrics["versions"] and metrics["run_id"] == "first"
    for table in metrics["data_quality"]["tables"]:
        assert table["rows_processed"] + table["rows_quarantined"] == table["rows_read"]
    assert metrics["profile"]["customers"] == len(customers)
    # the methods that score are chosen, recorded with every method's figures, and named
    churn, value = metrics["models"]["churn"], metrics["models"]["value"]
    assert "roc_auc" in churn[churn["chosen"]] and "mae" in value[value["chosen"]]
    assert {"model", "logistic", "blend"} <= set(churn["selection"])
    assert (models / "logistic.json").is_file()
    # the customer link of the report resolves to the published CSV
    page = (result.report_dir / "index.html").read_text()
    assert "Churn risk comes from" in page and "Spend forecasts come from" in page
    href = re.search(r'href="([^"]*customers\.csv)"', page).group(1)
    assert (result.report_dir / href).resolve() == (result.processed_dir / "customers.csv").resolve()


@pytest.mark.e2e
def test_same_data_config_and_seed_give_identical_results_and_raw_data_is_untouched(
        good_run, small_demo, tmp_path):
    _, config, first, _ = good_run
    # the same config (outputs relative to it) in another folder, the same run id
    copy = tmp_path / "config.yaml"
    copy.write_text(config.read_text())
    again = run_pipeline(copy, run_id="first", log=lambda line: None)
    assert checksums(small_demo) == RAW_BEFORE                  # inputs are only read
    pd.testing.assert_frame_equal(pd.read_parquet(first.processed_dir / "customers.parquet"),
                                  pd.read_parquet(again.processed_dir / "customers.parquet"))
    assert (first.processed_dir / "customers.csv").read_bytes() == \
        (again.processed_dir / "customers.csv").read_bytes()

    def stable(metrics):     # timings and memory peaks differ by nature, and where the files live
        out = {k: v for k, v in metrics.items()
               if k not in {"stage_seconds", "stage_peak_rss_mb", "runner_peak_rss_mb"}}
        assert set(metrics["stage_peak_rss_mb"]) == set(metrics["stage_seconds"]) - {"render"}
        assert all(v > 50 for v in metrics["stage_peak_rss_mb"].values())
        out["config"] = {k: v for k, v in out["config"].items() if k not in {"source", "output"}}
        out["parameters"] = {k: v for k, v in out["parameters"].items() if k != "config_path"}
        return out

    one, two = (json.loads((r.processed_dir / "metrics.json").read_text())
                for r in (first, again))
    assert stable(one) == stable(two)
    assert not pickled_files(again.processed_dir, again.report_dir)


@pytest.mark.e2e
def test_failed_run_keeps_the_last_good_report(good_run, capsys):
    folder, config, result, _ = good_run
    broken = folder / "broken.csv"
    broken.write_text("customer_id,order_date\nx,2024-01-01\n")
    raw = yaml.safe_load(config.read_text())
    raw["tables"] = {"transactions": {"path": "broken.csv"}}
    bad_config = folder / "bad.yaml"
    bad_config.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", "--config", str(bad_config), "--run-id", "second"])
    err = capsys.readouterr().err
    assert code == DataContractError.exit_code       # the notebook stopped on bad input
    assert "01_data_quality.ipynb" in err and "required column 'amount'" in err
    assert (folder / "reports" / "latest").resolve() == result.report_dir.resolve()
    assert (folder / "reports" / "latest" / "index.html").is_file()
    failed = folder / "reports" / "failed" / "second" / "notebooks"
    assert "DataContractError" in (failed / "01_data_quality.html").read_text()
    assert not (folder / "reports" / "second").exists()
    assert not list((folder / "processed").glob(".tmp-*"))


def test_bad_run_id_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="run id"):
        run_pipeline(tmp_path / "x.yaml", run_id="../escape")


@pytest.mark.e2e
def test_run_strategy_is_fair_and_keeps_valuable_customers_off_the_phaseout_list(
        good_run, small_demo):
    _, _, result, _ = good_run
    decided = pd.read_parquet(result.processed_dir / "strategy" / "customers.parquet")
    assert decided["customer_id"].is_unique and decided["action"].notna().all()
    future = pd.read_parquet(small_demo / "ground_truth" / "future_orders.parquet")
    true_value = (future[future["status"] == "completed"].groupby("customer_id")["amount"].sum()
                  .reindex(decided["customer_id"], fill_value=0.0))
    top_half = set(true_value[true_value > true_value.median()].index)
    listed = set(decided.loc[decided["phaseout_candidate"], "customer_id"])
    assert not listed & top_half
    fairness = pd.read_parquet(result.processed_dir / "strategy" / "fairness.parquet")
    assert len(fairness) and not fairness["flag"].any()
    assert set(fairness["attribute"]) == {"gender", "age_band"}


@pytest.mark.e2e
def test_second_run_reports_what_changed_and_keeps_history(good_run):
    import datetime as dt

    from analysis.monitor import read_history

    folder, config, first, _ = good_run
    later = run_pipeline(config, run_id="later", as_of=dt.date(2025, 10, 1),
                         log=lambda line: None)
    page = later.index_html.read_text()
    assert "2. What changed since the last run" in page
    assert "Value-tier migration" in page and "value_tier before" in page
    assert "new early warnings since the previous run" in page
    assert "nothing to compare" not in page
    assert "Data drift between the training snapshots and today" in page
    history = read_history(folder / "processed" / "history.parquet")
    assert history["run_id"].tolist() == ["first", "later"]
    assert history.set_index("run_id").loc["later", "as_of"] == "2025-10-01"
    assert (folder / "reports" / "latest").resolve() == later.report_dir.resolve()
    # the first run's page said so
    assert "nothing to compare" in (first.report_dir / "index.html").read_text()
    # a run 90+ days after 'later' reports how later's predictions turned out
    third = run_pipeline(config, run_id="third", log=lambda line: None)
    page = third.index_html.read_text()
    assert "How the run of 2025-10-01 turned out" in page
    assert read_history(folder / "processed" / "history.parquet")["run_id"].tolist() == [
        "first", "later", "third"]


@pytest.mark.e2e
def test_two_runs_at_once_do_not_corrupt_each_other(good_run, tmp_path):
    """The runner alone (stand-in notebooks that copy a finished run's outputs): two runs
    started together both publish completely, and the history keeps both."""
    from concurrent.futures import ThreadPoolExecutor

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from analysis.monitor import read_history

    folder, config, first, _ = good_run
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in NOTEBOOKS:
        params = new_code_cell('processed_dir = ""')
        params.metadata["tags"] = ["parameters"]
        copy = (f"shutil.copytree({str(first.processed_dir)!r}, processed_dir, "
                f"dirs_exist_ok=True)" if name == NOTEBOOKS[0] else "print('ok')")
        nb = new_notebook(cells=[params, new_code_cell(f"import shutil, time\ntime.sleep(1)\n{copy}")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, notebooks / name)

    def run(run_id):
        return run_pipeline(config, run_id=run_id, notebooks_dir=notebooks, log=lambda l: None)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, ["par-a", "par-b"]))
    for result in results:
        assert result.index_html.is_file()
        assert (result.processed_dir / "customers.parquet").is_file()
        assert (result.processed_dir / "metrics.json").is_file()
    history = read_history(folder / "processed" / "history.parquet")
    assert {"par-a", "par-b"} <= set(history["run_id"])
    assert not list((folder / "processed").glob(".tmp-*"))
    assert not list((folder / "reports").glob(".tmp-*"))
    assert os.readlink(folder / "reports" / "latest") in {"par-a", "par-b"}


@pytest.mark.e2e
def test_too_short_a_history_gives_a_report_that_says_so(tmp_path, small_demo):
    # seven months of orders: not enough for training, validation and evaluation cutoffs
    tx = pd.read_parquet(small_demo / "transactions.parquet")
    tx[tx["order_date"] >= "2025-06-01"].to_parquet(tmp_path / "tx.parquet")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "short", "tables": {"transactions": {"path": str(tmp_path / "tx.parquet")}},
        "output": {"processed_dir": "processed", "reports_dir": "reports"}}))
    result = run_pipeline(config, run_id="short", log=lambda line: None)
    models_json = json.loads((result.processed_dir / "models.json").read_text())
    assert "too short" in models_json["skipped"]
    assert not (result.processed_dir / "models").exists()
    customers = pd.read_parquet(result.processed_dir / "customers.parquet")
    assert customers["churn_probability"].isna().all()          # no made-up risk
    assert customers["predicted_value"].notna().all()
    assert not customers["action"].str.startswith("Retain").any()
    page = (result.report_dir / "index.html").read_text()
    page = re.sub(r"\s+", " ", re.sub(r'src="data:[^"]+"', "", page))    # text, not images
    assert "Churn risk is not estimated in this run" in page
    assert "No model was trained" in page and "too short" in page
    assert "AUC" not in page and "nan" not in page.lower().replace("nance", "")
    assert "Traceback" not in page
