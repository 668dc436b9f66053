# `make demo` and `make test` are self-sufficient on a fresh machine: they create .venv when missing,
# install torch first (so nothing pulls another build), then the project with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export DO_NOT_TRACK := 1
export ORT_DISABLE_TELEMETRY := 1

.PHONY: demo test install lock system-deps clean serve serve-stop

# a failed creation (no python3-venv package: the interpreter is copied, pip is not) removes the half-made .venv,
# so the next make, after the fix, creates it again instead of taking it for done
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --upgrade pip || { rm -rf $(VENV); exit 1; }

# constraints-dev.txt pins every package the cpu and dev extras bring, so pip resolves without backtracking and
# every test run gets the same set; `make lock` rewrites it from a working .venv after a dependency changes.
LOCK := constraints-dev.txt
$(STAMP): pyproject.toml runtime/pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c $(LOCK) -e ./runtime -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lock: | $(PY)
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --exclude-editable | grep -v '^-e'; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

demo: $(STAMP)
	$(PY) -m flows.demo

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

# The end-to-end tests run Prefect on PostgreSQL and check its UI in headless Chromium (Debian packages):
# installed when missing and possible (root with apt-get); otherwise those checks skip, saying why.
SYSTEM_PACKAGES := postgresql chromium chromium-driver
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v chromium >/dev/null \
	    || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SYSTEM_PACKAGES)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null) \
	      || echo "make: could not install $(SYSTEM_PACKAGES): the tests that need them will skip"; \
	  else echo "make: $(SYSTEM_PACKAGES) missing and not root: the tests that need them will skip"; fi; \
	fi

# A local Prefect stack on 127.0.0.1:$(PORT): `prefect server start --background` (SQLite under PREFECT_HOME), the
# process pool `local`, the deployments of prefect.yaml and a worker in the background (flows/serve.py says what
# it adds to Prefect's own commands); serve-stop stops the worker with its flow runs, then `prefect server stop`.
PORT ?= 4200
DEPLOYMENTS ?= demo,celeba-64
serve: $(STAMP)
	$(PY) -m flows.serve start --port $(PORT) --deployments $(DEPLOYMENTS)

serve-stop:
	$(PY) -m flows.serve stop

clean:
	rm -rf demo-output .prefect .pytest_cache
