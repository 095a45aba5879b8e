# Every target creates .venv when it is missing, so a fresh clone needs only
# Python 3.11 and pip. torch is installed first, pinned, so nothing pulls a CUDA build.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0

.PHONY: install demo test test-fast bench bench-quick clean

$(BIN)/fedarches: pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3 ...)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/fedarches

install: $(BIN)/fedarches

demo: install
	$(BIN)/fedarches demo --out out/demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not flower"

bench: install
	$(BIN)/python benchmarks/run.py --mode full

bench-quick: install
	$(BIN)/python benchmarks/run.py --mode quick

clean:
	rm -rf $(VENV) out .pytest_cache
