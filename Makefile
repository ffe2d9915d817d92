# talkmesh: set-up, demo and tests. Works on a fresh machine that has only Python 3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-learning test-fast lint clean test-ablations

# The CPU build of torch is installed first when no CUDA GPU is visible, so that the
# project's own `torch` requirement is already satisfied and pip never pulls the CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing torch with CUDA"; $(PIP) install -q "torch==2.13.0"; \
	else \
	  echo "no CUDA GPU: installing the CPU build of torch"; \
	  $(PIP) install -q --timeout 20 --retries 1 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	    || $(PIP) install -q "torch==2.13.0"; \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

# JavaScript dependencies (web/package.json, pinned by its lock file): the Khronos glTF
# validator that the export tests run on Node.
WEB_STAMP := web/node_modules/.installed
$(WEB_STAMP): web/package.json web/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix web --no-audit --no-fund && touch $(WEB_STAMP); \
	else echo "npm not found: install Node.js 20 (the glTF export tests need it)"; fi

# Debian's chromium for the web page's browser test (Playwright drives it: Playwright's own
# browser download cannot reach its host); installed with apt-get where this runs as root.
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null); fi
	@if command -v chromium >/dev/null 2>&1; then touch $(CHROMIUM_STAMP); \
	else echo "chromium not found: install Debian's chromium package (tests/test_web_page.py needs it)"; fi

setup: $(STAMP) $(WEB_STAMP) $(CHROMIUM_STAMP)

demo: setup
	$(PY) -m talkmesh.dev.demo

# Tests run on $(WORKERS) pytest-xdist workers, a test file per worker (its module-scoped
# trainings run once), the files that use the session's Ray all on one worker, the longest files first
# (tests/conftest.py).
# pytest exits 5 when it collected nothing; that is reported, not treated as a failure.
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not learning" $(XDIST); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The learning checks that need longer (minutes of training on the synthetic corpus); CI runs
# them after `make test`, grouped by file in the same way (each file trains its own models).
test-learning: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "learning and not ablation" $(XDIST); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The spec ablations that are not reliably met on the synthetic corpus (non-strict xfails that
# print their figures; README "Known gaps"). Not in CI: they cannot fail it, and they would
# take CI past its time budget.
test-ablations: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s -m ablation; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not learning"

lint: setup
	$(VENV)/bin/ruff check platform jobs sweeps serve tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build platform/*.egg-info web/node_modules
