# Two entry points (see README): `make demo` runs the whole pipeline, `make test` runs the tests.
# Both create the pinned virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lock

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

# Re-resolve the pinned environment (needs `uv`; run after editing requirements.in).
lock:
	uv pip compile requirements/requirements.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements/requirements.lock
