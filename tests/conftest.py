"""Shared fixtures: the real Hydra config (`compose`) and the real bundled model, loaded once.

The bundled model's converted weights live in the repo's `.cache/models/` (the first run
converts the GGUF, ~25 s; later runs load in ~2 s). Tests that use it are marked integration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from omegaconf import DictConfig

from tests.helpers import ROOT as REPO
from tests.helpers import compose_config

MODEL_CACHE = REPO / ".cache"  # where the converted bundled model is kept between runs


@pytest.fixture
def compose() -> Callable[[Sequence[str]], DictConfig]:
    return compose_config


@pytest.fixture(scope="session")
def bundled_model():
    """The real bundled SmolLM2 bridge on CPU, shared by the whole session (do not add hooks
    without removing them)."""
    from benchmark.models import load_model
    from benchmark.specs import ModelSpec

    cfg = compose_config()
    return load_model(ModelSpec.of(cfg.model), torch.device("cpu"), MODEL_CACHE)
