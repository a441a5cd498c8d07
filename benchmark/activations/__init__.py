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
  first batch is asked for. A resumed run starts the stream at batch k without running the
  model over the k batches (`StreamingStore.batches(start=k)`): exactly from the state the
  stream saves beside the trainer's checkpoint (`stream_state.pt`: position, shuffle buffer,
  RNG), else approximately by skipping the windows those batches consumed (the rows in the
  buffer at the kill are then not seen; the rest of the stream is read in another order).

Attention-sink outliers. On SmolLM2-135M at layer 6, the BOS position has a residual norm ~9x
the median (~900 vs ~104); it is excluded with the other special positions. A second group
survives that exclusion: the first few occurrences of " the" (and a bare space) in each window
act as extra sinks, with norms 5-9x the median on ~1.8% of tokens, which then carry roughly
half of E||x||^2. MLP and attention outputs have no such tail (max ~3x median). The suite does
nothing about them beyond the BOS/EOS/pad exclusion (as the paper): they are real activations
that the spliced model needs reconstructed. Each manifest records the norm quantiles and the
share of rows above 5x the median (`stats`), so the effect can be checked per cache.

Must not know SAEs, the trainer or the evaluator. It reads a `specs.SourceSpec` (model, layer,
site, data, device, cache folder), never the config tree.

One module per job: `keys` (the key spec and key, the budgets, the files' names), `locking` (a
lock per key, the integrity checks on read, repair), `harvest` (windows -> shards, resume),
`manifest` (manifest.json and norm.json: norm_scale and the stats), `stores` (the cached reader,
and `read_sites`: the forward pass the harvest and the stream share), `streaming` (the
streaming reader); this module holds the entry
points.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from benchmark.activations.harvest import (
    ModelArg,
    harvest_sites,
    load_bridge,
    split_windows,
)
from benchmark.activations.keys import (
    CACHE_FORMAT,
    HARVEST_PLAN,
    MANIFEST,
    NORM_FILE,
    HarvestTarget,
    cache_key,
    key_spec,
    model_key,
    positive_int,
    token_budget,
)
from benchmark.activations.locking import cache_usable, key_locks, norm_file_usable
from benchmark.activations.manifest import OUTLIER_FACTOR, estimate_norm
from benchmark.activations.stores import ActivationStore, read_sites
from benchmark.activations.streaming import Store, StreamingStore
from benchmark.data import Split
from benchmark.fileio import sweep_stale
from benchmark.models import hook_name, resolve_device, resolve_dtype
from benchmark.specs import STREAM_DEFAULTS, SiteSpec, SourceSpec

__all__ = [  # the API; the parts are public in their own modules (keys, locking, harvest, ...)
    "CACHE_FORMAT",
    "HARVEST_PLAN",
    "MANIFEST",
    "NORM_FILE",
    "OUTLIER_FACTOR",
    "STREAM_DEFAULTS",
    "ActivationStore",
    "ModelArg",
    "Store",
    "StreamingStore",
    "cache_key",
    "get_activation_store",
    "get_activation_stores",
    "model_key",
    "read_sites",
]


def get_activation_store(
    model: ModelArg, source: SourceSpec, split: Split = "train", n_tokens: int | None = None
) -> Store:
    """The activations of `source.layer` at `source.site` (see `get_activation_stores`)."""
    return get_activation_stores(model, source, split, [source.site], n_tokens)[source.site.name]


def get_activation_stores(
    model: ModelArg,
    source: SourceSpec,
    split: Split = "train",
    sites: Sequence[SiteSpec] | None = None,
    n_tokens: int | None = None,
) -> dict[str, Store]:
    """The cached activations of `source.layer` for each of `sites` (default: `source.site`).

    `model`: a TransformerBridge, a zero-argument callable returning one, or None (then it is
    loaded from `source.model` on a cache miss only: a hit never loads a model). `split` picks
    `data.n_train_tokens` or `data.n_eval_tokens`, unless `n_tokens` is given (the held-out
    activation set: `eval.n_activation_tokens`). Each site has a `name` and a `hook`; every
    missing one is harvested in the same forward pass. Returns {site name: store}. With
    `data.stream: true` the train split is a `StreamingStore` instead (one per site); the eval
    split is always cached.
    """
    site_list = [source.site] if sites is None else list(sites)
    layer, model_spec, data = source.layer, source.model, source.data
    hooks = {s.name: hook_name(model_spec, layer, s) for s in site_list}  # config errors first
    if split == "train" and data.stream:
        return {s.name: _streaming_store(model, source, s) for s in site_list}
    n_tokens = token_budget(data, split) if n_tokens is None else n_tokens
    device = resolve_device(source.device)
    dtype = resolve_dtype(model_spec.dtype, device)
    root = Path(source.cache_dir) / "activations"
    specs = {s.name: key_spec(source, s, split, n_tokens, dtype) for s in site_list}
    dirs = {name: root / cache_key(spec) for name, spec in specs.items()}
    harvested: set[str] = set()
    if not all(cache_usable(d) for d in dirs.values()):
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)  # broken caches whose deletion was cut short
        with key_locks(dirs.values()):
            todo = [name for name, d in dirs.items() if not cache_usable(d, repair=True)]
            if todo:
                bridge = load_bridge(model, source, device, dtype)
                hooks = {s.name: hook_name(model_spec, layer, s, bridge) for s in site_list}
                windows = split_windows(data, bridge, split, n_tokens, data.allow_fewer_tokens)
                targets = [HarvestTarget(n, hooks[n], dirs[n], specs[n]) for n in todo]
                harvest_sites(bridge, windows, layer, targets, data.harvest, source.progress)
                harvested.update(todo)
    return {name: ActivationStore(d, from_cache=name not in harvested) for name, d in dirs.items()}


# ---- streaming ----


def _streaming_store(model: ModelArg, source: SourceSpec, site: SiteSpec) -> StreamingStore:
    """A StreamingStore for `site`; its norm_scale is estimated on a miss (one process per key
    at a time, the others wait and read it) and read from norm.json on a hit."""
    n_norm = positive_int(source.data, "stream_norm_tokens")
    buffer_rows = positive_int(source.data, "stream_buffer_tokens")
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.model.dtype, device)
    spec = {**key_spec(source, site, "train", n_norm, dtype), "stream": "norm_scale"}
    path = Path(source.cache_dir) / "activations" / cache_key(spec)
    bridge = functools.cache(lambda: load_bridge(model, source, device, dtype))  # at most once
    if not norm_file_usable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with key_locks([path]):
            if not norm_file_usable(path, repair=True):
                estimate_norm(bridge(), source, site, spec, path, source.progress)
    return StreamingStore(path, bridge, source.data, source.layer, buffer_rows)
