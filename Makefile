# The two commands of the README: `make train` (the main job) and `make test` (the whole suite); `make docs` builds
# the documentation site into site/.
# Each creates .venv and installs what it needs; nothing but Python 3.11+ is assumed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: train test docs lint setup dataset demo clean

train: setup dataset
	$(BIN)/python experiments/train.py

test: setup dataset
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --doctest-modules convlib tests

# The site, strict: a missing docstring on a public name (tests/test_docs.py), a broken cross-reference, a warning
# of any plugin, a failing tutorial or a failing `console` command stops the build. No network needed.
docs: setup dataset
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean

# ruff: lint (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and the formatter's check, as configured in pyproject.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,plot,docs]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we may install it: the one place a clone opts in to installing (the
# library never runs apt-get unless given apt_install=convlib.data.apt_get_install); otherwise convlib.data falls
# back to TFDS's download manager or says in one line what to do.
dataset:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; convlib.data will try its fallbacks"; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
