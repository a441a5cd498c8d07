"""Pure cost formulas: the activation sets the jobs read and their volume, the disk a cache of
them needs, and the FLOPs of the model's passes and of SAE training (docs/paper_scale.md)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from benchmark.plan.basis import Basis, Options
from benchmark.plan.jobs import Job
from benchmark.plan.model import ModelShape


@dataclass
class Activations:
    """One (layer, site)'s activation sets: training and held-out."""

    layer: int
    site: str
    d_in: int
    train_tokens: int  # rows a cache of the training set holds (streamed: train.n_tokens)
    eval_tokens: int  # eval.n_activation_tokens
    bytes_per_value: int
    stream: bool
    train_cached: bool
    eval_cached: bool
    norm_cached: bool  # streamed: its norm_scale is in cache_dir

    @property
    def train_bytes(self) -> float:
        return float(self.train_tokens) * self.d_in * self.bytes_per_value

    @property
    def eval_bytes(self) -> float:
        return float(self.eval_tokens) * self.d_in * self.bytes_per_value

    def short_key(self) -> tuple:
        """The first five fields of `set_key`: (layer, site, train, eval tokens, stream)."""
        return (self.layer, self.site, self.train_tokens, self.eval_tokens, self.stream)


def cached(cfg: DictConfig, split: str, n_tokens: int, dtype_name: str, marker: str) -> bool:
    """A complete cache of that (layer, site, data, split, size) in cache_dir: its folder's
    readable prefix (benchmark.activations cache_key) holds `marker` (manifest.json, or
    norm.json for a stream). The hash after the prefix (the data config's details) is not
    checked: a cache of the same data name, context and size counts."""
    prefix = (
        f"{cfg.model.name}_L{int(cfg.layer.index)}_{cfg.site.name}_{cfg.data.name}-{split}"
        f"_T{int(cfg.data.context_length)}_N{n_tokens}_{dtype_name}_"
    )
    root = Path(str(cfg.cache_dir)) / "activations"
    return any((d / marker).is_file() for d in root.glob(glob_escape(prefix) + "*"))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def activation_sets(jobs: Sequence[Job], nbytes: int, dtype_name: str) -> list[Activations]:
    """The distinct activation sets the jobs read, in order of first use."""
    out: dict[tuple, Activations] = {}
    for j in jobs:
        cfg = j.cfg
        train = (
            0 if j.d_sae is None else (j.train_tokens if j.stream else int(cfg.data.n_train_tokens))
        )
        n_eval = int(cfg.eval.n_activation_tokens)
        key = set_key(j)
        if key in out:
            continue
        n_norm = int(cfg.data.get("stream_norm_tokens") or 100_000)
        out[key] = Activations(
            layer=j.layer, site=j.site, d_in=j.d_in, train_tokens=train, eval_tokens=n_eval,
            bytes_per_value=nbytes, stream=j.stream,
            train_cached=train == 0 or (not j.stream and cached(cfg, "train", train, dtype_name, "manifest.json")),
            eval_cached=cached(cfg, "eval", n_eval, dtype_name, "manifest.json"),
            norm_cached=j.stream and cached(cfg, "train-stream", n_norm, dtype_name, "norm.json"),
        )  # fmt: skip
    return list(out.values())


def set_key(j: Job) -> tuple:
    cfg = j.cfg
    train = j.train_tokens if j.stream else int(cfg.data.n_train_tokens)
    return (j.layer, j.site, train, int(cfg.eval.n_activation_tokens), j.stream,
            str(cfg.data.name), int(cfg.data.context_length))  # fmt: skip


def free_disk(path: Path) -> float:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return float(shutil.disk_usage(path).free)


@dataclass
class Disk:
    """The activation sets, and the disk a cache of all of them needs against the budget."""

    sets: list[Activations]
    cache_dir: Path
    free: float  # bytes free at cache_dir
    budget: float  # --disk-budget, else half of `free`
    need: float  # bytes of every set cached

    @classmethod
    def of(cls, b: Basis, opts: Options) -> Disk:
        sets = activation_sets(b.jobs, b.nbytes, b.dtype_name)
        cache_dir = Path(str(b.cfg0.cache_dir))
        free = free_disk(cache_dir)
        budget = opts.disk_budget if opts.disk_budget is not None else 0.5 * free
        need = sum(s.train_bytes + s.eval_bytes for s in sets)
        return cls(sets=sets, cache_dir=cache_dir, free=free, budget=budget, need=need)


# ---- FLOPs ----


@dataclass
class ModelWork:
    """Model FLOPs (and tokens windowed) of one unit of the run: a fan-out group or one job."""

    jobs: list[Job] = field(default_factory=list)  # the unit's jobs still to run
    harvest: float = 0.0  # the truncated forward passes: harvest and stream
    lm_eval: float = 0.0  # the LM set: prefix, clean, spliced, zero ablation
    tokens_windowed: float = 0.0  # tokens the tokenizer turns into windows


@dataclass
class Seen:
    """What the units before have cached or computed (activation sets by their short key)."""

    train: set[tuple]
    eval: set[tuple]
    norm: set[tuple]
    zero: set[tuple] = field(default_factory=set)  # (layer, site) zero-ablation losses
    clean: bool = False  # the clean loss


def model_work(
    units: Sequence[Sequence[Job]], sets: Sequence[Activations], model: ModelShape
) -> list[ModelWork]:
    """Per unit (a fan-out group, or one job alone), in launch order, as the run runs a
    group: one truncated pass per split for all of the unit's sites not yet cached (a stream:
    over train.n_tokens, in every unit), and the LM set as benchmark.evaluate.evaluate_group
    runs it. Caches written by one unit serve the later ones; each zero-ablation loss and
    (without KL) the clean loss are computed once (and counted as not cached before)."""
    seen = Seen(
        train={s.short_key() for s in sets if s.train_cached},
        eval={s.short_key() for s in sets if s.eval_cached},
        norm={s.short_key() for s in sets if s.norm_cached},
    )
    out = []
    for unit in units:
        w = ModelWork(jobs=[j for j in unit if not j.done])
        out.append(w)
        if w.jobs:
            add_harvest(w, model, seen)
            add_lm_eval(w, model, seen)
    return out


def add_harvest(w: ModelWork, model: ModelShape, seen: Seen) -> None:
    """The unit's truncated passes F(L + 1): the held-out and training sets not yet cached, or
    the stream over train.n_tokens (and one norm estimate per site)."""
    live = w.jobs
    cfg, layer = live[0].cfg, live[0].layer
    ctx = int(cfg.data.context_length)
    pos = ctx / (ctx - 1)  # positions run per token counted (each window's BOS)
    trunc = model.flops(layer + 1, ctx)
    keys = {set_key(j)[:5]: j for j in live}
    train_keys = [k for k, j in keys.items() if j.d_sae is not None]
    if any(k not in seen.eval for k in keys):
        n_eval = int(cfg.eval.n_activation_tokens)
        w.harvest += trunc * n_eval * pos
        w.tokens_windowed += n_eval
        seen.eval |= set(keys)
    if live[0].stream and train_keys:
        w.harvest += trunc * live[0].train_tokens * pos
        w.tokens_windowed += live[0].train_tokens
        n_norm = int(cfg.data.get("stream_norm_tokens") or 100_000)
        for k in train_keys:
            if k not in seen.norm:  # one norm estimate per site
                w.harvest += trunc * n_norm * pos
                seen.norm.add(k)
    elif any(k not in seen.train for k in train_keys):
        n_train = int(cfg.data.n_train_tokens)
        w.harvest += trunc * n_train * pos
        w.tokens_windowed += n_train
        seen.train |= set(train_keys)


def add_lm_eval(w: ModelWork, model: ModelShape, seen: Seen) -> None:
    """The LM set (benchmark.evaluate.evaluate_group): per batch the prefix up to the lowest
    hooked block once, then from there the clean pass (with KL, or while the clean loss is
    not cached), one zero-ablation pass per hook not cached, and each SAE's spliced pass."""
    live = w.jobs
    cfg = live[0].cfg
    ctx = int(cfg.data.context_length)
    lm = int(cfg.data.n_eval_tokens) * (ctx / (ctx - 1))
    start = min(j.layer for j in live)
    prefix, full = model.flops(start, ctx), model.full(ctx)
    kl = bool(cfg.eval.get("kl_div", True))
    zeros = {(j.layer, j.site) for j in live} - seen.zero
    seen.zero |= zeros
    clean = 1 if kl or not seen.clean else 0
    seen.clean = True
    w.lm_eval += lm * (prefix + (full - prefix) * (len(live) + clean + len(zeros)))
    w.tokens_windowed += int(cfg.data.get("eval_pool_tokens") or cfg.data.n_eval_tokens)


def sae_flops(j: Job) -> float:
    """6 x d_in x d_sae x 2 x tokens: the dense-step bound of one SAE's training."""
    return 12.0 * j.d_in * (j.d_sae or 0) * j.train_tokens
