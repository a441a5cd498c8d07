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


def random_sae_run(tmp_path: Path, hook: str = "blocks.6.hook_resid_post") -> Path:
    """A complete run folder on the bundled model holding an untrained TopK SAE (576 -> 64,
    seed 0): config.yaml, result.json and the SAE, for tools that read runs (probe, interp)."""
    import json

    from omegaconf import OmegaConf

    from benchmark.saes import build_sae, sae_node, save_sae
    from tests.conftest import MODEL_CACHE

    cfg = compose_config(["sae=topk", "sparsity=l0_10", f"cache_dir={MODEL_CACHE}"])
    torch.manual_seed(0)
    sae = build_sae(cfg.sae, 576, 64)
    run = tmp_path / "runs" / "run"
    save_sae(sae, run, sae_node(cfg.sae, 576, 64))
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    result = {"run_id": "run", "config_hash": "abc", "status": "complete", "hook": hook,
              "model": "smollm2_135m", "site": "residual", "layer": 6, "sae": "topk",
              "seed": 0, "l0": 10.0, "target_l0": 10, "d_in": 576, "d_sae": 64}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    return run
