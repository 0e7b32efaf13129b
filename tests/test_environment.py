"""The project's set-up files stay consistent with each other."""

import json
import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from .conftest import ROOT


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_a_supported_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    version = python.split("=")[1]
    lower = re.search(r">=\s*([\d.]+)", pyproject()["project"]["requires-python"]).group(1)
    assert tuple(map(int, version.split("."))) >= tuple(map(int, lower.split(".")))
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e ."]  # dependencies come from pyproject.toml only
    assert not [d for d in deps if isinstance(d, str) and d not in {python, "pip"}]


def test_lock_file_covers_every_declared_dependency():
    lock = (ROOT / "uv.lock").read_text()
    locked = set(re.findall(r'^name = "([^"]+)"', lock, flags=re.M))
    project = pyproject()
    declared = project["project"]["dependencies"] + [
        d for group in project["dependency-groups"].values() for d in group] + [
        d for extra in project["project"]["optional-dependencies"].values() for d in extra]
    assert {"pyspark", "sqlglot"} <= {re.split(r"[<>=!~ ]", d, maxsplit=1)[0] for d in
                                      project["project"]["optional-dependencies"]["spark"]}
    for spec in declared:
        name = re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower()
        assert name in locked, f"{name} is declared but not in uv.lock: run uv lock"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make report" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "--frozen" in makefile  # the lock file is honoured
    # and compiled once: each notebook kernel would compile its imports again otherwise
    assert "--compile-bytecode" in makefile


def test_notebooks_are_thin_and_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 3
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), path
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), path
        source = "\n".join("".join(c["source"]) for c in code)
        assert not re.search(r"^\s*(def|class) ", source, flags=re.M), path


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_lab_allows_root_and_says_where_to_open_it_without_a_display():
    env = {**os.environ, "DISPLAY": "", "WAYLAND_DISPLAY": ""}
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    command = next(line for line in out.splitlines() if "jupyter lab notebooks/" in line)
    assert ("--allow-root" in command) == (os.getuid() == 0)   # JupyterLab refuses root
    assert "--no-browser" in command and "open the URL JupyterLab prints" in out
    shown = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "DISPLAY": ":0"}, check=True).stdout
    assert "--no-browser" not in shown and "open the URL" not in shown
