# Set-up and the two quick-start jobs. Override the torch pin with
# `make test TORCH_SPEC="torch==2.14.1"`; the default is the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test bench install

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH_SPEC)"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/sdtree demo

test: install
	$(BIN)/python -m mypy --strict sdtree
	$(BIN)/python -m pytest sdtree tests property_tests

bench: install
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_adapters.py
	$(BIN)/python benchmarks/bench_collectives.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/bench_tensor_ops.py
	$(BIN)/python benchmarks/bench_staging.py
	$(BIN)/python benchmarks/bench_hf.py
