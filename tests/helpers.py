"""Builders shared by the tests: compose the real config tree, build SAEs from conf/sae/."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmark.compose import CONF_DIR as CONF
from benchmark.compose import compose_config
from benchmark.saes import build_sae

ROOT = Path(__file__).resolve().parents[1]
SAE_NAMES = sorted(p.stem for p in (CONF / "sae").glob("*.yaml"))
__all__ = ["CONF", "ROOT", "SAE_NAMES", "compose_config", "sae_from_conf"]


def sae_from_conf(name: str, d_in: int, d_sae: int, overrides=(), dtype=torch.float32):
    """Build conf/sae/<name>.yaml with the default recipe; target L0 10 (TopK k = 10)."""
    cfg = compose_config([f"sae={name}", "sparsity=l0_10", *overrides])
    return build_sae(cfg.sae, d_in, d_sae).to(dtype)
