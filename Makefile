# The README's two commands are `make quickstart` and `make test`; each does its own set-up.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup quickstart downstream test test-all lint typecheck bench clean-cache

setup:
	@bash scripts/setup.sh

quickstart: setup   ## the main job: JumpReLU vs Gated vs TopK at matched L0 on the bundled model
	$(PY) -m benchmark.run -m +experiment=quickstart
	$(PY) -m benchmark.report results/quickstart --out results/quickstart/report --l0-tolerance 0.05 --resolution 0.07

downstream: setup   ## probing and automated interpretability on the quickstart's SAEs (after make quickstart)
	$(PY) -m benchmark.probe results/quickstart
	$(PY) -m benchmark.interp results/quickstart --latents 8
	$(PY) -m benchmark.report results/quickstart --out results/quickstart/report --l0-tolerance 0.05 --resolution 0.07

test: setup         ## the default test run (no slow, no gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: setup     ## every test that runs on this machine, slow ones included
	$(PY) -m pytest -m "not gpu" -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

typecheck: setup
	$(PY) -m mypy

bench: setup
	$(PY) scripts/bench_harvest.py
	$(PY) scripts/bench_train.py

clean-cache:        ## activation and model caches (results are kept)
	rm -rf .cache
