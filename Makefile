# `make test` sets up .venv on a fresh clone (torch from TORCH_SPEC, then this package with its test extra)
# and runs the CPU suite. TORCH_SPEC defaults to the CPU build of torch 2.13.0; any torch >= 2.4 works.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: test test-slow test-gpu example clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

example: $(VENV)/.installed
	$(PY) examples/compose_kl_shampoo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
