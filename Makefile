# `make run` and `make test` set everything up on a machine with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test fuzz stop bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tracker.devstack run

test: $(STAMP)
	$(BIN)/python -m tracker.devstack test $(PYTEST_ARGS)

# The fuzzing of `make test` (schemathesis and hypothesis) with 50 times the examples, drawn at random
# (`make test` draws the same ones every run) and failing examples kept in .hypothesis/: for nightly runs.
fuzz: $(STAMP)
	TRACKER_FUZZ_EXAMPLES=$${TRACKER_FUZZ_EXAMPLES:-1000} $(BIN)/python -m tracker.devstack test tests/test_openapi.py tests/test_properties.py --hypothesis-profile=fuzz $(PYTEST_ARGS)

stop: $(STAMP)
	$(BIN)/python -m tracker.devstack stop

bench: $(STAMP)
	benchmarks/run

clean: stop
	rm -rf $(VENV) .data
