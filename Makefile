# patchbench: `make bench` (default leaderboard) and `make test`.
# Both install what is missing first: uv (into .tools/ if not on PATH), then the locked
# environment in .venv/ (torch and torchvision from PyPI, versions from uv.lock).

PYTHON ?= python3
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
CONFIG ?= default
RUN ?=
ARGS ?=

.PHONY: install bench speed test regress regress-update lint clean

install: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode --all-extras
	@touch $@

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

bench: install
	$(VENV)/bin/patchbench bench --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(ARGS)

# the harness against the forward-pass bound, a naive loop and Quantus: results/speed/speed.md
speed: install
	$(VENV)/bin/patchbench speed $(ARGS)

test: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/python -m pytest -q --durations=15
	$(VENV)/bin/patchbench regress --config ci --quiet

# faithfulness scores of the shipped ci config against results/reference/ci.json
regress: install
	$(VENV)/bin/patchbench regress --config ci

regress-update: install
	$(VENV)/bin/patchbench regress --config ci --update

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) .tools .pytest_cache
