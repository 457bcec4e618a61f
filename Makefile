# Two commands: `make demo` and `make test`. Each sets everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINKED := $(VENV)/.linked
# The package folders: one that gains or loses a file (its time changes) gets its editable links redone.
PACKAGE_DIRS := $(shell find common trainers launcher eval cluster_configs -type d -not -name __pycache__ 2>/dev/null)
EDITABLE := --config-settings editable_mode=strict

.PHONY: setup demo check test typecheck bench clean browser sshd

setup: $(LINKED)

# torch first, pinned to the CPU build available offline; then the rest (a range torch already meets). The
# checkout is installed in strict editable mode: a tree of links to its files plus a static .pth entry, which
# editors and type checkers follow (the default mode's import hook is invisible to them).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch<=2.14.1"
	$(BIN)/python -m pip install -q -e ".[test]" $(EDITABLE)
	touch $(STAMP) $(LINKED)

# A module added or removed since: strict mode links files, so the links are made again (a few seconds).
$(LINKED): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/python -m pip install -q --no-deps -e . $(EDITABLE)
	touch $(LINKED)

# Debian packages a test needs, installed where apt-get and root allow (the package index is refreshed only when the
# first try fails); elsewhere one warning names what the suite will skip. $(1): apt-get install's arguments,
# $(2): the warning.
apt_install = (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	(apt-get install -y -q $(1) >/dev/null 2>&1 || \
	 (apt-get update -q >/dev/null && apt-get install -y -q $(1) >/dev/null))) || \
	echo "warning: $(2)"

# A headless Chromium for the test that opens the HTML report (Debian's package; Playwright drives it, and never
# downloads a browser of its own). Needs root or an existing chromium; without either the browser test says so.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  $(call apt_install,chromium,no chromium (apt-get install chromium): the HTML report's browser test will be skipped)

# An SSH server and rsync, for the test that runs the on-prem Ray recipe (`ray up` over SSH to a host on loopback);
# like the browser: installed where apt-get and root allow, else the test says why it is skipped.
sshd:
	@(command -v /usr/sbin/sshd >/dev/null && command -v rsync >/dev/null) || \
	  $(call apt_install,--no-install-recommends openssh-server rsync,no sshd or rsync (apt-get install openssh-server rsync): the on-prem recipe's test will be skipped)

# The whole fleet on the embedded default: 5 methods x 2 seeds on a local Ray, then the evaluator.
demo: setup
	$(BIN)/tunefleet sweep sweeps/demo.yaml --backend ray --eval
	@echo "outputs: runs/demo/<run>/ (adapter, run.json with its cost, train.log), runs/demo/study.json,"
	@echo "         runs/demo/evaluation_results.json, runs/demo/evaluation_statistics.json,"
	@echo "         runs/demo/evaluation_report.md, runs/demo/*.png"
	@echo "the winner, merged for serving: $(BIN)/tunefleet export --runs_dir runs/demo --best win_rate_vs_base --output_dir exported/best"
	@echo "the report, in a browser: $(CURDIR)/runs/demo/evaluation_report.html"

# basedpyright over the package, configured in pyproject.toml ([tool.basedpyright]).
typecheck: setup
	$(BIN)/basedpyright

# The inner loop, about two minutes on 2 cores: format, lint, types and the tests not marked slow.
check: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/basedpyright
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations 5 tests

# The whole suite (what CI runs).
test: setup browser sshd
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/basedpyright
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations 15 tests

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/sweep_efficiency.py

clean:
	rm -rf $(VENV) .cache runs/* build
