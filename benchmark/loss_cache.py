"""The LM evaluation's cached losses: the clean and zero-ablation cross-entropies depend only on
(model, eval tokens[, hook, norm limit]), so they are kept as small JSON files (written
atomically: safe under concurrent jobs) and reused by every SAE. `benchmark.evaluate` names the
files; the clean loss also keeps its per-window sums (for delta_lm_loss_se).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.fileio import write_json_atomic
from benchmark.metrics import METRICS_VERSION


def cached_scalar(path: Path | None, compute: Callable[[], float]) -> float:
    """A float cached in a small JSON file, written atomically (safe under concurrent jobs)."""
    if path is None:
        return compute()
    if path.exists():
        return float(json.loads(path.read_text())["value"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"value": value})
    return value


def cached(path: Path | None) -> float | None:
    """The float cached at `path` (a small JSON file), or None."""
    if path is None or not path.exists():
        return None
    return float(json.loads(path.read_text())["value"])


def cached_windows(path: Path | None, n_windows: int) -> Tensor | None:
    """The per-window [CE sum, count] cached beside the value at `path` (the clean loss), or
    None when absent (a cache written before they were kept) or of another length."""
    if path is None or not path.exists():
        return None
    windows = json.loads(path.read_text()).get("windows")
    if not isinstance(windows, list) or len(windows) != n_windows:
        return None
    return torch.tensor(windows, dtype=torch.float64)


def store(path: Path | None, value: float, windows: Tensor | None = None) -> float:
    """Cache `value` (and the per-window sums) at `path`, atomically (safe under concurrent
    jobs); returns it."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"value": value}
        if windows is not None:
            entry["windows"] = windows.tolist()
        write_json_atomic(path, entry)
    return value


def tokens_digest(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


def limit_tag(limit: float | None) -> str:
    return "" if limit is None else f"-maxnorm{limit:.17g}"


def paths(
    cache_dir: str | Path | None, model_key: str, tokens: Tensor,
    limits: dict[str, float | None], hooks: list[str],
) -> tuple[Path | None, dict[str, Path | None]]:  # fmt: skip
    """(clean loss file, {hook: zero-ablation loss file}) under cache_dir/losses (None: no
    cache). The metrics version is in the names (a change in which positions are scored
    changes both), the model key (everything that changes its outputs), each hook and its norm
    limit, and a digest of the tokens."""
    folder = Path(cache_dir) / "losses" if cache_dir is not None else None
    if folder is None:
        return None, {h: None for h in hooks}
    digest = tokens_digest(tokens)
    stem = f"v{METRICS_VERSION}-{model_key}"
    zero: dict[str, Path | None] = {
        h: folder / f"zero-{stem}-{h}{limit_tag(limits[h])}-{digest}.json" for h in hooks
    }
    return folder / f"clean-{stem}-{digest}.json", zero
