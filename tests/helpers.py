"""Builders shared by the tests: compose the real config tree, build SAEs from conf/sae/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmark.compose import CONF_DIR as CONF
from benchmark.compose import compose_config
from benchmark.saes import build_sae

ROOT = Path(__file__).resolve().parents[1]
SAE_NAMES = sorted(p.stem for p in (CONF / "sae").glob("*.yaml"))
__all__ = ["CONF", "ROOT", "SAE_NAMES", "compose_config", "one_error_line", "run_cli",
           "sae_from_conf"]  # fmt: skip


def sae_from_conf(name: str, d_in: int, d_sae: int, overrides=(), dtype=torch.float32):
    """Build conf/sae/<name>.yaml with the default recipe; target L0 10 (TopK k = 10)."""
    cfg = compose_config([f"sae={name}", "sparsity=l0_10", *overrides])
    return build_sae(cfg.sae, d_in, d_sae).to(dtype)


def run_cli(*args: str, module: str = "benchmark.run", env: dict[str, str] | None = None,
            prefix: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """`python -m <module> <args>` from the repository root, output captured; Hydra's full
    tracebacks off (as a user has them)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    cmd = [*prefix, sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a CLI that exited with status 2 without a traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]
