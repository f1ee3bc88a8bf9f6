# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py $$(find ext -type f | sort) 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench stress sanitize clean proto

$(STAMP):
	bash .ci/install-tools
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench,containerd]'
	COWSTORE_REQUIRE_EXTENSION=1 $(PY) -c 'import cowstore, cowstore.fuse._cserver; assert cowstore.engine == "cython", cowstore.engine'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m demo

lint: $(STAMP)
	$(VENV)/bin/ruff check cowstore tests benchmarks demo
	$(VENV)/bin/ruff format --check cowstore tests benchmarks demo
	$(PY) -m mypy cowstore
	$(PY) -m mypy.stubtest cowstore.engines._cengine --allowlist ext/stubtest-allowlist.txt
	$(PY) -m mypy.stubtest cowstore.fuse._cserver --allowlist ext/stubtest-allowlist.txt

test: $(STAMP) lint
	COWSTORE_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -p no:cacheprovider
	COWSTORE_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/engine/test_selection.py

# The Python code for containerd's snapshots API, committed beside its .proto files. The
# grpcio-tools version fixes the runtime floor in pyproject.toml's `containerd` extra.
PROTO_DIR := cowstore/containerd/api
GRPC_TOOLS := grpcio-tools==1.85.1
proto: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check "$(GRPC_TOOLS)"
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. $(PROTO_DIR)/mount.proto $(PROTO_DIR)/snapshots.proto
	$(PY) -m grpc_tools.protoc -I. --grpc_python_out=. $(PROTO_DIR)/snapshots.proto

bench: $(STAMP)
	bash .ci/install-tools
	$(PY) -m pytest -q benchmarks

stress: $(STAMP)
	COWSTORE_STRESS=1 $(PY) -m pytest -q -m slow tests

# The engine tests with the extension built under AddressSanitizer and UBSan; rebuilds the normal one after.
SANITIZE_LIBS = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
sanitize: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check "Cython>=3.0" "setuptools>=64"
	COWSTORE_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1" \
		$(PY) setup.py -q build_ext --inplace --force
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 LD_PRELOAD="$(SANITIZE_LIBS)" COWSTORE_REQUIRE_EXTENSION=1 \
		$(PY) -m pytest -q -p no:cacheprovider -k "not python" tests/engine tests/store/test_snapshotter.py \
		tests/store/test_volume.py tests/store/test_model.py tests/store/test_concurrency.py tests/store/test_bad_input.py; \
		status=$$?; $(PY) setup.py -q build_ext --inplace --force; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info cowstore/*.so cowstore/engines/*.so cowstore/fuse/*.so ext/*.c
