"""Compose the suite's config outside the Hydra entry point (scripts, tests, notebooks).

Owns the location of conf/ and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import benchmark.identity  # noqa: F401  (registers the ${run_name:} resolver)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed root config, as `python -m benchmark.run <overrides>` would see it,
    e.g. compose_config(["site=mlp", "data.n_train_tokens=2000"])."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))
