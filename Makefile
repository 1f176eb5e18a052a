# Two commands, each doing its own idempotent setup: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kontext-trt-installed
# The CPU build of torch that lies on this machine's disk; a GPU host keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for `make test` (two: the 2-core CI machine)
TEST_WORKERS ?= 2

.PHONY: setup chromium demo test clean

setup: $(STAMP) chromium

# Headless Chromium for the server page's test: Debian's package, installed only when no chromium is on PATH.
# Without apt-get or root it says so and the page test skips with that reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	    echo "warning: apt-get could not install chromium: the page test will skip"; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	    echo "warning: apt-get could not install chromium: the page test will skip"; \
	  else echo "warning: chromium is not installed and apt-get is not usable here: the page test will skip"; fi; }

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# one resolution for torch (unless this venv has one: a GPU host keeps its CUDA build) and the package
	$(PY) -m pip install -q --no-compile $$($(PY) -c "import torch" 2>/dev/null || echo "$(TORCH_SPEC)") -e ".[dev]"
	# no-deps: see safety/no-deps.txt; invisible-watermark is the tests' reference watermark decoder
	$(PY) -m pip install -q --no-compile --no-deps -r kontext_trt/safety/no-deps.txt "invisible-watermark==0.2.0"
	# bytecode for all of it on every core (pip compiles one file at a time; where PYTHONDONTWRITEBYTECODE is set, as
	# here, nothing would be cached later). Like pip, skip the few py2-only files some packages ship: hence || true
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	touch $@

demo: setup
	$(VENV)/bin/kontext-trt demo --out out/demo

# The floors first (under a second): a wrong import fails before the suite starts. Then the suite on
# TEST_WORKERS pytest-xdist workers, each test file whole on one (tests/conftest.py: shared artefacts, order).
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf out .pytest_cache
