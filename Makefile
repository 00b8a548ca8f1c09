# `make test` sets up .venv on a fresh clone (torch from TORCH_SPEC, then this package with its test extra)
# and runs the CPU suite. TORCH_SPEC defaults to torch 2.13.0, taken from PyTorch's CPU wheels (TORCH_INDEX, an
# extra index: its `+cpu` build ranks above PyPI's Linux torch, the CUDA build of several GB); any torch >= 2.4
# works, e.g. TORCH_INDEX= (empty) for PyPI's build. An unreachable index (an offline machine with its own wheel
# mirror) costs one failed connection per package, not pip's retries.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: test test-slow test-gpu example clean

# Test-only references, without their dependencies (which would pull other torch builds): curvlinops for the
# K-FAC/EKFAC cross-checks (with the pure-Python packages it needs at import time) and the peers the workbench
# compares against (HeavyBall, pytorch-optimizer).
REFERENCES := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einconv==0.1.0 \
	linear_operator==0.6.1 heavyball==3.2.1 pytorch-optimizer==4.1.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--retries 0 --timeout 10 --extra-index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(REFERENCES)
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

example: $(VENV)/.installed
	$(PY) examples/compose_kl_shampoo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# `make demo`: on top of the test setup, the demo extra (matplotlib, tqdm, scipy), then the CPU ablation of
# ablations/demo.toml (kl_shampoo, shampoo with and without grafting, soap, AdamW on a tiny byte-level GPT; two
# runs at a time, one thread each, then a timing pass of each variant's best lr alone that times the per-second
# table; about 4.5 minutes of grid on a free 2-core CPU, more when other work shares it). One line per finished
# run and a progress bar; the table, plots and the machine's load per run land in results/; a second
# `make demo` reuses the finished runs.
.PHONY: demo
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -u -m precond.ablate --config ablations/demo.toml
