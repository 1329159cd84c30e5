# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# verl without its pins (they would downgrade transformers); the modules it imports come with [test]
	$(BIN)/pip install -q --no-deps 'verl==0.9.1'
	# BFCL v4 data, environment classes and checkers, without its pins (numpy==1.26.4, openai, vllm, ...);
	# the multi-turn classes need only the standard library and mpmath (in our dependencies)
	$(BIN)/pip install -q --no-deps 'bfcl-eval==2026.3.23'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/collapse-probe demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
