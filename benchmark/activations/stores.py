"""Activation readers: batches from a cache's shards, or straight from the model.

Owns `ActivationStore` (shuffled, seeded batches from the shards, any number of epochs, RAM
bounded by the shuffle buffer), `StreamingStore` and its stream (the train windows read lazily
in order, one truncated forward pass per batch, BOS/EOS/pad rows dropped, a shuffle buffer; a
resume at batch k without the model: from a saved state, or by skipping windows), the
forward pass that reads a layer's sites (`read_sites`) with its NaN/inf check, and the storage
dtype (bfloat16 kept as its int16 bits). The design is in the package docstring
(benchmark/activations/__init__.py).

Must not know how a cache is harvested, locked or repaired, nor how norm_scale is computed: it
reads manifest.json and norm.json as they were written.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Generator, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import integrity
from benchmark.activations.keys import MANIFEST, NORM_FILE
from benchmark.data import non_special_mask, stream_windows
from benchmark.errors import ActivationError, ConfigError
from benchmark.fileio import atomic_write
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


class StreamingStore:
    """Training activations read from the model as the trainer asks (see the module docstring).

    Same interface as ActivationStore; `n_tokens` is math.inf (endless) and `path` is the
    directory of `norm.json`. The model is loaded on the first batch, not before.
    """

    STATE_FILE = "stream_state.pt"  # the saved stream (`batches`), in a run's folder

    def __init__(
        self, path: Path, bridge: Callable[[], Any], data: DataSpec, layer: int, buffer_rows: int
    ):
        norm = integrity.unseal((path / NORM_FILE).read_text())  # checked by norm_file_usable
        self.path = path
        self.key: str = norm["key"]
        self.hook: str = norm["hook"]
        self.site: str = norm["spec"]["site"]["name"]
        self.d_in: int = norm["d_in"]
        self.n_tokens: float = math.inf
        self.norm_scale: float = norm["norm_scale"]
        self.max_norm: float | None = None  # streamed rows are never left out for their norm
        self.n_excluded = 0
        self.buffer_rows = buffer_rows
        self.load_bridge, self._data, self._layer = bridge, data, layer

    def __repr__(self) -> str:
        return f"StreamingStore({self.key}, buffer_rows={self.buffer_rows}, d_in={self.d_in})"

    def without_outliers(self, multiple: float | None) -> StreamingStore:
        """Itself; data.max_norm_multiple needs a cache (validate.check_run says so first)."""
        if multiple is not None:
            raise ConfigError(f"data.max_norm_multiple={multiple} needs data.stream=false")
        return self

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epochs: float | None = None,
        normalise: bool = True,
        shuffle: bool = True,
        start: int = 0,
        state_path: Path | None = None,
        save_every: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, d_in) batches, each a forward pass away at most.

        `shuffle`: drawn at random (seeded) from the shuffle buffer; else rows in stream order
        (window by window). `epochs` must be None: a stream has no epochs. `normalise` divides
        by `norm_scale`.

        Resume (`start` = k > 0: the batches after the first k), without running the model
        over the k batches already trained:
        - Exact, from a saved state. With `state_path` and `save_every` = N > 0, the stream
          saves its state there (atomically, benchmark.fileio.atomic_write) each time it has
          handed out a multiple of N batches: the stream position (rows read), the shuffle
          buffer's rows and the RNG state. The file holds the whole buffer (rows x d_in in the
          model's dtype, the RAM the buffer takes). A state at k is the one used; a state at
          j < k (a kill between the trainer's checkpoint and this save) is restored and the
          k - j batches after it replayed through the model (at most N). Either way the
          batches are exactly those of the uninterrupted stream from batch k + 1.
        - Approximate, without a usable state (none saved, or one from another stream, seed,
          batch size or buffer size, or ahead of k): the stream skips the rows that k batches
          consumed, i.e. the first buffer + k * batch_size rows (token windows only:
          tokenising and masking, no model), refills the buffer from there and draws with an
          RNG seeded by (seed, k). Effect on the token distribution: the ~buffer-size rows
          that sat in the shuffle buffer at the kill are never seen; every later row is read
          once, the same rows as the uninterrupted stream but in a different order.
        With `shuffle=False` the position is all there is: a resume is always exact.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if epochs is not None:
            raise ConfigError("a streaming store is endless (epochs=None); train.n_tokens stops it")
        if start < 0:
            raise ConfigError(f"start={start} must be >= 0")
        scale = 1.0 / self.norm_scale if normalise else 1.0
        if not shuffle:
            rows = self._rows(start * batch_size)
            for x in _rebatch(rows, batch_size):
                yield x.float() * scale
            return
        n = batch_size * max(1, math.ceil(self.buffer_rows / batch_size))  # whole pieces
        ident = {"key": self.key, "seed": seed, "batch_size": batch_size, "buffer_rows": n}
        saved = _load_stream_state(state_path, ident, start) if start else None
        if saved is not None:  # exact: the buffer and RNG as they were after saved["position"]
            pos, read = int(saved["position"]), int(saved["rows"])
            pieces = _rebatch(self._rows(read), batch_size)
            buf = saved["buffer"]
            rng = np.random.default_rng()
            rng.bit_generator.state = saved["rng"]
            log.info("stream resumed from %s at batch %d (exact)", state_path, pos)
        else:
            pos, read = start, (n // batch_size + start) * batch_size if start else 0
            if start:
                log.warning(
                    "stream resumed at batch %d without a saved state: %d rows skipped (no "
                    "model), the %d rows of the shuffle buffer at the kill are not seen",
                    start, read, n,
                )  # fmt: skip
            pieces = _rebatch(self._rows(read), batch_size)
            buf = torch.cat([next(pieces) for _ in range(n // batch_size)])  # (n, d_in)
            read += n
            rng = np.random.default_rng(seed if not start else (seed, start))
        first = pos
        while True:
            if state_path is not None and save_every and pos % save_every == 0 and pos != first:
                at = {"position": pos, "rows": read, "rng": rng.bit_generator.state}
                _save_stream_state(state_path, {**ident, **at, "buffer": buf})
            idx = torch.from_numpy(rng.choice(n, batch_size, replace=False))  # (batch_size,)
            batch = buf[idx]  # (batch_size, d_in), a copy
            buf[idx] = next(pieces)
            read += batch_size
            pos += 1
            if pos > start:  # batches up to `start` are the replay from an older state
                yield batch.float() * scale

    def _rows(self, skip: int) -> Iterator[torch.Tensor]:
        """The stream's rows from row `skip` on (see `stream_site_rows`)."""
        bridge = self.load_bridge()
        return stream_site_rows(bridge, self._data, self._layer, self.site, self.hook, skip)


def _save_stream_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # never a half-written state


def _load_stream_state(path: Path | None, ident: dict, start: int) -> dict | None:
    """The saved stream state at `path` if it belongs to this stream (`ident`) and is at or
    before batch `start`; else None (logged)."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
        usable = all(state.get(k) == v for k, v in ident.items()) and state["position"] <= start
    except Exception as e:  # noqa: BLE001  a damaged file: resume without it
        log.warning("stream state %s is unreadable (%s: %s); not used", path, type(e).__name__, e)
        return None
    if not usable:
        log.warning(
            "stream state %s (batch %s) does not match this stream at batch %d; not used",
            path, state.get("position"), start,
        )  # fmt: skip
        return None
    return state


Store = ActivationStore | StreamingStore


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


def stream_site_rows(
    bridge: Any, data: DataSpec, layer: int, site: str, hook: str, skip: int = 0
) -> Generator[torch.Tensor, None, None]:
    """Endless (rows, d_in) activations of the train windows in order, one forward batch
    (`data.harvest.batch_size` windows) at a time, BOS/EOS/pad rows dropped, on CPU.

    `skip`: start at that row of the stream. Forward batches wholly before it are only
    tokenised and masked (no model); the batch holding it runs whole (the same forward batches
    as an unskipped stream, so the same numbers) and its rows before `skip` are dropped."""
    batch = int(data.harvest.batch_size)
    device = torch.device(bridge.cfg.device)
    for first, windows in _window_batches(data, bridge, batch):  # (batch, T)
        mask = non_special_mask(windows, bridge.tokenizer)  # (batch, T)
        if skip and (have := int(mask.sum())) <= skip:
            skip -= have
            continue
        x = read_sites(bridge, windows.to(device), mask.to(device), {site: hook}, layer)[site]
        check_finite(x, mask, first, f"site {site} ({hook}), streamed", "stream")
        x, skip = x[skip:], 0
        yield x


def _window_batches(data: DataSpec, bridge: Any, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (index of the first window, (batch, T) windows) of the train split, read
    lazily in order; at the end of the split the windows start over."""
    check_context(data, bridge)
    first = 0
    while True:
        windows, start = stream_windows(data, bridge.tokenizer, "train"), first
        while chunk := list(islice(windows, batch)):
            yield first, torch.tensor(chunk, dtype=torch.long)
            first += len(chunk)
        if first == start:
            raise ConfigError(f"data {data.name!r}: the train split holds no full window")
        log.warning("the train split ended after %d windows; the stream starts over", first)


def _rebatch(chunks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of `chunks`, in order, as (batch_size, d_in) pieces."""
    pending: list[torch.Tensor] = []
    have = 0
    for x in chunks:
        pending.append(x)
        have += len(x)
        if have < batch_size:
            continue
        rows = torch.cat(pending)  # (have, d_in)
        full = have - have % batch_size
        yield from rows[:full].split(batch_size)
        pending, have = [rows[full:]], have - full


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
