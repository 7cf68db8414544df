# tellodb-cluster: `make run` installs (if needed) and starts the engine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LOCOMO ?= ../shared/data/locomo/locomo-dev.json

.PHONY: install test-install run test bench recall loadtest-install loadtest scale clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

test-install: $(VENV)/.test-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/tellodb serve --config cluster.yaml

test: test-install
	$(PY) -m pytest -q -ra

bench: test-install
	$(PY) loadtest/bench.py --spawn

recall: test-install
	$(PY) loadtest/recall.py $(LOCOMO) --spawn

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
