# Customer Strategy Lab. `make` alone lists the targets.
# Set-up is two commands: `make report` and `make test`; both create the environment.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
DEMO_CUSTOMERS ?= 20000
DEMO_SEED ?= 42
DEMO := data/raw/demo/transactions.parquet
SNAPSHOT_DEMO := data/raw/snapshot-demo/customers.csv
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help env report report-snapshot data test lab gpu browser spark clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# --compile-bytecode: every notebook stage starts a kernel that imports pandas, scikit-learn,
# XGBoost and matplotlib; without .pyc files (none are written where PYTHONDONTWRITEBYTECODE
# is set, as on CI) each kernel compiles them again: 7 s of CPU an import instead of 2.
$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

env: $(VENV)/.synced ## create or update the environment in .venv/ from uv.lock

$(DEMO): | $(VENV)/.synced
	$(PY) -m analysis demo-data --customers $(DEMO_CUSTOMERS) --seed $(DEMO_SEED) --out data/raw/demo

data: $(DEMO) ## generate the demo data in data/raw/demo/ (if missing)

report: env $(DEMO) ## run the whole pipeline on CONFIG (default: the demo) and print the report path
	$(PY) -m analysis run --config $(CONFIG)

$(SNAPSHOT_DEMO): | $(VENV)/.synced
	$(PY) -m analysis demo-data --mode snapshot --customers 7000 --seed $(DEMO_SEED) --out data/raw/snapshot-demo

report-snapshot: env $(SNAPSHOT_DEMO) ## the same pipeline in snapshot (subscription) mode, on a telecom-style demo export
	$(PY) -m analysis run --config configs/snapshot.yaml

test: env spark browser ## run the test suite (what CI runs)
	$(PY) -m pytest

# Apache Spark is optional (analysis.engine: spark): the 'spark' extra (pyspark, sqlglot;
# about 500 MB) on top of the locked environment, and a Java runtime (17 or later) from
# Debian when none is found. `make report` never needs it; `make test` tests it.
spark: env ## install the optional Spark engine (pyspark, sqlglot) and Java, if missing
	@$(PY) -c "import pyspark, sqlglot" 2>/dev/null || \
		$(UV) sync --frozen --compile-bytecode --inexact --extra spark --python $(PYTHON)
	@if command -v java >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing a Java runtime (Debian) for Spark"; \
		apt-get update -qq && (apt-get install -y -qq openjdk-17-jre-headless \
			|| apt-get install -y -qq openjdk-21-jre-headless) >/dev/null; \
	else echo "note: no Java runtime here and none can be installed: the Spark tests" \
		"will be skipped (install Java 17 or later)"; fi

browser: ## install Debian's chromium and chromium-driver for the browser tests, if missing
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (Debian) for the browser tests"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver are missing and cannot be installed here:" \
		"the browser tests will be skipped"; fi

# JupyterLab refuses to run as root without --allow-root (containers, CI boxes); with no
# display (a server, ssh) there is no browser to open, so it only prints its URL.
NO_BROWSER = $(if $(DISPLAY)$(WAYLAND_DISPLAY)$(filter Darwin,$(shell uname -s)),,--no-browser)
NO_BROWSER_HINT = No browser here: open the URL JupyterLab prints below \
	(http://localhost:8888/lab?token=...) in a browser; from another machine, forward the \
	port first: ssh -L 8888:localhost:8888 <this machine>
LAB_FLAGS = $(if $(filter 0,$(shell id -u)),--allow-root) $(NO_BROWSER)

lab: | $(UV) ## JupyterLab on notebooks/ with a kernel for the project's environment
	$(UV) sync --frozen --python $(PYTHON) --group lab
	$(PY) -m ipykernel install --sys-prefix --name customer-strategy-lab \
		--display-name "Customer Strategy Lab"
	$(if $(NO_BROWSER),@echo "$(NO_BROWSER_HINT)")
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_FLAGS)

gpu: env ## swap XGBoost's CPU build for the CUDA build of the same version (needs an NVIDIA GPU)
	v=$$($(PY) -c "import importlib.metadata as m; print(m.version('xgboost-cpu'))") && \
	$(UV) pip uninstall --python $(PY) xgboost-cpu && \
	$(UV) pip install --python $(PY) "xgboost==$$v"
	@echo "GPU build installed; set 'device: cuda' in your config. 'rm $(VENV)/.synced && make env' returns to the locked CPU build."

clean: ## remove the environment and generated outputs (raw data is kept)
	rm -rf $(VENV) $(TOOLS) data/processed/* reports/*
