# Everyday commands. `make demo` and `make test` set up everything a fresh
# machine lacks (a venv with the Python dependencies, the Rust extension).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.deps-installed
export PYCRCNN_SHARED ?= $(abspath ../shared)

.PHONY: all venv build wheel test test-rust test-python test-wheel contract demo bench clean

all: build

# Python dependencies, once per venv (torch from PyPI is the large one; ray,
# ~80 MB, is the optional extra behind pycrcnn.distributed; locust drives
# benches/load.py and its slice in tests/test_robustness.py).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.7,<2" numpy flask requests tqdm gunicorn torch "ray>=2.9" \
		pytest hypothesis nbclient nbformat ipykernel matplotlib "locust>=2.20"
	touch $(STAMP)

venv: $(STAMP)

# The Rust extension, installed in the venv (editable: python/ is used in place).
build: $(STAMP)
	@command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first"; exit 1; }
	$(VENV)/bin/maturin develop --release --quiet

# An abi3 wheel in dist/. Same profile and features as `build`, so cargo reuses
# target/ and only links again.
wheel: $(STAMP)
	rm -f dist/pycrcnn-*.whl
	$(VENV)/bin/maturin build --release --out dist --quiet

# The wheel installed into a fresh venv without cargo on the PATH: tests/test_wheel.py
# (test-python runs it too; PYCRCNN_TEST_WHEEL=1 makes a missing wheel a failure).
test-wheel: export PYCRCNN_TEST_WHEEL = 1
test-wheel: wheel
	$(PY) -m pytest -q -ra tests/test_wheel.py

# The Rust sources are rustfmt's (cargo fmt): a diff here fails the tests.
test-rust:
	@if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; \
	else echo "rustfmt is not installed (rustup component add rustfmt): format not checked"; fi
	cargo test --lib --release

test-python: build
	$(PY) -m pytest -q -ra --durations=15

contract: build
	$(PY) $(PYCRCNN_SHARED)/checks/contract_check.py

test: export PYCRCNN_TEST_WHEEL = 1
test: build test-rust wheel test-python contract

demo: build
	$(PY) scripts/demo.py

bench: build
	$(PY) benches/ops.py
	$(PY) benches/lenet1.py
	$(PY) benches/latency.py
	$(PY) benches/throughput.py
	$(PY) benches/ray_scaling.py
	$(PY) benches/robustness.py
	$(PY) benches/load.py

clean:
	rm -rf target $(VENV) .pytest_cache
