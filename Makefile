# nextbest: set-up, demo and tests. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,serve,dev]'
	# obp 0.5.7 (the OPE reference for the parity tests) declares torch==1.12 and
	# Python < 3.11, but its estimators run on this stack: install it without its pins.
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python obp==0.5.7
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nextbest demo

# the scoring API on the registry's champion (NEXTBEST_* settings: serving/settings.py)
serve: $(STAMP)
	$(BIN)/nextbest serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/compliance.py
	$(BIN)/python benchmarks/simulator.py --full
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/policy_quality.py --scenario configs/scenarios/retail_bank.yaml
	$(BIN)/python benchmarks/policy_quality.py --scenario configs/scenarios/digital_bank.yaml
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) build *.egg-info
