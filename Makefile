# Everyday commands. `make demo` and `make test` set up everything a fresh
# machine lacks (a venv with the Python dependencies, the Rust extension).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.deps-installed
export PYCRCNN_SHARED ?= $(abspath ../shared)

.PHONY: all venv build test test-rust test-python contract demo bench clean

all: build

# Python dependencies, once per venv (torch from PyPI is the large one; ray,
# ~80 MB, is the optional extra behind pycrcnn.distributed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.7,<2" numpy flask requests tqdm torch "ray>=2.9" \
		pytest hypothesis nbclient nbformat ipykernel matplotlib
	touch $(STAMP)

venv: $(STAMP)

# The Rust extension, installed in the venv (editable: python/ is used in place).
build: $(STAMP)
	@command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first"; exit 1; }
	$(VENV)/bin/maturin develop --release --quiet

test-rust:
	cargo test --lib --release

test-python: build
	$(PY) -m pytest -q -ra --durations=15

contract: build
	$(PY) $(PYCRCNN_SHARED)/checks/contract_check.py

test: build test-rust test-python contract

demo: build
	$(PY) scripts/demo.py

bench: build
	$(PY) benches/ops.py
	$(PY) benches/lenet1.py
	$(PY) benches/ray_scaling.py

clean:
	rm -rf target $(VENV) .pytest_cache
