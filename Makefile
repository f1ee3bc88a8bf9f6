# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py ext/_cengine.pyx ext/_cengine.pxd 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench stress sanitize clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	COWSTORE_REQUIRE_EXTENSION=1 $(PY) -c 'import cowstore; assert cowstore.engine == "cython", cowstore.engine'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m cowstore.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check cowstore tests benchmarks
	$(VENV)/bin/ruff format --check cowstore tests benchmarks

test: $(STAMP) lint
	COWSTORE_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -p no:cacheprovider
	COWSTORE_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_backend.py

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks

stress: $(STAMP)
	COWSTORE_STRESS=1 $(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) build *.egg-info cowstore/*.so ext/*.c
