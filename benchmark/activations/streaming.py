"""The streaming reader: training activations read from the model as the trainer asks.

Owns `StreamingStore` and its stream (data.stream=true: the train windows read lazily in order,
one truncated forward pass per batch through `stores.read_sites`, BOS/EOS/pad rows dropped, a
shuffle buffer), its saved state and a resume at batch k without the model (from a saved
state, or by skipping windows). The design is in the package docstring
(benchmark/activations/__init__.py).

Must not know how norm_scale is estimated: it reads norm.json as it was written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import integrity
from benchmark.activations.keys import NORM_FILE
from benchmark.activations.stores import ActivationStore, check_context, check_finite, read_sites
from benchmark.data import non_special_mask, stream_windows
from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write
from benchmark.specs import DataSpec

log = logging.getLogger("benchmark.activations")


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
            for x in rebatch(rows, batch_size):
                yield x.float() * scale
            return
        n = batch_size * max(1, math.ceil(self.buffer_rows / batch_size))  # whole pieces
        ident = {"key": self.key, "seed": seed, "batch_size": batch_size, "buffer_rows": n}
        pos, read, pieces, buf, rng = self._start(ident, start, state_path)
        first = pos
        while True:
            if state_path is not None and save_every and pos % save_every == 0 and pos != first:
                at = {"position": pos, "rows": read, "rng": rng.bit_generator.state}
                save_stream_state(state_path, {**ident, **at, "buffer": buf})
            idx = torch.from_numpy(rng.choice(n, batch_size, replace=False))  # (batch_size,)
            batch = buf[idx]  # (batch_size, d_in), a copy
            buf[idx] = next(pieces)
            read += batch_size
            pos += 1
            if pos > start:  # batches up to `start` are the replay from an older state
                yield batch.float() * scale

    def _start(self, ident: dict[str, Any], start: int, state_path: Path | None) -> tuple:
        """(batch position, rows read, the row pieces from there, the filled shuffle buffer,
        the RNG) where `batches` starts: a saved state at or before `start` (exact), else the
        buffer refilled after the rows `start` batches consumed (approximate; see `batches`)."""
        batch_size, seed, n = ident["batch_size"], ident["seed"], ident["buffer_rows"]
        saved = load_stream_state(state_path, ident, start) if start else None
        if saved is not None:  # exact: the buffer and RNG as they were after saved["position"]
            pos, read = int(saved["position"]), int(saved["rows"])
            rng = np.random.default_rng()
            rng.bit_generator.state = saved["rng"]
            log.info("stream resumed from %s at batch %d (exact)", state_path, pos)
            return pos, read, rebatch(self._rows(read), batch_size), saved["buffer"], rng
        read = (n // batch_size + start) * batch_size if start else 0
        if start:
            log.warning(
                "stream resumed at batch %d without a saved state: %d rows skipped (no "
                "model), the %d rows of the shuffle buffer at the kill are not seen",
                start, read, n,
            )  # fmt: skip
        pieces = rebatch(self._rows(read), batch_size)
        buf = torch.cat([next(pieces) for _ in range(n // batch_size)])  # (n, d_in)
        rng = np.random.default_rng(seed if not start else (seed, start))
        return start, read + n, pieces, buf, rng

    def _rows(self, skip: int) -> Iterator[torch.Tensor]:
        """The stream's rows from row `skip` on (see `stream_site_rows`)."""
        bridge = self.load_bridge()
        return stream_site_rows(bridge, self._data, self._layer, self.site, self.hook, skip)


def save_stream_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # never a half-written state


def load_stream_state(path: Path | None, ident: dict, start: int) -> dict | None:
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
    for first, windows in window_batches(data, bridge, batch):  # (batch, T)
        mask = non_special_mask(windows, bridge.tokenizer)  # (batch, T)
        if skip and (have := int(mask.sum())) <= skip:
            skip -= have
            continue
        x = read_sites(bridge, windows.to(device), mask.to(device), {site: hook}, layer)[site]
        check_finite(x, mask, first, f"site {site} ({hook}), streamed", "stream")
        x, skip = x[skip:], 0
        yield x


def window_batches(data: DataSpec, bridge: Any, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
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


def rebatch(chunks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
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


Store = ActivationStore | StreamingStore
