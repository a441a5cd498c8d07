"""Activation harvest: token windows -> shards on disk, resumable.

Owns the model to harvest with (given, built by a callable or loaded; its dtype checked against
the key), the token windows, the shard plan (~`data.harvest.shard_mb` MB each, a whole number of
forward batches; harvest.json), resuming after the last completed shard, the shard writes
(temp file, then `os.replace`) and the harvest loop (one truncated forward pass per batch for
every site, the progress display, the manifest written last). The design is in the package
docstring (benchmark/activations/__init__.py).

Must not know the locks, the health checks on read, or how batches are served.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.activations.keys import HARVEST_PLAN, HarvestTarget, shard_name
from benchmark.activations.manifest import write_manifest
from benchmark.activations.stores import check_context, check_finite, read_sites, rows_to_numpy
from benchmark.data import Split, non_special_mask, token_windows
from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write, write_json_atomic
from benchmark.models import load_model
from benchmark.progress import progress
from benchmark.specs import DataSpec, HarvestSpec, SourceSpec

log = logging.getLogger("benchmark.activations")

ModelArg = Any  # TransformerBridge | Callable[[], TransformerBridge] | None


def load_bridge(
    model: ModelArg, source: SourceSpec, device: torch.device, dtype: torch.dtype
) -> Any:
    """The model to harvest with: given, built by a callable, or loaded from source.model."""
    bridge: Any
    if model is None:
        bridge = load_model(source.model, device, source.cache_dir)
    elif isinstance(model, torch.nn.Module):
        bridge = model
    elif callable(model):
        bridge = model()
    else:
        raise TypeError(f"model must be a TransformerBridge, a callable or None; got {type(model)}")
    got = next(bridge.parameters()).dtype
    if got != dtype:  # the cache key names the dtype; the rows must be in it
        raise ConfigError(
            f"the model given runs in {got} but model.dtype={source.model.dtype!r} resolves to "
            f"{dtype} on {device}"
        )
    return bridge


def split_windows(
    data: DataSpec, bridge: Any, split: Split, n_tokens: int, fewer: bool
) -> torch.Tensor:
    check_context(data, bridge)
    return token_windows(data, bridge.tokenizer, split, n_tokens, allow_fewer=fewer)


# ---- harvest ----


def harvest_sites(
    bridge: Any,
    windows: torch.Tensor,
    layer: int,
    targets: list[HarvestTarget],
    opts: HarvestSpec,
    show: bool = True,
) -> None:
    """Fill each target's directory with shards, then its manifest (written last). `show`:
    the progress display (tokens done/total, tokens/s, ETA)."""
    started = time.perf_counter()
    mask = non_special_mask(windows, bridge.tokenizer)  # (N, T)
    batch = int(opts.batch_size)
    W = _windows_per_shard(bridge, windows.shape[1], batch, float(opts.shard_mb))
    keep = _rows_per_shard(mask, W, n_tokens=targets[0].spec["n_tokens"])
    plan = {"windows_per_shard": W, "rows_per_shard": keep}
    done = {t.name: resume_point(t, plan) for t in targets}
    device = torch.device(bridge.cfg.device)
    start = min(done.values())
    desc = f"harvest layer {layer}"
    bar = progress(sum(keep), desc, unit="tok", enabled=show, initial=sum(keep[:start]))
    for k in range(start, len(keep)):
        need = [t for t in targets if done[t.name] <= k]
        rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in need}
        first, last = k * W, min((k + 1) * W, len(windows))
        shown = 0  # rows of this shard counted in the progress display
        for b in range(first, last, batch):
            e = min(b + batch, last)
            hooks = {t.name: t.hook for t in need}
            acts = read_sites(bridge, windows[b:e].to(device), mask[b:e].to(device), hooks, layer)
            for name, x in acts.items():
                rows[name].append(x)
            n = min(int(mask[b:e].sum()), keep[k] - shown)
            bar.update(n)
            shown += n
        for t in need:
            shard = torch.cat(rows[t.name])[: keep[k]]  # (rows, d_in)
            where = f"site {t.name} ({t.hook}), shard {k} ({t.path / shard_name(k)})"
            check_finite(shard, mask[first:last], first, where, "harvest")
            write_shard(t.path, k, shard)
        bar.set_postfix(shard=f"{k + 1}/{len(keep)}")
        log.debug("harvest layer %d: shard %d/%d", layer, k + 1, len(keep))
    bar.close()
    for t in targets:
        write_manifest(t, keep, time.perf_counter() - started)


def _windows_per_shard(bridge: Any, T: int, batch: int, shard_mb: float) -> int:
    """Windows per shard: ~shard_mb MB at the widest site, a multiple of the forward batch."""
    c = bridge.cfg
    width = max(c.d_model, c.n_heads * c.d_head)
    itemsize = next(bridge.parameters()).element_size()
    target = shard_mb * 2**20 / (T * width * itemsize)
    return batch * max(1, round(target / batch))


def _rows_per_shard(mask: torch.Tensor, W: int, n_tokens: int) -> list[int]:
    """Rows each shard keeps: its masked positions, the last cut so the total is n_tokens."""
    per_window = mask.sum(dim=1).tolist()
    keep, total = [], 0
    for k in range(0, len(per_window), W):
        rows = min(sum(per_window[k : k + W]), n_tokens - total)
        keep.append(rows)
        total += rows
    return keep


def resume_point(t: HarvestTarget, plan: dict) -> int:
    """Completed leading shards from an earlier, interrupted harvest of the same plan (a shard
    that does not load with its planned row count, and every shard after it, is redone)."""
    plan_file = t.path / HARVEST_PLAN
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        log.info(
            "%s: harvest settings changed since the interrupted run; starting over", t.path.name
        )
        shutil.rmtree(t.path)
    t.path.mkdir(parents=True, exist_ok=True)
    for tmp in t.path.glob(".*"):  # temp files of writes cut short by the interruption
        tmp.unlink()
    write_json_atomic(plan_file, plan)
    k = 0
    planned = plan["rows_per_shard"]
    while k < len(planned) and shard_ok(t.path / shard_name(k), planned[k]):
        k += 1
    for stale in sorted(t.path.glob("shard_*.npy"))[k:]:
        stale.unlink()
    if k:
        log.info("%s: resuming after %d completed shards", t.path.name, k)
    return k


def shard_ok(path: Path, rows: int) -> bool:
    """The shard exists, and its npy header and file size agree with `rows` (cheap)."""
    try:
        return len(np.load(path, mmap_mode="r")) == rows
    except (OSError, ValueError):  # missing; truncated ("mmap length is greater than file size")
        return False


def write_shard(path: Path, k: int, x: torch.Tensor) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, rows_to_numpy(x))

    atomic_write(path / shard_name(k), save)
