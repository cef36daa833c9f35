# Two commands do all set-up on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv data services test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST is the default data set; it comes from Debian's package.
data:
	@if [ -n "$$BNNKIT_DATA" ] && ls "$$BNNKIT_DATA"/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST found under \$$BNNKIT_DATA"; \
	elif [ -f $(FMNIST) ]; then \
		echo "Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = "0" ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else \
		echo "Fashion-MNIST is missing. Install it with:"; \
		echo "    sudo apt-get install -y dataset-fashion-mnist"; \
		echo "or put the four idx .gz files in \$$BNNKIT_DATA/fashion-mnist/"; exit 1; \
	fi

# PostgreSQL for the distributed placement search; the tests start their own throw-away cluster.
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL found"; \
	elif [ "$$(id -u)" = "0" ]; then \
		(apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null; \
	else \
		echo "PostgreSQL is missing (the distributed-search tests will be skipped). Install it with:"; \
		echo "    sudo apt-get install -y postgresql"; \
	fi

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: venv data services lint
	$(VENV)/bin/pytest

# glibc's default allocator returns large tensors to the OS on free and page-faults them in on
# the next forward pass; fixed thresholds make CPU timings repeatable (BENCHMARKS.md).
CPU_MALLOC := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296

bench: venv data
	$(CPU_MALLOC) $(VENV)/bin/bnnkit bench --out runs/bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
