"""The stages of a run below the entry point: the model, the training stage, the held-out
activation metrics and the LM evaluation, for one group of SAEs that share an activation source.

`benchmark/run.py` turns each job's config into typed specs (`benchmark/specs.py`) and a `Plan`,
and hands them here; nothing in this module reads the config tree. The order of the stages and
the run folder belong to run.py; the files a stage writes into a run folder (the trained SAE,
history.csv, trained.json) are written here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from baselines.base import SparseAutoencoder
from benchmark import activations, data, models
from benchmark.errors import ConfigError
from benchmark.evaluate import activation_metrics_group, evaluate_group
from benchmark.fileio import write_json_atomic
from benchmark.saes import CONFIG, WEIGHTS, load_sae, save_sae
from benchmark.specs import EvalSpec, ModelSpec, SiteSpec, SourceSpec
from benchmark.train import Sparsity, TrainConfig, Trainer, TrainResult, train_group, write_history

log = logging.getLogger("benchmark.run")
CHECKPOINT = "checkpoint.pt"  # a run's training checkpoint, in its folder
# Written (atomically) after the trained SAE and history.csv: the training is finished and a
# re-run evaluates the saved SAE. Holds what the record needs from the training.
TRAINED = "trained.json"


class LazyModel:
    """Loads the model on first use, so a run whose activations are cached loads it only for
    the spliced evaluation. Jobs that share a process (the basic launcher runs a sweep in one
    process) share one loaded model per (model config, device, cache_dir)."""

    _loaded: dict[str, Any] = {}

    def __init__(self, model: ModelSpec, device: torch.device, cache_dir: Path) -> None:
        self.model, self.device, self.cache_dir = model, device, cache_dir
        self.key = f"{model!r}|{device}|{cache_dir}"

    def __call__(self):
        if self.key not in self._loaded:
            self._loaded.clear()  # at most one model in memory
            self._loaded[self.key] = models.load_model(self.model, self.device, self.cache_dir)
        return self._loaded[self.key]


def stage(name: str, out: Path) -> None:
    """One line per stage, so a sweep's log shows which job is where and for how long."""
    log.info("[%s] %s", out.name, name)


@dataclass
class Plan:
    """Everything a run needs that can be built and checked in a second, before any model,
    data or training work: a bad value anywhere fails here, not after the harvest."""

    train: TrainConfig | None  # None: evaluate-only (train=none)
    sparsity: Sparsity | None
    sae: SparseAutoencoder
    node: dict[str, Any]  # the resolved SAE node (saved beside the weights)
    d_in: int
    d_sae: int
    config_hash: str
    curve_hash: str


@dataclass
class Trained:
    """What the training stage hands on (the SAE is trained and scale-folded in place)."""

    result: TrainResult | None  # None: evaluate-only
    norm_scale: float
    activation_cache: str
    logger: Any = None  # finished once the result is written
    store: Any = None  # the training activations (None: evaluate-only)
    loaded: bool = False  # trained by an earlier process: the SAE and this come from the folder


@dataclass
class Unit:
    """One SAE of a group as the stages see it: its folder, its plan, its site, whether to
    start over (`rerun`), and how to start its logger."""

    out: Path
    plan: Plan
    site: SiteSpec
    rerun: bool
    start_logger: Callable[[], Any]


def train_stage(
    units: list[Unit], source: SourceSpec, seed: int, model: LazyModel, group: str | None
) -> list[Trained]:
    """Train every unit's SAE: one harvest of `source` for all their sites (one model pass),
    then all SAEs in lockstep on the same batches seeded by `seed` (`train_group`; one SAE is a
    group of one). A unit whose folder holds a finished training (`load_trained`) is not
    trained again."""
    trained: list[Trained | None] = [None] * len(units)
    todo = []
    for i, u in enumerate(units):
        if u.plan.train is None or u.plan.sparsity is None:  # evaluate-only: raw activations
            save_sae(u.plan.sae, u.out, u.plan.node)
            trained[i] = Trained(None, 1.0, "")
        elif (done := load_trained(u)) is not None:
            trained[i] = done
        else:
            todo.append(i)
    if todo:
        lead = units[todo[0]]
        sites = list({units[i].site.name: units[i].site for i in todo}.values())
        stage("activations", lead.out)
        stores = activations.get_activation_stores(model, source, "train", sites=sites)
        stores = without_outliers(source.data.max_norm_multiple, stores)
        trainers, streams, loggers = [], [], []
        for i in todo:
            m, plan = units[i], units[i].plan
            assert plan.train is not None and plan.sparsity is not None
            store = stores[m.site.name]
            if store.d_in != plan.d_in:
                raise ConfigError(
                    f"site={m.site.name}: the activations have width {store.d_in} but the "
                    f"model config says {plan.d_in} (model.d_model / n_heads * d_head)"
                )
            where = f" in fan-out group {group} ({len(todo)} SAEs)" if group else ""
            stage(f"train {type(plan.sae).__name__} d_in={plan.d_in} d_sae={plan.d_sae}{where}",
                  m.out)  # fmt: skip
            logger = m.start_logger()
            loggers.append(logger)
            trainers.append(Trainer(plan.sae, plan.train, plan.sparsity,
                                    checkpoint_path=m.out / CHECKPOINT, log=logger.log,
                                    progress=False, resume=not m.rerun))  # fmt: skip
            streams.append(m.site.name)
        batch_size = trainers[0].cfg.batch_size

        def factory(name: str, store: Any) -> Any:
            # A streamed store starts at batch `skip` without the model: exactly, from the
            # state it saves in the first folder of its stream whenever the trainers
            # checkpoint (`StreamingStore.batches`). A cache is fast-forwarded (no model).
            own = [t for t, s in zip(trainers, streams, strict=True) if s == name]
            every = math.gcd(*(t.cfg.checkpoint_every for t in own))
            ckpt = own[0].ckpt if own else None

            def batches(skip: int) -> Any:
                if isinstance(store, activations.StreamingStore):
                    state = ckpt.parent / store.STATE_FILE if ckpt is not None else None
                    return store.batches(batch_size, seed=seed, start=skip, state_path=state,
                                         save_every=every)  # fmt: skip
                it = store.batches(batch_size, seed=seed)
                for _ in range(skip):  # resume: the same seeded stream, fast-forwarded
                    next(it)
                return it

            return batches

        results = train_group(trainers, streams, {n: factory(n, st) for n, st in stores.items()},
                              progress=source.progress)  # fmt: skip
        for i, result, logger in zip(todo, results, loggers, strict=True):
            m, plan, store = units[i], units[i].plan, stores[units[i].site.name]
            write_history(m.out / "history.csv", result.history)
            plan.sae.fold_scale(store.norm_scale)
            save_sae(plan.sae, m.out, plan.node)
            t = Trained(result, store.norm_scale, str(store.key), logger, store)
            assert plan.train is not None
            if result.steps >= plan.train.total_steps:  # finished (a test's stop_after ends early)
                write_trained(m.out, t)  # last: the folder now holds a finished training
            trained[i] = t
    return [t for t in trained if t is not None]


def write_trained(out: Path, t: Trained) -> None:
    """trained.json: what the record needs from a finished training (written after the SAE)."""
    assert t.result is not None
    write_json_atomic(out / TRAINED, {
        "norm_scale": t.norm_scale, "activation_cache": t.activation_cache,
        "train_max_norm": getattr(t.store, "max_norm", None),
        "train_excluded": getattr(t.store, "n_excluded", None),
        "train": {k: v for k, v in t.result.as_dict().items() if k != "history"},
    })  # fmt: skip


def load_trained(m: Unit) -> Trained | None:
    """The finished training of a run killed after its SAE was saved (trained.json, written
    after sae.safetensors, sae_config.yaml and history.csv), with the saved SAE in plan.sae (on
    plan.sae's device): the run goes straight to its evaluation, and its record is the one an
    uninterrupted run writes. None (train) without it, with rerun=true, or when the saved SAE
    does not load or is not this plan's (a warning says so)."""
    file, plan = m.out / TRAINED, m.plan
    if m.rerun or not file.is_file():
        return None
    assert plan.train is not None
    try:
        saved = json.loads(file.read_text())
        if not ((m.out / WEIGHTS).is_file() and (m.out / CONFIG).is_file()):
            raise FileNotFoundError(f"{WEIGHTS} or {CONFIG} is missing")
        sae = load_sae(m.out, next(plan.sae.parameters()).device)
        if (type(sae), sae.d_in, sae.d_sae) != (type(plan.sae), plan.d_in, plan.d_sae):
            raise ValueError(f"the saved SAE is a {type(sae).__name__} {sae.d_in}x{sae.d_sae}")
        result = TrainResult(**saved["train"], history=[])
        if result.steps < plan.train.total_steps:
            raise ValueError(f"{result.steps} of {plan.train.total_steps} steps")
    except Exception as e:  # noqa: BLE001
        log.warning("[%s] %s unusable (%s: %s): training again", m.out.name, TRAINED,
                    type(e).__name__, e)  # fmt: skip
        return None
    plan.sae = sae
    store = SimpleNamespace(max_norm=saved["train_max_norm"], n_excluded=saved["train_excluded"])
    logger = m.start_logger()  # the evaluation's metrics still reach the logger
    stage(f"trained already ({WEIGHTS}, {TRAINED}): evaluating the saved SAE", m.out)
    return Trained(result, float(saved["norm_scale"]), str(saved["activation_cache"]), logger,
                   store, loaded=True)  # fmt: skip


class Clock:
    """Wall time per stage: `lap(name)` adds the time since the last lap to `name`."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def split(self, first: str, second: str, second_parts: list[float]) -> None:
        """A lap holding two stages: `second` is the sum of `second_parts` (the trainers' own
        clocks), `first` the rest (the training split's harvest)."""
        now = time.perf_counter()
        whole = now - self.t
        part = min(sum(second_parts), whole)
        self.laps[first] = self.laps.get(first, 0.0) + whole - part
        self.laps[second] = self.laps.get(second, 0.0) + part
        self.t = now


def after_result(out: Path, logger: Any, metrics: dict[str, Any]) -> None:
    """Clean-up once result.json is written. Nothing here may turn a finished run into a failed
    one: a failure is logged as a warning and the complete record stays."""
    try:
        (out / CHECKPOINT).unlink(missing_ok=True)  # the weights are saved; free the space
        (out / TRAINED).unlink(missing_ok=True)  # the record holds it now
        (out / activations.StreamingStore.STATE_FILE).unlink(missing_ok=True)  # and a stream's
        if logger is not None:
            logger.finish(metrics)
    except Exception as e:  # noqa: BLE001
        log.warning("[%s] after the result was written: %s: %s", out.name, type(e).__name__, e)


def held_out_stores(
    model: Any, source: SourceSpec, sites: list[SiteSpec], n_tokens: int
) -> dict[str, Any]:
    """The eval split's activation caches of `sites`: `n_tokens` (eval.n_activation_tokens)
    held-out activations per site, harvested once (one model pass for all sites) and shared
    by every SAE, less the rows over `data.max_norm_multiple` when it is set."""
    stores = activations.get_activation_stores(
        model, source, "eval", sites=sites, n_tokens=n_tokens
    )
    return without_outliers(source.data.max_norm_multiple, stores)


def without_outliers(multiple: float | None, stores: dict[str, Any]) -> dict[str, Any]:
    """`stores` less their rows with a norm over data.max_norm_multiple x the store's median
    norm (`ActivationStore.without_outliers`); unchanged when it is null (the default).

    Why: some models write "massive activations" (Sun et al., 2024, arXiv 2402.17762) into the
    residual stream at a few positions; in SmolLM2-135M, at the first token after BOS when it
    is a delimiter ("\\n", ",", "("). At layer 14 they are 0.1% of the tokens, up to 160x the
    median norm, and hold 95% of the variance: the one-scalar normalisation and the MSE are
    then about those few tokens. Leaving out rows over a multiple of the median norm follows
    `max_activation_norm_multiple` of the dictionary_learning library (saprmarks, PR #52). A
    left-out position is treated as BOS is: not trained on, not in the activation metrics, and
    it keeps its original activation in the LM splice (its cross-entropy is still scored)."""
    return {name: store.without_outliers(multiple) for name, store in stores.items()}


def norm_filter(multiple: float | None, train_store: Any, eval_store: Any) -> dict[str, Any] | None:
    """What `without_outliers` left out, for the result record (None when it is off)."""
    if multiple is None:
        return None
    return {
        "max_norm_multiple": float(multiple),
        "definition": "a position whose activation norm (raw units) exceeds max_norm_multiple "
        "x the median norm of its split's cached activation set is left out like BOS: not "
        "trained on, not in l0/fvu/frequencies, and it keeps its original activation in the "
        "LM splice (its cross-entropy is still scored)",
        "train_max_norm": getattr(train_store, "max_norm", None),
        "train_excluded": getattr(train_store, "n_excluded", None),
        "held_out_max_norm": eval_store.max_norm,
        "held_out_excluded": eval_store.n_excluded,
    }


def activation_stage(
    ev: EvalSpec, saes: list, store: Any, device: torch.device, progress: bool = True
):
    """(metrics, firing frequencies) of each SAE in `saes` (all at the store's site): L0, FVU and
    frequencies on the held-out activation `store`, read once for all of them."""
    batches = store.batches(
        ev.activation_batch_size, seed=0, epochs=1, normalise=False, shuffle=False
    )
    return activation_metrics_group(
        [sae.eval() for sae in saes], batches, device, total=store.n_tokens,
        progress=progress,
    )  # fmt: skip


def evaluate_stage(source: SourceSpec, ev: EvalSpec, members, lm, device: torch.device,
                   max_norms: dict[str, float | None] | None = None,
                   windows_out: list[torch.Tensor] | None = None):  # fmt: skip
    """The LM metrics of trained (scale-folded) SAEs, each (sae, hook) of `members`, on the LM
    set of the held-out split: one shared pass per batch up to the hooked layer
    (`evaluate_group`). max_norms: per hook, the held-out store's `max_norm` (positions with a
    larger activation norm keep their original activation). Returns one metrics dict per
    member; windows_out receives each member's per-window CE sums (`evaluate_group`)."""
    tokens = data.eval_windows(source.data, lm.tokenizer).to(device)
    mask = data.non_special_mask(tokens, lm.tokenizer)
    return evaluate_group(
        lm, [(sae.eval(), hook) for sae, hook in members], tokens, mask,
        batch_size=ev.batch_size, cache_dir=source.cache_dir,
        model_key=activations.model_key(source), kl_div=ev.kl_div,
        progress=source.progress, max_norms=max_norms, windows_out=windows_out,
    )  # fmt: skip
