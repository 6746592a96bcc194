# `make run` and `make test` set everything up on a machine with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The locks: every package with its exact version and the hashes of its files (pip refuses a file whose
# hash is not listed). requirements-dev.lock: the service, the embedded servers and the tests (make
# test, CI); requirements.lock: the service alone (deploy/Dockerfile). `make lock` makes both anew.
LOCK := requirements-dev.lock

.PHONY: run test fuzz stop bench clean lock

# The dependencies from the lock only, then tracker itself without any (its build backend, setuptools,
# is locked too: no unhashed build requirement is fetched).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
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
	rm -rf $(VENV) .venv-lock .data

# Resolves pyproject.toml's dependencies (dev extras included) anew with pip-tools, in a venv of its
# own, through pip's own configuration (indexes, mirrors): the hashes are those of the files pip gets.
# The runtime lock starts from the dev lock's versions, so both name the same ones. Commit both files.
PIP_TOOLS := pip-tools==7.7.0
COMPILE := CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	test -x .venv-lock/bin/pip-compile || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet $(PIP_TOOLS); }
	$(COMPILE) --extra dev -o requirements-dev.lock $(LOCK_ARGS) pyproject.toml
	@# tracker[dev] names tracker[embedded]: the package itself, installed apart (pip install -e .).
	sed -i '/^# WARNING: pip install will require/,/^    # via tracker (pyproject.toml)$$/d' requirements-dev.lock
	cp requirements-dev.lock requirements.lock
	$(COMPILE) -o requirements.lock $(LOCK_ARGS) pyproject.toml
