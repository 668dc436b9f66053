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

.PHONY: demo test install clean serve serve-stop

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# A local Prefect server (SQLite under PREFECT_HOME) on 127.0.0.1:$(PORT), the process pool `local`, the
# deployments of prefect.yaml and a worker, in the background; PIDs in $(PREFECT_HOME)/serve.json.
PORT ?= 4200
serve: $(STAMP)
	$(PY) -m flows.serve start --port $(PORT)

serve-stop:
	$(PY) -m flows.serve stop

clean:
	rm -rf demo-output .prefect .pytest_cache
