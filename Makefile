# The two entry points of the README. Both set up what they need first.
.PHONY: setup demo test compose-test lint bench protos up down

VENV ?= .venv
BIN := $(VENV)/bin

setup:
	bash scripts/bootstrap.sh

demo: setup  ## the main job
	$(BIN)/speechrl demo

test: setup  ## lint, type-check and the whole test suite, compose-test included
	bash scripts/test.sh

compose-test: setup  ## docker compose up for real: builds the images, runs tests/compose
	bash scripts/compose_test.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run_all.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

up: setup
	$(BIN)/speechrl up

down:
	$(BIN)/speechrl down
