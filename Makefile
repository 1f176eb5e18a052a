# Two commands, each doing its own idempotent setup: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kontext-trt-installed
# The CPU build of torch that lies on this machine's disk; a GPU host keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/kontext-trt demo --out out/demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf out .pytest_cache
