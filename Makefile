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

.PHONY: setup run test browser services-down lock images container-tools test-containers

setup: $(VENV)/.installed

# Every package from the lock file, by version and sha256 (torch: the CPU build, torch==X+cpu),
# then the project itself with the locked setuptools. A changed lock rebuilds the environment.
$(VENV)/.installed: locks/dev.txt pyproject.toml
	@echo "installing the locked dependencies into $(VENV) (first use only, about 4 minutes)"
	@rm -rf $(VENV)
	@python3 -m venv $(VENV)
	@$(BIN)/pip install --quiet --quiet --require-hashes --no-deps -r locks/dev.txt
	@$(BIN)/pip install --quiet --quiet --no-deps --no-build-isolation -e .
	@touch $@

run: setup
	@$(BIN)/tuneline services up
	@$(BIN)/tuneline run --params deployments/params/default.yaml

test: setup browser
	$(BIN)/python -m pytest -q

# Debian's chromium for the browser test (tests/reliability/test_browser.py), installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the browser test"; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }

# The container images (services/images.py): a local base image (mmdebstrap), the lock's wheels as a file
# index, podman (or docker) build; prints build seconds and image size.
images: setup container-tools
	$(BIN)/python -m services.images build

# The container stage (.ci/run, after the unit suite): the CPU image built, flow runs through a Docker-API
# worker on podman's socket, two-node torchrun in two containers, the Kubernetes pod template under podman.
test-containers: setup container-tools
	$(BIN)/python -m pytest -q -n 0 -m containers tests/containers

# podman, runc (crun fails on hybrid cgroup hosts) and mmdebstrap from Debian, installed when missing.
container-tools:
	@command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || \
	  { echo "installing podman, runc and mmdebstrap"; apt-get install -y -qq podman runc mmdebstrap >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq podman runc mmdebstrap >/dev/null; }; }

services-down: setup
	$(BIN)/tuneline services down

# Refresh locks/*.txt from the environment the tests passed in (UPGRADE=1: newest allowed versions).
lock: setup
	$(BIN)/python locks/lock.py $(if $(UPGRADE),--upgrade)
