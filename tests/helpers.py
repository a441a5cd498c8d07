"""Builders shared by the tests: compose the real config tree, build SAEs from conf/sae/."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmark.saes import build_sae

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SAE_NAMES = sorted(p.stem for p in (CONF / "sae").glob("*.yaml"))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed root config, as `python -m benchmark.run <overrides>` would see it,
    e.g. compose_config(["site=mlp", "data.n_train_tokens=2000"])."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def sae_from_conf(name: str, d_in: int, d_sae: int, overrides=(), dtype=torch.float32):
    """Build conf/sae/<name>.yaml with the default recipe; target L0 10 (TopK k = 10)."""
    cfg = compose_config([f"sae={name}", "sparsity=l0_10", *overrides])
    return build_sae(cfg.sae, d_in, d_sae).to(dtype)
