"""Activation cache statistics: the manifest of a harvested cache, the norm of a streamed one.

Owns manifest.json (each shard's rows, size and CRC-32, sealed with its own checksum; norm_scale
c = sqrt(mean ||x||^2) over every cached row, float64; the norm quantiles and the share of rows
over OUTLIER_FACTOR x the median) and norm.json (the stream's norm_scale, estimated on the
split's first `data.stream_norm_tokens` rows). The design is in the package docstring
(benchmark/activations/__init__.py).

Must not know how the shards are planned, written or resumed, the locks, or how batches are
served.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import integrity
from benchmark.activations.keys import MANIFEST, NORM_FILE, HarvestTarget, shard_name
from benchmark.activations.stores import rows_to_float32
from benchmark.activations.streaming import stream_site_rows
from benchmark.fileio import write_json_atomic
from benchmark.models import hook_name
from benchmark.progress import progress
from benchmark.specs import SiteSpec, SourceSpec

log = logging.getLogger("benchmark.activations")

OUTLIER_FACTOR = 5.0  # rows with norm > 5x the median are counted in the manifest's stats


def write_manifest(t: HarvestTarget, keep: list[int], seconds: float) -> None:
    names = [shard_name(k) for k in range(len(keep))]
    files = integrity.file_records(t.path, names)  # {name: {"bytes", "crc32"}}
    shards = [{"file": f, "rows": rows, **files[f]} for f, rows in zip(names, keep)]
    first = np.load(t.path / shards[0]["file"], mmap_mode="r")
    dtype = "bfloat16" if first.dtype == np.int16 else str(first.dtype)
    norms = _row_norms(t.path, shards, dtype)
    mean_sq = float(np.mean(norms**2))
    median = float(np.median(norms))
    manifest = {
        "key": t.path.name,
        "spec": t.spec,
        "hook": t.hook,
        "d_in": int(first.shape[1]),
        "n_tokens": int(len(norms)),
        "dtype": dtype,
        "norm_scale": math.sqrt(mean_sq),
        "stats": {
            "mean_sq_norm": mean_sq,
            "norm_quantiles": dict(
                zip(
                    ("q50", "q90", "q99", "q999", "max"),
                    np.quantile(norms, [0.5, 0.9, 0.99, 0.999, 1.0]).tolist(),
                )
            ),
            "frac_norm_over_5x_median": float(np.mean(norms > OUTLIER_FACTOR * median)),
        },
        "shards": shards,
        "harvest_seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(t.path / MANIFEST, integrity.seal(manifest))
    integrity.mark_verified(t.path, t.path / MANIFEST)  # checksummed just now, by this process
    log.info(
        "cached %s: %d tokens, norm_scale %.4g", t.path.name, len(norms), manifest["norm_scale"]
    )


def _row_norms(path: Path, shards: list[dict], dtype: str) -> np.ndarray:
    """||x|| of every cached row, accumulated in float64, a shard at a time."""
    norms = []
    for s in shards:
        x = rows_to_float32(np.load(path / s["file"]), dtype).double()  # (rows, d_in)
        norms.append(x.square().sum(dim=1).sqrt().numpy())
    return np.concatenate(norms)


# ---- streaming ----


def estimate_norm(
    bridge: Any, source: SourceSpec, site: SiteSpec, spec: dict, path: Path, show: bool = True
) -> None:
    """c = sqrt(mean ||x||^2) over the first spec["n_tokens"] streamed rows (float64; a split
    with fewer rows is read again from its start), written to path/norm.json."""
    hook = hook_name(source.model, spec["layer"], site, bridge)
    n_tokens, have, sum_sq = spec["n_tokens"], 0, 0.0
    rows = stream_site_rows(bridge, source.data, spec["layer"], site.name, hook)
    bar = progress(n_tokens, f"stream norm layer {spec['layer']}", unit="tok", enabled=show)
    for x in rows:  # (rows, d_in)
        x = x[: n_tokens - have].double()
        sum_sq += x.square().sum().item()
        have += len(x)
        bar.update(len(x))
        if have == n_tokens:
            break
    rows.close()
    bar.close()
    norm = {
        "key": path.name,
        "spec": spec,
        "hook": hook,
        "d_in": int(x.shape[1]),
        "n_tokens": n_tokens,
        "norm_scale": math.sqrt(sum_sq / n_tokens),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / NORM_FILE, integrity.seal(norm))
    log.info("stream %s: norm_scale %.4g over %d tokens", path.name, norm["norm_scale"], have)
