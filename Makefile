# Two commands: `make demo` and `make test`. Each sets everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build available offline; then the rest (a range torch already meets).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch<=2.14.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The whole fleet on the embedded default: 5 methods x 2 seeds on a local Ray, then the evaluator.
demo: setup
	$(BIN)/tunefleet sweep sweeps/demo.yaml --backend ray --eval
	@echo "outputs: runs/demo/<run>/ (adapter, run.json, train.log), runs/demo/evaluation_results.json,"
	@echo "         runs/demo/evaluation_report.md, runs/demo/*.png"
	@echo "the winner, merged for serving: $(BIN)/tunefleet export --runs_dir runs/demo --best win_rate_vs_base --out exported/best"

test: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/sweep_efficiency.py

clean:
	rm -rf $(VENV) .cache runs/*
