# Every target sets up what it needs on a fresh machine: a venv with the package and its extras,
# the Kafka jars (downloaded on first use into ~/.cache/outbox), the embedded servers.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: test lint demo install bench chaos clean

test: install  ## the full suite against real PostgreSQL 18 + Apache Kafka (what CI runs)
	$(BIN)/pytest

lint: install  ## unused or undefined names, import order
	$(BIN)/ruff check .

demo: install  ## everything at once for a first look
	$(BIN)/outbox demo

bench: install  ## benchmarks; results land in bench/results/
	$(BIN)/python -m bench.relay_bench
	$(BIN)/python -m bench.inbox_bench
	$(BIN)/python -m bench.debezium_bench  # skips with a message when Java 17+ / javac are missing

chaos: install  ## break everything under load and count (30 faults); result in bench/results/
	$(BIN)/python -m bench.chaos --faults 30 --save

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

clean:
	-$(BIN)/outbox dev down
	rm -rf $(VENV) .outbox
