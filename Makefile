# Two entry points (see README): `make demo` runs the whole pipeline, `make test` runs the tests.
# Both create the pinned virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

LOCK := requirements/requirements.lock
WHEELS := .cache/wheelhouse
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup demo test test-fast lock up down serve image wheels

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The lock's wheels, downloaded once: the venv and the step image (containers/build.sh) install these files.
$(WHEELS)/.lock.sha256: $(LOCK) | $(VENV)/bin/python
	$(PIP) wheel --no-deps -r $(LOCK) -w $(WHEELS)
	sha256sum < $(LOCK) > $@

wheels: $(WHEELS)/.lock.sha256

$(VENV)/.installed: $(LOCK) pyproject.toml $(WHEELS)/.lock.sha256 | $(VENV)/bin/python
	$(PIP) install --no-index --find-links $(WHEELS) -r $(LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m grappa run

test: setup
	$(PY) -m pytest -q --durations=15

# the fast lane: everything but whole pipelines, services, DVC and containers (tests/conftest.py INTEGRATION)
test-fast: setup
	$(PY) -m pytest -q -m "not integration"

# The loop's services on loopback (README, "The loop"): Airflow http://127.0.0.1:8080 and MLflow :5000.
# RUNNER=docker: every step in a container of the step image (`make image`; containers/README.md).
RUNNER ?= local
up: setup
	$(PY) -m stack.local start --runner $(RUNNER)

down:
	$(PY) -m stack.local stop

# The CPU step image grappa-pipeline:cpu (containers/README.md): Docker engine, base image and wheels as needed.
image: setup
	containers/build.sh

# The champion over HTTP on 127.0.0.1:5001: POST images to /invocations, get embeddings back.
MODEL ?= grappa-fused
serve: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		$(VENV)/bin/mlflow models serve -m "models:/$(MODEL)@champion" -h 127.0.0.1 -p 5001 --env-manager local

# Re-resolve the pinned environment (needs `uv`; run after editing requirements.in).
lock:
	uv pip compile requirements/requirements.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements/requirements.lock
