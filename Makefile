# Two commands a newcomer needs: `make demo` and `make test`. Each installs what it lacks.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AP := $(BIN)/audit-platform
PYTEST_ARGS ?=

.PHONY: install demo test test-unit lint format stack-up stack-down clean screenshot chromium helm oidc

$(BIN)/python:
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { \
	  echo "python3 has no venv module; installing python3-venv"; \
	  apt-get update && apt-get install -y --no-install-recommends python3-venv; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml dev/pyproject.toml sdk/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./dev
	@touch $@

install: $(VENV)/.installed

# Starts PostgreSQL and Elasticsearch, a demo shop service with traffic, Dagster (webserver and
# daemon) and the Audit API; Ctrl-C stops everything it started.
demo: install
	$(AP) demo

# Debian's Chromium, for the Explorer's browser tests and the screenshots.
chromium:
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; }

# Helm, for rendering the Kubernetes chart in the tests: built from the Go module proxy (no
# download site is needed), once per checkout.
HELM_VERSION := v3.22.0
HELM := .stack/tools/helm
$(HELM):
	@command -v go >/dev/null || { echo "Go is needed to build Helm $(HELM_VERSION) (go install)"; exit 1; }
	GOBIN=$(CURDIR)/.stack/tools go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
helm: $(HELM)

# The OpenID provider the Explorer's single sign-on tests sign in with (panva's oidc-provider,
# from the npm registry, at the version package-lock.json records).
OIDC := dev/oidc/node_modules/.package-lock.json
$(OIDC): dev/oidc/package-lock.json
	@command -v npm >/dev/null || { apt-get update && apt-get install -y --no-install-recommends nodejs npm; }
	npm ci --prefix dev/oidc --no-audit --no-fund --silent
oidc: $(OIDC)

# With the demo running: headless-Chromium screenshots of the Dagster asset graph and of every
# page of the Audit Explorer, for README.
screenshot: install chromium
	$(BIN)/python -m audit_platform_dev.demo.screenshot graph --out docs/asset-graph.png
	$(BIN)/python -m audit_platform_dev.demo.screenshot explorer --out docs

# Starts the servers this checkout needs (reusing running ones), runs every test, and stops
# only what it started. pytest's exit code, including 5 for "no tests", is make's.
test: install chromium $(HELM) $(OIDC)
	$(AP) stack run -- $(BIN)/pytest $(PYTEST_ARGS)

# The fast tier: the tests that need no server (pure logic, recorded protocol bytes), in
# seconds, without starting anything.
test-unit: install
	$(BIN)/pytest audit_platform_tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@! grep -rn --include='*.py' -e 'fmt: skip' -e 'fmt: off' audit_platform audit_platform_tests benchmarks docs dev sdk \
	  || { echo "ruff format owns layout: remove the formatter suppressions above"; exit 1; }

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

stack-up: install
	$(AP) stack up

stack-down: install
	$(AP) stack down

clean: stack-down
	rm -rf .stack $(VENV)
