# Two entry points (see README): `make demo` runs the whole pipeline, `make test` runs the tests.
# Both create the pinned virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lock up down serve

$(VENV)/.installed: requirements/requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pipeline_steps run

test: setup
	$(PY) -m pytest -q

# The loop's services on loopback (README, "The loop"): Airflow http://127.0.0.1:8080 and MLflow :5000.
up: setup
	$(PY) -m stack.local start

down:
	$(PY) -m stack.local stop

# The champion over HTTP on 127.0.0.1:5001: POST images to /invocations, get embeddings back.
MODEL ?= grappa-fused
serve: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		$(VENV)/bin/mlflow models serve -m "models:/$(MODEL)@champion" -h 127.0.0.1 -p 5001 --env-manager local

# Re-resolve the pinned environment (needs `uv`; run after editing requirements.in).
lock:
	uv pip compile requirements/requirements.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements/requirements.lock
