# gridstream — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo "docker-compose")

.PHONY: help setup run up down test test-fast lint fmt typecheck bench settings-docs status e2e clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## install uv (if missing) and every package with its dev tools
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

run: setup ## the whole stack as local processes (embedded Redis/Postgres unless REDIS_URL/DATABASE_URL are set)
	$(UV) run gridstream run

up: ## the same stack with docker compose (needs a Docker engine)
	$(COMPOSE) up --build -d
	$(COMPOSE) ps

down: ## stop the docker compose stack
	$(COMPOSE) down

test: setup ## every test (real Redis/Postgres: REDIS_URL/DATABASE_URL, else testcontainers, else embedded)
	$(UV) run pytest

test-fast: setup ## the tests without the end-to-end run
	$(UV) run pytest -m "not e2e"

lint: ## ruff check + format check + mypy
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

fmt: ## format the code
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

bench: setup ## every benchmark; each prints its figure beside a same-run reference (see bench/RESULTS.md)
	$(UV) run python bench/bus_throughput.py
	$(UV) run python bench/ingest_ticks.py
	$(UV) run python bench/candle_upsert.py
	$(UV) run python bench/signals_batch.py
	$(UV) run python bench/signals_incremental.py
	$(UV) run python bench/failover.py
	$(UV) run python bench/backtest.py

settings-docs: ## regenerate the settings reference (docs/settings.md and its data module)
	$(UV) run python scripts/gen_settings_reference.py

status: ## streams, groups, lag, pending, dead letters and service health
	$(UV) run gridstream status

clean: ## remove local data of embedded servers and archives
	rm -rf .data
