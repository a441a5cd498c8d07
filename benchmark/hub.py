"""Hugging Face hub sources: fail in seconds, with the fix, when a config needs the hub offline.

`check_sources(cfg)` (run.py calls it before any heavy work) checks `cfg.model` and `cfg.data`:
- `model.source=hf`: fine when the model's config.json and weights are in the local Hugging
  Face cache (`huggingface_hub.try_to_load_from_cache`: a file lookup, no network); else the
  hub must be reachable.
- `data.source=hf`: datasets are read with `streaming=True`, which reads the hub's files and
  never a local cache, so the hub must be reachable.
- Reachable (`hub_unreachable() is None`): not when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE /
  HF_DATASETS_OFFLINE) is set; else one HEAD request to the hub endpoint (HF_ENDPOINT) with a
  3 s timeout through huggingface_hub's HTTP session (so proxies apply); any HTTP answer counts.
  The probe's answer is kept for the process.
Otherwise a ConfigError of one line naming the config choice, the repo and the fix. Without
this, `model=gemma2_9b` or `data=pile` offline failed after ~30 s with the HTTP library's
connection error. A gated model (Gemma) on a reachable hub without a login still fails in
the loader, with the hub's own message.

Knows only the `model` and `data` config nodes; loads nothing.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from benchmark.errors import ConfigError

TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Any one of these next to config.json means the weights were downloaded.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_sources(cfg: Any) -> None:
    """Raise ConfigError (one line) when `cfg.model` or `cfg.data` reads from the hub, the
    files are not in the local cache and the hub is unreachable. Takes seconds at most."""
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if model.get("source") == "hf":
        repo = model.get("path") or model.get("architecture")
        if repo and not model_cached(repo) and (why := hub_unreachable()):
            raise ConfigError(
                f"model={model.get('name')} needs {repo} from the Hugging Face hub, which is not "
                f"in the local cache and the hub is unreachable ({why}); download it first with "
                f"`hf download {repo}` where the hub is reachable (same HF_HOME), or use "
                "model=smollm2_135m"
            )
    path = data.get("path")
    if data.get("source") == "hf" and path and (why := hub_unreachable()):
        raise ConfigError(
            f"data={data.get('name')} streams {path} from the Hugging Face hub, which is "
            f"unreachable ({why}); run where it is reachable, or download its files with "
            f"`hf download {path} --repo-type dataset --local-dir DIR` and use data=local "
            "data.path=DIR (.txt, .jsonl or .parquet files), or use data=bundled"
        )


def model_cached(repo: str) -> bool:
    """config.json and a weights file of `repo` are in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, name), str)  # else None or a sentinel

    return cached("config.json") and any(cached(name) for name in WEIGHT_FILES)


def hub_unreachable() -> str | None:
    """None when the hub answers, else why not (an offline variable, or no answer in time)."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT, TIMEOUT_S)


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # any failure to get an HTTP answer means unreachable
        return f"no answer from {endpoint} within {timeout:g} s: {type(e).__name__}"
    return None
