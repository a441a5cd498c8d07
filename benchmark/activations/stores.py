"""The cached reader: batches from a cache's shards, and the forward pass that reads a layer.

Owns `ActivationStore` (shuffled, seeded batches from the shards, any number of epochs, RAM
bounded by the shuffle buffer), the forward pass that reads a layer's sites (`read_sites`)
with its NaN/inf check, and the storage dtype (bfloat16 kept as its int16 bits). The
streaming reader (`StreamingStore`) is in streaming.py. The design is in the package docstring
(benchmark/activations/__init__.py).

Must not know how a cache is harvested, locked or repaired, nor how norm_scale is computed: it
reads manifest.json and norm.json as they were written.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import integrity
from benchmark.activations.keys import MANIFEST
from benchmark.errors import ActivationError, ConfigError
from benchmark.specs import DataSpec

log = logging.getLogger("benchmark.activations")


class ActivationStore:
    """A complete cached set of activations for one (model, layer, site, data, split, budget)."""

    def __init__(self, path: Path, *, from_cache: bool = True, buffer_mb: int = 256):
        manifest = integrity.unseal((path / MANIFEST).read_text())  # checked by cache_usable
        self.path = path
        self.key: str = manifest["key"]
        self.hook: str = manifest["hook"]
        self.d_in: int = manifest["d_in"]
        self.n_tokens: int = manifest["n_tokens"]
        self.norm_scale: float = manifest["norm_scale"]
        self.dtype: str = manifest["dtype"]
        self.stats: dict = manifest["stats"]
        self.spec: dict = manifest["spec"]
        self.from_cache = from_cache  # False when this process harvested it
        self.shards: list[tuple[str, int]] = [(s["file"], s["rows"]) for s in manifest["shards"]]
        self.buffer_rows = max(1, buffer_mb * 2**20 // (self.d_in * 4))
        # `without_outliers`: rows with a larger norm (raw units) are skipped; None keeps all
        self.max_norm: float | None = None
        self.n_excluded = 0  # rows of the cache skipped for their norm

    def __repr__(self) -> str:
        return f"ActivationStore({self.key}, n_tokens={self.n_tokens}, d_in={self.d_in})"

    def without_outliers(self, multiple: float | None) -> ActivationStore:
        """This store with every row whose norm exceeds `multiple` x the cache's median norm
        left out (`data.max_norm_multiple`; None: this store itself). The copy's `n_tokens` counts
        the rows kept, its `norm_scale` is the root-mean-square norm of those rows (so that
        E||x||^2 = 1 holds for what the SAE sees), `max_norm` is the limit in raw units and
        `n_excluded` the rows left out. The rows kept and their order are those of this store
        with the others removed. One pass over the shards (float64 norms, as the manifest's)."""
        if multiple is None:
            return self
        out = copy.copy(self)
        out.max_norm = float(multiple) * float(self.stats["norm_quantiles"]["q50"])
        kept, sum_sq = 0, 0.0
        for i in range(len(self.shards)):
            sq = _sq_norms(np.array(self._load(i)), self.dtype)  # read, not mapped
            within = sq <= out.max_norm**2
            kept, sum_sq = kept + int(within.sum()), sum_sq + float(sq[within].sum())
        if kept == 0:
            raise ConfigError(f"data.max_norm_multiple={multiple} leaves no row of {self.key}")
        out.n_tokens, out.n_excluded = kept, self.n_tokens - kept
        out.norm_scale = math.sqrt(sum_sq / kept)
        return out

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epochs: float | None = None,
        normalise: bool = True,
        shuffle: bool = True,
    ) -> Iterator[torch.Tensor]:
        """float32 (batch_size, d_in) batches; endless when `epochs` is None.

        Exactly round(epochs * n_tokens) rows in all, epoch after epoch (every batch full but
        possibly the last). Shuffling: shard order per epoch, then rows within a buffer of a
        few shards. `normalise` divides by `norm_scale`.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        total = math.inf if epochs is None else round(epochs * self.n_tokens)
        scale = 1.0 / self.norm_scale if normalise else 1.0
        rng = np.random.default_rng(seed)
        if total <= 0:
            return
        carry, done = None, 0
        for chunk in self._chunks(rng, shuffle):
            if self.max_norm is not None:
                chunk = chunk[_sq_norms(chunk, self.dtype) <= self.max_norm**2]
            # Leftover rows go first, unshuffled: epoch e ends before epoch e + 1 begins.
            buf = chunk if carry is None else np.concatenate([carry, chunk])  # (R, d_in)
            start = 0
            while len(buf) - start >= (want := int(min(batch_size, total - done))):
                yield rows_to_float32(buf[start : start + want], self.dtype) * scale
                start, done = start + want, done + want
                if done >= total:
                    return
            carry = buf[start:]

    def _chunks(self, rng: np.random.Generator, shuffle: bool) -> Iterator[np.ndarray]:
        """Endless: per epoch, groups of shards (at most ~buffer_rows rows), rows shuffled."""
        while True:
            order = rng.permutation(len(self.shards)) if shuffle else range(len(self.shards))
            group: list[np.ndarray] = []
            for i in order:
                group.append(self._load(i))
                if sum(map(len, group)) >= self.buffer_rows:
                    yield _mix(group, rng, shuffle)
                    group = []
            if group:
                yield _mix(group, rng, shuffle)

    def _load(self, i: int) -> np.ndarray:
        return np.load(self.path / self.shards[i][0], mmap_mode="r")


# ---- reading the model ----


@torch.inference_mode()
def read_sites(
    bridge: Any, tokens: torch.Tensor, mask: torch.Tensor, hooks: dict[str, str], layer: int
) -> dict[str, torch.Tensor]:
    """One forward pass stopped after `layer`: {site: (n masked positions, d_in) on CPU}."""
    flat = mask.reshape(-1)  # (B*T,)
    out: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(act: torch.Tensor, hook: Any) -> None:
            out[name] = act.reshape(flat.shape[0], -1)[flat].cpu()  # (B, T, ...) -> (n, d_in)

        return hook

    bridge.run_with_hooks(
        tokens,
        fwd_hooks=[(h, capture(name)) for name, h in hooks.items()],
        stop_at_layer=layer + 1,
        return_type=None,
    )
    return out


def check_finite(x: torch.Tensor, mask: torch.Tensor, first: int, where: str, of: str) -> None:
    """Raise naming `where`, the window and position of the first NaN/inf in x (rows of the
    windows first, first + 1, ... whose non-special positions are `mask`)."""
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    row, dim = (int(i) for i in bad.nonzero()[0])
    window, pos = (int(i) for i in mask.nonzero()[row])
    raise ActivationError(
        f"non-finite activation {x[row, dim].item()} at {where}, row {row}: "
        f"window {first + window} of the {of}, position {pos}, dimension {dim}"
    )


def check_context(data: DataSpec, bridge: Any) -> None:
    n_ctx = getattr(bridge.cfg, "n_ctx", None)
    if n_ctx and data.context_length > n_ctx:
        raise ConfigError(
            f"data.context_length={data.context_length} exceeds the model's context {n_ctx}"
        )


# ---- streaming ----


# ---- storage dtype ----


def rows_to_numpy(x: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: its raw bits are stored as int16 and viewed back on load."""
    return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


def rows_to_float32(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def _sq_norms(a: np.ndarray, dtype: str) -> np.ndarray:
    """Squared row norms of stored rows, in float64."""
    x = rows_to_float32(a, dtype).double()
    return (x * x).sum(dim=1).numpy()


def _mix(group: list[np.ndarray], rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    buf = np.concatenate(group)  # (R, d_in), read from the memory-mapped shards
    return buf[rng.permutation(len(buf))] if shuffle else buf
