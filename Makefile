# One entry point for people and CI. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the package (CPU torch pinned in the install step) and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test benchmark heldout reports scaling clean

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

# Every report that names the library's code version, in the order they read each other's saved
# results (docs/benchmarks.md, "After a library change"). Hours from an empty benchmarks/cache/.
reports: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout --confirm
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout --two-seeds --confirm --subsets 40
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout --two-seeds
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout --two-seeds --subsets 40
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout_fit_seeds --seeds 3 --subsets 40
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.heldout_fit_seeds --seeds 3 --subsets 40 --confirm
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.run --skip-ablations

scaling: install
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.scaling

clean:
	rm -rf $(VENV) .pytest_cache
