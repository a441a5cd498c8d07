"""Activation cache keys: what a cache is called, and the token budgets it is asked for.

Owns the key spec (model, layer, site, data and its config, split, token count, dtype, and
CACHE_FORMAT), the key (a readable prefix + a hash of the spec: any change gives a new cache),
the model's key for cached LM losses, the budgets (`data.n_*_tokens`, the stream's sizes) and the
names of the files in a cache directory. The design is in the package docstring
(benchmark/activations/__init__.py).

Must not know how a cache is harvested, checked or read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmark.data import Split, data_identity
from benchmark.errors import ConfigError
from benchmark.identity import digest
from benchmark.models import resolve_device, resolve_dtype
from benchmark.specs import DataSpec, SiteSpec, SourceSpec

CACHE_FORMAT = 1  # bump when the on-disk layout or the harvest changes what is stored
MANIFEST, HARVEST_PLAN, NORM_FILE = "manifest.json", "harvest.json", "norm.json"
KEY_CHARS = 10  # hex characters of a cache key's hash


def cache_key(spec: dict) -> str:
    """Readable prefix + a hash of the whole spec: any change in it gives a new directory."""
    key_hash = digest(spec, KEY_CHARS)
    m, d = spec["model"], spec["data"]
    split = spec["split"] + ("-stream" if "stream" in spec else "")
    return (
        f"{m['name']}_L{spec['layer']}_{spec['site']['name']}_{d['name']}-{split}"
        f"_T{d['context_length']}_N{spec['n_tokens']}_{m['dtype']}_{key_hash}"
    )


def _model_spec(source: SourceSpec, dtype: torch.dtype) -> dict:
    return {**source.model.identity, "dtype": str(dtype).removeprefix("torch.")}


def model_key(source: SourceSpec) -> str:
    """`<model name>-<hash>` of everything that changes the model's outputs (source, path,
    architecture, BOS token, resolved dtype): the same model spec as the activation cache's
    key, used to key cached clean and zero-ablation losses."""
    dtype = resolve_dtype(source.model.dtype, resolve_device(source.device))
    return f"{source.model.name}-{digest(_model_spec(source, dtype), KEY_CHARS)}"


def key_spec(
    source: SourceSpec, site: SiteSpec, split: Split, n_tokens: int, dtype: torch.dtype
) -> dict:
    """The cache key's spec for `site` of `source` (its layer, model and data)."""
    return {
        "format": CACHE_FORMAT,
        "model": _model_spec(source, dtype),
        "layer": source.layer,
        "site": {"name": site.name, "hook": site.hook},
        "data": data_identity(source.data),
        "split": split,
        "n_tokens": n_tokens,
    }


def token_budget(data: DataSpec, split: str) -> int:
    if split not in ("train", "eval"):
        raise ConfigError(f"split={split!r} is not one of train, eval")
    return positive_int(data, f"n_{split}_tokens")


def positive_int(data: DataSpec, key: str) -> int:
    """data.<key> (a budget or a stream size; defaults: STREAM_DEFAULTS), checked to be a
    positive integer."""
    n = data.budget(key)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"data.{key}={n!r} must be a positive integer")
    return n


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


class HarvestTarget:
    """One site being harvested: its hook, cache directory and key spec."""

    def __init__(self, name: str, hook: str, path: Path, spec: dict):
        self.name, self.hook, self.path, self.spec = name, hook, path, spec
