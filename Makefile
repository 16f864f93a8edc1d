# Two entry points (see README): `make demo` and `make test`.
# Each creates or reuses .venv, installs the package (re-installing only when
# setup.py or pyproject.toml changes) and runs. `make test` lints (ruff) before pytest.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install sglang-env clean lock

$(STAMP): setup.py pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# the machine's pip config lists local mirrors; drop their "Location ... is ignored" chatter
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

install: $(STAMP)

# DEMO_ARGS: the demo's own flags, e.g. make demo DEMO_ARGS="--warmup-steps 2 --steps 1" (its smallest size,
# which the docs-command test runs)
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m real_megatron demo $(DEMO_ARGS)

# The real-SGLang tests need the pinned SGLang server environment (.venv-sglang/, ~10 min once,
# then reused while tests/sglang_env/requirements.lock and build.sh are unchanged). A failed build
# does not stop the rest of the suite: the SGLang tests then fail and say what is missing.
sglang-env:
	tests/sglang_env/build.sh

test: $(STAMP)
	@# the real-Slurm tests' packages (Debian's Slurm 22.05, munge, MariaDB): installed when root, at once when present
	tools/install_slurm.sh
	$(VENV)/bin/ruff check .
	tests/sglang_env/build.sh || echo "SGLang test environment NOT built (see above): the real-SGLang tests will fail"
	$(PY) -m pytest -q --durations=25 tests

# requirements.lock pins every package exactly (setup.py keeps the direct requirements); after a
# change to setup.py, rebuild it from a fresh venv.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	{ echo "# Exact versions of every package the project venv installs (pip constraints: make install passes -c)."; \
	  echo "# Regenerate after changing setup.py: make lock (a fresh venv, then pip freeze)."; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-sglang runs
