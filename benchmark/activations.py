"""Activations: harvest with one truncated forward pass, cache on disk (or stream), serve batches.

Owns the activation cache and everything between token windows and the trainer's batches:
- Harvest: one forward pass stopped after the layer (`stop_at_layer=layer + 1`) reads every
  requested site of that layer through capture hooks (`run_with_hooks`; measured no slower than
  `run_with_cache`, and it keeps only the masked rows). Sites with more than one trailing dim
  (`attn.hook_z`: (B, T, n_heads, d_head)) are flattened to (B, T, n_heads * d_head). BOS, EOS
  and pad positions are dropped (`data.non_special_mask`); exactly `n_tokens` rows are kept.
- Cache: `{cache_dir}/activations/<key>/`, one directory per (model, layer, site, data and its
  config, split, context length, token count, dtype); the key ends in a hash of all of them, so
  any change gives a new cache, and every SAE, architecture, sparsity and seed asking for the
  same key reuses it. Rows are stored in the model's dtype (fp32 for the bundled CPU model:
  ~2.3 KB per token at d=576, 0.46 GB per 200k tokens; bf16 halves it on GPU), in `.npy` shards
  of ~`data.harvest.shard_mb` MB. Each shard is written to a temp file then `os.replace`d, and
  `manifest.json` is written last: a directory without a manifest is never read, and a killed
  harvest resumes after its last completed shard. A file lock per key makes two processes
  asking for the same key at once share one harvest (the second waits, then reads it).
- Integrity (benchmark/integrity.py): the manifest records each shard's size in bytes and
  CRC-32, and carries a checksum of its own content (`self_crc32`). Every read checks the
  sizes (a stat per shard) and the manifest's own checksum; the shards' checksums are checked
  once per process per cache (0.13 s for 230 MB, i.e. 100k tokens x 576 fp32, from the page
  cache; `BENCHMARK_VERIFY_CACHE=size` skips them, for a cache on a trusted disk). A
  truncated or unreadable manifest, a missing or truncated shard, or changed bytes: one
  warning naming the file and the fault, then the cache is moved aside, deleted and harvested
  again under the key's lock; damaged rows are never read. A manifest written before these
  checks (no `self_crc32`) is upgraded in place, with a warning, when every shard holds its
  recorded rows (npy header and file size agree): its sizes and checksums are recorded as the
  files are now (a harvest can take hours; damage older than the upgrade cannot be seen);
  otherwise it is rebuilt. CACHE_FORMAT is unchanged: the rows and the key are the same.
- Progress: the harvest (and the streaming norm estimate) shows tokens done/total, tokens/s
  and ETA: a tqdm bar on a terminal, a log line every 10% or 30 s elsewhere (`progress: false`
  turns both off).
- Normalisation: `norm_scale` c = sqrt(mean ||x||^2), computed over every cached row (exact,
  float64) and stored in the manifest, so that x / c has E||x||^2 = 1 (docs/method.md).
- Batches: shuffled, seeded, any number of epochs, streamed from disk with RAM bounded by the
  shuffle buffer (a few shards at a time, ~`buffer_mb`), independent of the token count.
- Streaming (`data.stream: true`, train split only; for budgets too large to store): a
  `StreamingStore` has the same interface but nothing on disk except its norm_scale. Its
  batches run the same truncated forward pass on the train windows, read lazily in order
  (`data.harvest.batch_size` at a time), drop BOS/EOS/pad rows and push the rest through a
  shuffle buffer of `data.stream_buffer_tokens` rows: filled first, then each batch takes
  batch_size random rows out (seeded) and the next rows of the stream take their places. It is
  endless (`n_tokens` is math.inf; the trainer's train.n_tokens decides how much is read, and
  `data.n_train_tokens` is unused); when the split runs out the windows start over (logged).
  `norm_scale` is estimated once per key on the split's first `data.stream_norm_tokens` rows
  (c = sqrt(mean ||x||^2), float64, the value a cache of that many tokens would hold) and
  kept in `{cache_dir}/activations/<key>/norm.json` (key spec: "stream": "norm_scale"), so
  every job of a sweep divides by the same scalar; a hit never loads the model until the
  first batch is asked for.

Attention-sink outliers. On SmolLM2-135M at layer 6, the BOS position has a residual norm ~9x
the median (~900 vs ~104); it is excluded with the other special positions. A second group
survives that exclusion: the first few occurrences of " the" (and a bare space) in each window
act as extra sinks, with norms 5-9x the median on ~1.8% of tokens, which then carry roughly
half of E||x||^2. MLP and attention outputs have no such tail (max ~3x median). The suite does
nothing about them beyond the BOS/EOS/pad exclusion (as the paper): they are real activations
that the spliced model needs reconstructed. Each manifest records the norm quantiles and the
share of rows above 5x the median (`stats`), so the effect can be checked per cache.

Must not know SAEs, the trainer or the evaluator; it reads the composed config but never
composes one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from benchmark import integrity
from benchmark.data import Split, data_identity, non_special_mask, stream_windows, token_windows
from benchmark.errors import ActivationError, ConfigError
from benchmark.fileio import atomic_write, sweep_stale, write_json_atomic
from benchmark.models import hook_name, load_model, resolve_device, resolve_dtype
from benchmark.progress import progress

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout or the harvest changes what is stored
MANIFEST, HARVEST_PLAN, NORM_FILE = "manifest.json", "harvest.json", "norm.json"
STREAM_DEFAULTS = {"stream_buffer_tokens": 262_144, "stream_norm_tokens": 100_000}
OUTLIER_FACTOR = 5.0  # rows with norm > 5x the median are counted in the manifest's stats
ModelArg = Any  # TransformerBridge | Callable[[], TransformerBridge] | None


class ActivationStore:
    """A complete cached set of activations for one (model, layer, site, data, split, budget)."""

    def __init__(self, path: Path, *, from_cache: bool = True, buffer_mb: int = 256):
        manifest = integrity.unseal((path / MANIFEST).read_text())  # checked by _usable
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

    def __repr__(self) -> str:
        return f"ActivationStore({self.key}, n_tokens={self.n_tokens}, d_in={self.d_in})"

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
            # Leftover rows go first, unshuffled: epoch e ends before epoch e + 1 begins.
            buf = chunk if carry is None else np.concatenate([carry, chunk])  # (R, d_in)
            start = 0
            while len(buf) - start >= (want := int(min(batch_size, total - done))):
                yield _to_float32(buf[start : start + want], self.dtype) * scale
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

    def __init__(
        self, path: Path, bridge: Callable[[], Any], data_cfg: Any, layer: int, buffer_rows: int
    ):
        norm = integrity.unseal((path / NORM_FILE).read_text())  # checked by _norm_usable
        self.path = path
        self.key: str = norm["key"]
        self.hook: str = norm["hook"]
        self.site: str = norm["spec"]["site"]["name"]
        self.d_in: int = norm["d_in"]
        self.n_tokens: float = math.inf
        self.norm_scale: float = norm["norm_scale"]
        self.buffer_rows = buffer_rows
        self._bridge, self._data_cfg, self._layer = bridge, data_cfg, layer

    def __repr__(self) -> str:
        return f"StreamingStore({self.key}, buffer_rows={self.buffer_rows}, d_in={self.d_in})"

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epochs: float | None = None,
        normalise: bool = True,
        shuffle: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, d_in) batches, each a forward pass away at most.

        `shuffle`: drawn at random (seeded) from the shuffle buffer; else rows in stream order
        (window by window). `epochs` must be None: a stream has no epochs. `normalise` divides
        by `norm_scale`.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if epochs is not None:
            raise ConfigError("a streaming store is endless (epochs=None); train.n_tokens stops it")
        scale = 1.0 / self.norm_scale if normalise else 1.0
        bridge = self._bridge()
        rows = _stream_rows(bridge, self._data_cfg, self._layer, self.site, self.hook)
        pieces = _rebatch(rows, batch_size)  # (batch_size, d_in) in stream order
        if shuffle:
            pieces = _shuffle_buffer(pieces, self.buffer_rows, np.random.default_rng(seed))
        for x in pieces:
            yield x.float() * scale


Store = ActivationStore | StreamingStore


def get_activation_store(
    model: ModelArg, cfg: Any, split: Split = "train", n_tokens: int | None = None
) -> Store:
    """The activations of `cfg.layer.index` at `cfg.site` (see `get_activation_stores`)."""
    return get_activation_stores(model, cfg, split, [cfg.site], n_tokens)[cfg.site.name]


def get_activation_stores(
    model: ModelArg,
    cfg: Any,
    split: Split = "train",
    sites: Sequence[Any] | None = None,
    n_tokens: int | None = None,
) -> dict[str, Store]:
    """The cached activations of `cfg.layer.index` for each of `sites` (default: `cfg.site`).

    `model`: a TransformerBridge, a zero-argument callable returning one, or None (then it is
    loaded from `cfg.model` on a cache miss only: a hit never loads a model). `split` picks
    `data.n_train_tokens` or `data.n_eval_tokens`, unless `n_tokens` is given (the held-out
    activation set: `eval.n_activation_tokens`). Site configs each have `name` and `hook`;
    every missing one is harvested in the same forward pass. Returns {site name: store}. With
    `data.stream: true` the train split is a `StreamingStore` instead (one per site); the eval
    split is always cached.
    """
    site_cfgs = [cfg.site] if sites is None else list(sites)
    layer = cfg.layer.index
    hooks = {s.name: hook_name(cfg.model, layer, s) for s in site_cfgs}  # config errors first
    if split == "train" and cfg.data.get("stream", False):
        return {s.name: _streaming_store(model, cfg, s) for s in site_cfgs}
    n_tokens = _budget(cfg.data, split) if n_tokens is None else n_tokens
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    root = Path(cfg.cache_dir) / "activations"
    specs = {s.name: _spec(cfg, layer, s, split, n_tokens, dtype) for s in site_cfgs}
    dirs = {name: root / cache_key(spec) for name, spec in specs.items()}
    harvested: set[str] = set()
    if not all(_usable(d) for d in dirs.values()):
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)  # broken caches whose deletion was cut short
        with _locked(dirs.values()):
            todo = [name for name, d in dirs.items() if not _usable(d, repair=True)]
            if todo:
                bridge = _bridge(model, cfg, device, dtype)
                hooks = {s.name: hook_name(cfg.model, layer, s, bridge) for s in site_cfgs}
                fewer = bool(cfg.data.get("allow_fewer_tokens", False))
                windows = _windows(cfg.data, bridge, split, n_tokens, fewer)
                targets = [_Target(n, hooks[n], dirs[n], specs[n]) for n in todo]
                opts = cfg.data.get("harvest") or {}
                _harvest(bridge, windows, layer, targets, opts, bool(cfg.get("progress", True)))
                harvested.update(todo)
    return {name: ActivationStore(d, from_cache=name not in harvested) for name, d in dirs.items()}


def cache_key(spec: dict) -> str:
    """Readable prefix + a hash of the whole spec: any change in it gives a new directory."""
    digest = _digest(spec)
    m, d = spec["model"], spec["data"]
    split = spec["split"] + ("-stream" if "stream" in spec else "")
    return (
        f"{m['name']}_L{spec['layer']}_{spec['site']['name']}_{d['name']}-{split}"
        f"_T{d['context_length']}_N{spec['n_tokens']}_{m['dtype']}_{digest}"
    )


# ---- key ----


def _model_spec(cfg: Any, dtype: torch.dtype) -> dict:
    model = {k: cfg.model.get(k) for k in ("name", "source", "path", "architecture", "bos_token")}
    return {**model, "dtype": str(dtype).removeprefix("torch.")}


def model_key(cfg: Any) -> str:
    """`<model name>-<hash>` of everything that changes the model's outputs (source, path,
    architecture, BOS token, resolved dtype): the same model spec as the activation cache's
    key, used to key cached clean and zero-ablation losses."""
    dtype = resolve_dtype(cfg.model.dtype, resolve_device(cfg.device))
    return f"{cfg.model.name}-{_digest(_model_spec(cfg, dtype))}"


def _spec(cfg: Any, layer: int, site: Any, split: Split, n_tokens: int, dtype: torch.dtype) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model": _model_spec(cfg, dtype),
        "layer": layer,
        "site": {"name": site.name, "hook": site.hook},
        "data": data_identity(cfg.data),
        "split": split,
        "n_tokens": n_tokens,
    }


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _budget(data_cfg: Any, split: str) -> int:
    if split not in ("train", "eval"):
        raise ConfigError(f"split={split!r} is not one of train, eval")
    return _positive(data_cfg, f"n_{split}_tokens")


def _positive(data_cfg: Any, key: str) -> int:
    """data.<key> (default: STREAM_DEFAULTS), checked to be a positive integer."""
    n = data_cfg.get(key, STREAM_DEFAULTS.get(key))
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"data.{key}={n!r} must be a positive integer")
    return n


def _complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _usable(path: Path, repair: bool = False) -> bool:
    """A complete and intact cache (see "Integrity" in the module docstring). With `repair`
    (under the key's lock) an old manifest is upgraded where it can be, and a damaged cache is
    reported in one warning and discarded, so that it is harvested again."""
    if not _complete(path):
        return False
    problem = _damage(path)
    if problem is None:
        return True
    if repair:
        problem = _upgrade(path, problem)
        if problem is None:
            return True
        log.warning("activation cache %s: %s; harvesting it again", path.name, problem)
        integrity.discard(path)
    return False


def _upgrade(path: Path, problem: str) -> str | None:
    """Seal a manifest from before the integrity checks whose shards all hold their recorded
    rows, with their sizes and checksums as they are now (see the module docstring): None.
    Else what is wrong: `problem`, or the first shard that does not hold its rows."""
    file = path / MANIFEST
    try:
        integrity.unseal(file.read_text())
        return problem  # sealed: damaged, not old
    except integrity.Unsealed:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError):
        return problem
    try:
        shards = [(s["file"], int(s["rows"])) for s in manifest["shards"]]
    except (KeyError, TypeError, ValueError):
        return problem
    for name, rows in shards:
        if not _shard_ok(path / name, rows):
            return f"{path / name} does not hold its {rows} rows (old manifest)"
    names = [s["file"] for s in manifest["shards"]]
    files = integrity.file_records(path, names)
    manifest["shards"] = [{**s, **files[s["file"]]} for s in manifest["shards"]]
    write_json_atomic(file, integrity.seal(manifest))
    integrity.mark_verified(path, file)
    log.warning(
        "activation cache %s: its manifest predates the integrity checks; recorded the sizes "
        "and checksums of its %d shards as they are now",
        path.name,
        len(names),
    )
    return None


def _damage(path: Path) -> str | None:
    """None when the cache at `path` is intact, else what is wrong (naming the file)."""
    manifest = path / MANIFEST
    try:
        shards = integrity.unseal(manifest.read_text())["shards"]
        records = {s["file"]: {"bytes": s["bytes"], "crc32": s["crc32"]} for s in shards}
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        return f"{manifest} is unreadable or predates integrity checks ({type(e).__name__}: {e})"
    return integrity.damage(path, records, manifest)


@contextmanager
def _locked(paths: Any) -> Iterator[None]:
    """One file lock per key, taken in sorted order (two processes never deadlock)."""
    with ExitStack() as stack:
        for path in sorted(paths):
            lock = FileLock(f"{path}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another process harvesting %s", path.name)
                lock.acquire()
            stack.callback(lock.release)
        yield


def _bridge(model: ModelArg, cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The model to harvest with: given, built by a callable, or loaded from cfg.model."""
    bridge: Any
    if model is None:
        bridge = load_model(cfg.model, device, cfg.cache_dir)
    elif isinstance(model, torch.nn.Module):
        bridge = model
    elif callable(model):
        bridge = model()
    else:
        raise TypeError(f"model must be a TransformerBridge, a callable or None; got {type(model)}")
    got = next(bridge.parameters()).dtype
    if got != dtype:  # the cache key names the dtype; the rows must be in it
        raise ConfigError(
            f"the model given runs in {got} but model.dtype={cfg.model.dtype!r} resolves to "
            f"{dtype} on {device}"
        )
    return bridge


def _windows(data_cfg: Any, bridge: Any, split: Split, n_tokens: int, fewer: bool) -> torch.Tensor:
    _check_context(data_cfg, bridge)
    return token_windows(data_cfg, bridge.tokenizer, split, n_tokens, allow_fewer=fewer)


def _check_context(data_cfg: Any, bridge: Any) -> None:
    n_ctx = getattr(bridge.cfg, "n_ctx", None)
    if n_ctx and data_cfg.context_length > n_ctx:
        raise ConfigError(
            f"data.context_length={data_cfg.context_length} exceeds the model's context {n_ctx}"
        )


# ---- harvest ----


class _Target:
    """One site being harvested: its hook, cache directory and key spec."""

    def __init__(self, name: str, hook: str, path: Path, spec: dict):
        self.name, self.hook, self.path, self.spec = name, hook, path, spec


def _harvest(
    bridge: Any,
    windows: torch.Tensor,
    layer: int,
    targets: list[_Target],
    opts: Any,
    show: bool = True,
) -> None:
    """Fill each target's directory with shards, then its manifest (written last). `show`:
    the progress display (tokens done/total, tokens/s, ETA)."""
    started = time.perf_counter()
    mask = non_special_mask(windows, bridge.tokenizer)  # (N, T)
    batch = int(opts.get("batch_size", 32))
    W = _windows_per_shard(bridge, windows.shape[1], batch, float(opts.get("shard_mb", 32)))
    keep = _rows_per_shard(mask, W, n_tokens=targets[0].spec["n_tokens"])
    plan = {"windows_per_shard": W, "rows_per_shard": keep}
    done = {t.name: _resume(t, plan) for t in targets}
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
            where = f"site {t.name} ({t.hook}), shard {k} ({t.path / _shard_name(k)})"
            _check_finite(shard, mask[first:last], first, where, "harvest")
            _write_shard(t.path, k, shard)
        bar.set_postfix(shard=f"{k + 1}/{len(keep)}")
        log.debug("harvest layer %d: shard %d/%d", layer, k + 1, len(keep))
    bar.close()
    for t in targets:
        _write_manifest(t, keep, time.perf_counter() - started)


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


def _resume(t: _Target, plan: dict) -> int:
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
    while k < len(planned) and _shard_ok(t.path / _shard_name(k), planned[k]):
        k += 1
    for stale in sorted(t.path.glob("shard_*.npy"))[k:]:
        stale.unlink()
    if k:
        log.info("%s: resuming after %d completed shards", t.path.name, k)
    return k


def _shard_ok(path: Path, rows: int) -> bool:
    """The shard exists, and its npy header and file size agree with `rows` (cheap)."""
    try:
        return len(np.load(path, mmap_mode="r")) == rows
    except (OSError, ValueError):  # missing; truncated ("mmap length is greater than file size")
        return False


def _check_finite(x: torch.Tensor, mask: torch.Tensor, first: int, where: str, of: str) -> None:
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


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


def _write_shard(path: Path, k: int, x: torch.Tensor) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, _to_numpy(x))

    atomic_write(path / _shard_name(k), save)


def _write_manifest(t: _Target, keep: list[int], seconds: float) -> None:
    names = [_shard_name(k) for k in range(len(keep))]
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
        x = _to_float32(np.load(path / s["file"]), dtype).double()  # (rows, d_in)
        norms.append(x.square().sum(dim=1).sqrt().numpy())
    return np.concatenate(norms)


# ---- streaming ----


def _streaming_store(model: ModelArg, cfg: Any, site: Any) -> StreamingStore:
    """A StreamingStore for `site`; its norm_scale is estimated on a miss (one process per key
    at a time, the others wait and read it) and read from norm.json on a hit."""
    layer = cfg.layer.index
    n_norm = _positive(cfg.data, "stream_norm_tokens")
    buffer_rows = _positive(cfg.data, "stream_buffer_tokens")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    spec = {**_spec(cfg, layer, site, "train", n_norm, dtype), "stream": "norm_scale"}
    path = Path(cfg.cache_dir) / "activations" / cache_key(spec)
    bridge = functools.cache(lambda: _bridge(model, cfg, device, dtype))  # loaded at most once
    if not _norm_usable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked([path]):
            if not _norm_usable(path, repair=True):
                _estimate_norm(bridge(), cfg, site, spec, path, bool(cfg.get("progress", True)))
    return StreamingStore(path, bridge, cfg.data, layer, buffer_rows)


def _norm_usable(path: Path, repair: bool = False) -> bool:
    """norm.json exists and is intact; with `repair` (under the lock) a damaged one is
    reported in one warning and removed, so that it is estimated again (one from before the
    integrity checks is sealed as it is, with a warning)."""
    file = path / NORM_FILE
    if not file.is_file():
        return False
    try:
        integrity.unseal(file.read_text())
        return True
    except integrity.Unsealed:  # from before the integrity checks: sealed as it is
        if repair:
            write_json_atomic(file, integrity.seal(json.loads(file.read_text())))
            log.warning("stream norm %s predates the integrity checks; sealed as it is", file)
        return repair
    except (OSError, ValueError) as e:
        if repair:
            log.warning("stream norm %s is unreadable (%s); estimating it again", file, e)
            file.unlink()
        return False


def _estimate_norm(
    bridge: Any, cfg: Any, site: Any, spec: dict, path: Path, show: bool = True
) -> None:
    """c = sqrt(mean ||x||^2) over the first spec["n_tokens"] streamed rows (float64; a split
    with fewer rows is read again from its start), written to path/norm.json."""
    hook = hook_name(cfg.model, spec["layer"], site, bridge)
    n_tokens, have, sum_sq = spec["n_tokens"], 0, 0.0
    rows = _stream_rows(bridge, cfg.data, spec["layer"], site.name, hook)
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


def _stream_rows(
    bridge: Any, data_cfg: Any, layer: int, site: str, hook: str
) -> Generator[torch.Tensor, None, None]:
    """Endless (rows, d_in) activations of the train windows in order, one forward batch
    (`data.harvest.batch_size` windows) at a time, BOS/EOS/pad rows dropped, on CPU."""
    batch = int((data_cfg.get("harvest") or {}).get("batch_size", 32))
    device = torch.device(bridge.cfg.device)
    for first, windows in _window_batches(data_cfg, bridge, batch):  # (batch, T)
        mask = non_special_mask(windows, bridge.tokenizer)  # (batch, T)
        x = read_sites(bridge, windows.to(device), mask.to(device), {site: hook}, layer)[site]
        _check_finite(x, mask, first, f"site {site} ({hook}), streamed", "stream")
        yield x


def _window_batches(data_cfg: Any, bridge: Any, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (index of the first window, (batch, T) windows) of the train split, read
    lazily in order; at the end of the split the windows start over."""
    _check_context(data_cfg, bridge)
    first = 0
    while True:
        windows, start = stream_windows(data_cfg, bridge.tokenizer, "train"), first
        while chunk := list(islice(windows, batch)):
            yield first, torch.tensor(chunk, dtype=torch.long)
            first += len(chunk)
        if first == start:
            raise ConfigError(f"data {data_cfg.name!r}: the train split holds no full window")
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


def _shuffle_buffer(
    pieces: Iterator[torch.Tensor], size: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """Random (batch_size, d_in) batches from a buffer of ~size rows: filled from `pieces`
    first, then each batch takes batch_size random rows out and the next piece takes their
    places (each row stays size / batch_size batches on average)."""
    first = next(pieces)  # (batch_size, d_in)
    batch_size = len(first)
    n = batch_size * max(1, math.ceil(size / batch_size))  # a whole number of pieces
    buf = first.new_empty((n, first.shape[1]))  # (n, d_in), in the model's dtype
    buf[:batch_size] = first
    for i in range(batch_size, n, batch_size):
        buf[i : i + batch_size] = next(pieces)
    while True:
        idx = torch.from_numpy(rng.choice(n, batch_size, replace=False))  # (batch_size,)
        batch = buf[idx]  # (batch_size, d_in), a copy
        buf[idx] = next(pieces)
        yield batch


# ---- storage dtype ----


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: its raw bits are stored as int16 and viewed back on load."""
    return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


def _to_float32(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


def _mix(group: list[np.ndarray], rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    buf = np.concatenate(group)  # (R, d_in), read from the memory-mapped shards
    return buf[rng.permutation(len(buf))] if shuffle else buf
