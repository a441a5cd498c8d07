"""Hugging Face hub sources: fail in seconds, with the fix, when a config needs the hub offline.

`check_sources(cfg)` (run.py calls it before any heavy work, the SAE's loading included) checks
`cfg.model`, `cfg.data` and `cfg.sae.path`:
- `model.source=hf`: fine when the model's config.json and weights are in the local Hugging
  Face cache (`huggingface_hub.try_to_load_from_cache`: a file lookup, no network); else the
  hub must be reachable.
- `data.source=hf`: datasets are read with `streaming=True`, which reads the hub's files and
  never a local cache, so the hub must be reachable.
- `sae.path=hf://owner/repo/<folder or file>` (train=none with a released SAE): fine when that
  folder (with a file in it) or file is in the local Hugging Face cache (a look in the cache's
  snapshots, no network); else the hub must be reachable. When it is not and the files are
  cached, huggingface_hub is switched to offline mode for the rest of the process, so the
  loader reads the cache at once instead of retrying the hub for ~30 s per file.
- Reachable (`hub_unreachable() is None`): not when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE /
  HF_DATASETS_OFFLINE) is set; else one HEAD request to the hub endpoint (HF_ENDPOINT) with a
  3 s timeout through huggingface_hub's HTTP session (so proxies apply); any HTTP answer counts.
  The probe's answer is kept for the process.
Otherwise a ConfigError of one line naming the config choice (or `sae.path=<value>`), the repo
and the fix. Without this, `model=gemma2_9b`, `data=pile` or an `hf://` sae.path offline failed
after ~30 s with the HTTP library's connection error (the SAE's naming its loader, not
sae.path). A gated model (Gemma) on a reachable hub without a login still fails in
the loader, with the hub's own message.

Knows only the `model` and `data` config nodes and `sae.path`; loads nothing.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath
from typing import Any

from benchmark.errors import ConfigError
from interop.foreign import HF  # the scheme of an sae.path on the hub

TIMEOUT_S = 3.0
FILE_SUFFIXES = (".npz", ".safetensors", ".json", ".pt", ".bin", ".yaml")  # the loaders' files
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
    sae_path = str((cfg.get("sae") or {}).get("path") or "")
    if sae_path.startswith(HF):
        check_hub_sae(sae_path)


def check_hub_sae(uri: str) -> None:
    """`sae.path=hf://owner/repo/<folder or file>`: in the local HF cache, or the hub answers
    (module docstring). A malformed path is left to the loader, which names it."""
    parts = PurePosixPath(uri[len(HF) :]).parts
    if len(parts) < 2:
        return
    repo, rest = "/".join(parts[:2]), "/".join(parts[2:])
    why = hub_unreachable()
    if why is None:
        return
    if sae_cached(repo, rest):
        use_cache_only()
        return
    get = repo
    if PurePosixPath(rest).suffix in FILE_SUFFIXES:  # a file; folders may hold dots (blocks.6.x)
        get = f"{repo} {rest}"
    elif rest:
        get = f"{repo} --include '{rest}/*'"
    raise ConfigError(
        f"sae.path={uri}: not in the local Hugging Face cache and the hub is unreachable "
        f"({why}); download it first with `hf download {get}` where the hub is reachable "
        "(same HF_HOME), or set sae.path to a local folder or file"
    )


def sae_cached(repo: str, rest: str) -> bool:
    """`rest` (a file, or a folder holding a file; "" for the repo's root) of the model repo
    `repo` is in some snapshot of the local HF cache (a file lookup, no network)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    for snapshot in sorted((snapshots / "snapshots").glob("*")):
        target = snapshot / rest if rest else snapshot
        if target.is_file() or (target.is_dir() and any(p.is_file() for p in target.iterdir())):
            return True
    return False


def use_cache_only() -> None:
    """huggingface_hub reads only its local cache from now on in this process (its offline
    mode, as HF_HUB_OFFLINE=1 would set at import): no request, no retries."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


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
