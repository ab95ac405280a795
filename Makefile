# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.skipconv-installed
# Tests run on both cores; the cocotb/Verilator builds are cached under .cache/.
PYTEST_ARGS ?= -n 2
# Caches (trained models, simulator builds) live in the checkout, so a fresh clone starts cold.
export SKIPCONV_CACHE ?= $(CURDIR)/.cache

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/skipconv demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache out build
