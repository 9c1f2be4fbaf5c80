# Each target sets up .venv from nothing when needed. torch is installed first: 2.13.0 is a
# CPU wheel on this machine's disk, whereas letting peft pull torch would fetch a CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench bench-throughput bench-train bench-peft lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m blackbox_smooth.demo

test: setup
	$(PY) -m pytest -q

bench: bench-throughput bench-train bench-peft

bench-throughput: setup
	$(PY) benchmarks/certify_throughput.py

bench-train: setup
	$(PY) benchmarks/train_frontends.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .demo

bench-peft: setup
	$(PY) benchmarks/peft_whitebox.py
