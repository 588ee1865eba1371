# One entry point for people and CI. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package (CPU torch pinned in the install step) and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test benchmark heldout scaling clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,eval,docs]"
	$(BIN)/python -m pip install -q --no-deps kronfluence==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/stride-nnsight demo

test: install
	$(BIN)/python -m pytest -q

benchmark: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run

heldout: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout

scaling: install
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.scaling

clean:
	rm -rf $(VENV) .pytest_cache
