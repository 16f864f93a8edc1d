# Two entry points (see README): `make demo` and `make test`.
# Each creates or reuses .venv, installs the package (re-installing only when
# setup.py or pyproject.toml changes) and runs. `make test` lints (ruff) before pytest.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# the machine's pip config lists local mirrors; drop their "Location ... is ignored" chatter
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m real_megatron demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
