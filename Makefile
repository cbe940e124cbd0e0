# Keyplane: `make run` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit bench bench-instructions bench-timed schema constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/keyplane migrate
	$(BIN)/keyplane bootstrap-default
	$(BIN)/keyplane serve --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(BIN)/ruff check app models resolvers tests $(wildcard bench)
	$(BIN)/ruff format --check app models resolvers tests $(wildcard bench)
	$(BIN)/mypy

# The suite runs twice, once per database, each in its own pytest process
# (Tortoise caches generated SQL per connection label).
test: lint
	KEYPLANE_TEST_DATABASE=sqlite $(BIN)/pytest -q
	KEYPLANE_TEST_DATABASE=postgres $(BIN)/pytest -q

schema: $(STAMP)
	$(BIN)/keyplane export-schema > schema.graphql

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Instructions and simulated cache misses per verification, counted by valgrind (bench/instructions.py).
bench-instructions: $(STAMP)
	command -v valgrind >/dev/null || { apt-get update && apt-get install -y valgrind; }
	$(BIN)/python -m bench.instructions

# The same verification case timed in process, 1,000 against 100,000 keys (about a minute).
bench-timed: $(STAMP)
	$(BIN)/python -m bench.instructions timed

# Pin what .venv holds now (after upgrading it and passing `make test`).
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
