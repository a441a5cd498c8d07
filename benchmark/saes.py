"""Building, saving and reloading SAEs from their config node.

Owns: turning a `conf/sae/*.yaml` node into a module (`hydra.utils.instantiate`, the only
registry), and the on-disk form of a trained SAE: `sae.safetensors` (the state dict) beside
`sae_config.yaml` (the resolved node, with d_in and d_sae filled in). Reloading is
`instantiate(saved node)` + `load_state_dict`: no table of names, so an architecture added by
config reloads with no code change here.

Must not know: the data, the model, the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from baselines.base import SparseAutoencoder
from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write

WEIGHTS, CONFIG = "sae.safetensors", "sae_config.yaml"


def sae_node(sae_cfg: DictConfig | dict[str, Any], d_in: int, d_sae: int | None) -> DictConfig:
    """The resolved SAE node with the runner-supplied sizes filled in (d_sae None: a loader
    of a released SAE, whose size is the file's)."""
    plain = (
        OmegaConf.to_container(sae_cfg, resolve=True)
        if isinstance(sae_cfg, DictConfig)
        else dict(sae_cfg)
    )
    node = OmegaConf.create(plain)
    assert isinstance(node, DictConfig)
    node.d_in = int(d_in)
    node.d_sae = int(d_sae) if d_sae is not None else None
    return node


def build_sae(
    sae_cfg: DictConfig | dict[str, Any], d_in: int, d_sae: int | None
) -> SparseAutoencoder:
    try:
        sae = instantiate(sae_node(sae_cfg, d_in, d_sae))
    except InstantiationException as e:
        # An architecture's own check (k out of range, bandwidth <= 0, ...) is a user error;
        # the classes cannot raise ConfigError themselves (baselines never import benchmark).
        if isinstance(e.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(f"sae={sae_cfg['_target_']}: {e.__cause__}") from None
        raise
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(
            f"sae._target_={sae_cfg['_target_']!r} built a {type(sae).__name__}, "
            "which is not a baselines.base.SparseAutoencoder"
        )
    return sae


def save_sae(sae: SparseAutoencoder, folder: str | Path, node: DictConfig) -> Path:
    """Write sae.safetensors and sae_config.yaml into `folder` (atomically, file by file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p))
    atomic_write(folder / CONFIG, lambda p: OmegaConf.save(node, p))
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    folder = Path(folder)
    node = OmegaConf.load(folder / CONFIG)
    sae = instantiate(node)
    sae.load_state_dict(load_file(folder / WEIGHTS, device="cpu"))
    return sae.to(device)
