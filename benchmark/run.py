"""The Hydra entry point: compose -> validate -> harvest (cached) -> train -> evaluate -> write.

    python -m benchmark.run site=mlp sae=gated sparsity=l0_40 train=cpu
    python -m benchmark.run -m sae=jumprelu,gated,topk sparsity=l0_20,l0_40,l0_80
    python -m benchmark.run -m +experiment=quickstart

Owns the order of the stages and the run folder; every `_target_` lives in conf/, not here.
Jobs come in through `run_jobs`: `main` hands over its own job (a group of one), the fan-out
launcher (benchmark/fanout.py, which this module does not import) each group of a sweep.
A run's folder is named by its config (benchmark/identity.py), single run or sweep job alike.
A folder that already holds a complete result.json of the same config is skipped (so an
interrupted sweep, re-launched with the same command, resumes where it stopped; a result from
other code is reused with a warning); `rerun=true` re-runs it and keeps the old result beside
the new. Training checkpoints (train.checkpoint_every) resume a killed run in the same folder;
a run killed after its SAE was saved (sae.safetensors, then trained.json) resumes at the
evaluation, with the record an uninterrupted run writes.

One process per run folder: a job claims its folder with a file lock (`claim`: <folder>/.run.lock,
flock, released by the OS when the process dies, so a killed run never blocks the next) for its
training and evaluation, in every launcher (a fan-out group claims its members' folders in sorted
order). A job that finds its folder claimed by another process does not wait: it logs one line
(`[<folder>] being run by another process: skipped`) and returns nothing, so the same sweep
started twice shares the work instead of doing it twice; re-launch after the other process ends
to pick up anything it failed. Each member of a fan-out group also gets its own lines in its own
run.log (`member_logs`). A run refused by a pre-run check (ConfigError before it started) leaves
no folder behind (`remove_unused`).

Every check that needs no model or data (`plan_run`, `check_writable`) runs before the first
heavy step. A user error prints one line (`error: ...`) and exits with status 2, whether the
suite finds it (ConfigError) or Hydra does before the job (`sae=nope`, a bad override: `cli`,
benchmark/cli_errors.py); a bug keeps its traceback and status 1. HYDRA_FULL_ERROR=1 shows
every traceback.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from baselines.base import SparseAutoencoder
from benchmark import activations, cli_errors, data, identity, models
from benchmark.errors import ConfigError
from benchmark.evaluate import activation_metrics_group, evaluate_group
from benchmark.fileio import DiskFullError, save_npy_atomic, write_json_atomic
from benchmark.hub import check_sources
from benchmark.metrics import METRICS_VERSION, definitions
from benchmark.results import ResultRecord, git_commit, provenance, read_result, write_result
from benchmark.runfolder import claim, member_logs, remove_unused
from benchmark.saes import CONFIG, WEIGHTS, build_sae, load_sae, sae_node, save_sae
from benchmark.train import (
    Sparsity,
    TrainConfig,
    Trainer,
    TrainResult,
    read_checkpoint,
    train_group,
    write_history,
)
from benchmark.validate import check_run, dictionary_size, evaluate_only, site_width
from interop.foreign import source_of, suite_node

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

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        model = OmegaConf.to_yaml(cfg.model, resolve=True)
        self.key = f"{model}|{device}|{cfg.cache_dir}"

    def __call__(self):
        if self.key not in self._loaded:
            self._loaded.clear()  # at most one model in memory
            self._loaded[self.key] = models.load_model(
                self.cfg.model, self.device, self.cfg.cache_dir
            )
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
    node: DictConfig  # the resolved SAE node (saved beside the weights)
    d_in: int
    d_sae: int
    config_hash: str
    curve_hash: str


def plan_run(cfg: DictConfig) -> Plan:
    check_run(cfg)
    d_in = site_width(cfg)
    hashes = identity.config_hash(cfg), identity.curve_hash(cfg)
    if evaluate_only(cfg):  # a released or foreign SAE: sizes and sparsity come from its file
        sae = build_sae(cfg.sae, d_in, d_sae=None)
        node = OmegaConf.create(suite_node(sae))
        return Plan(None, None, sae, node, d_in, sae.d_sae, *hashes)
    train_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    sparsity = Sparsity(cfg.sparsity.mode, cfg.sparsity.get("target_l0"))
    d_sae = dictionary_size(cfg, d_in)
    # The seed is set right before the SAE is built, so its initial weights do not depend on
    # whether this run harvested (or on anything else that draws random numbers first).
    torch.manual_seed(int(cfg.seed))
    sae = build_sae(cfg.sae, d_in, d_sae)
    return Plan(train_cfg, sparsity, sae, sae_node(cfg.sae, d_in, d_sae), d_in, d_sae, *hashes)


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
class Member:
    """One job of a run: its config, its folder and its Hydra choices. A single run is a group
    of one; a fan-out group (benchmark/fanout.py) has several, sharing model, layer, data,
    batch stream and evaluation config (benchmark.identity.group_key)."""

    cfg: DictConfig
    out: Path
    choices: dict[str, Any]


def train_stage(
    members: list[Member], plans: list[Plan], model: LazyModel, group: str | None
) -> list[Trained]:
    """Train every member's SAE: one harvest for all their sites (one model pass), then all
    SAEs in lockstep on the same batches (`train_group`; one SAE is a group of one). A member
    whose folder holds a finished training (`load_trained`) is not trained again."""
    trained: list[Trained | None] = [None] * len(members)
    todo = []
    for i, (m, plan) in enumerate(zip(members, plans, strict=True)):
        if plan.train is None or plan.sparsity is None:  # evaluate-only: raw activations
            save_sae(plan.sae, m.out, plan.node)
            trained[i] = Trained(None, 1.0, "")
        elif (done := load_trained(m, plan)) is not None:
            trained[i] = done
        else:
            todo.append(i)
    if todo:
        lead = members[todo[0]]
        sites = list({members[i].cfg.site.name: members[i].cfg.site for i in todo}.values())
        stage("activations", lead.out)
        stores = activations.get_activation_stores(model, lead.cfg, "train", sites=sites)
        stores = without_outliers(lead.cfg, stores)
        trainers, streams, loggers = [], [], []
        for i in todo:
            m, plan = members[i], plans[i]
            assert plan.train is not None and plan.sparsity is not None
            store = stores[m.cfg.site.name]
            if store.d_in != plan.d_in:
                raise ConfigError(
                    f"site={m.cfg.site.name}: the activations have width {store.d_in} but the "
                    f"model config says {plan.d_in} (model.d_model / n_heads * d_head)"
                )
            where = f" in fan-out group {group} ({len(todo)} SAEs)" if group else ""
            stage(f"train {type(plan.sae).__name__} d_in={plan.d_in} d_sae={plan.d_sae}{where}",
                  m.out)  # fmt: skip
            logger = start_logger(m)
            loggers.append(logger)
            trainers.append(Trainer(plan.sae, plan.train, plan.sparsity,
                                    checkpoint_path=m.out / CHECKPOINT, log=logger.log,
                                    progress=False, resume=not m.cfg.get("rerun", False)))  # fmt: skip
            streams.append(m.cfg.site.name)
        seed, batch_size = int(lead.cfg.seed), trainers[0].cfg.batch_size

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
                              progress=lead.cfg.get("progress", True))  # fmt: skip
        for i, result, logger in zip(todo, results, loggers, strict=True):
            m, plan, store = members[i], plans[i], stores[members[i].cfg.site.name]
            write_history(m.out / "history.csv", result.history)
            plan.sae.fold_scale(store.norm_scale)
            save_sae(plan.sae, m.out, plan.node)
            t = Trained(result, store.norm_scale, str(store.key), logger, store)
            assert plan.train is not None
            if result.steps >= plan.train.total_steps:  # finished (a test's stop_after ends early)
                write_trained(m.out, t)  # last: the folder now holds a finished training
            trained[i] = t
    return [t for t in trained if t is not None]


def start_logger(m: Member) -> Any:
    """The member's logger (conf/logger/, from the composed config), started for its run."""
    logger = instantiate(m.cfg.logger)
    logger.start(OmegaConf.to_container(m.cfg, resolve=True), m.out.name, str(m.out))
    return logger


def write_trained(out: Path, t: Trained) -> None:
    """trained.json: what the record needs from a finished training (written after the SAE)."""
    assert t.result is not None
    write_json_atomic(out / TRAINED, {
        "norm_scale": t.norm_scale, "activation_cache": t.activation_cache,
        "train_max_norm": getattr(t.store, "max_norm", None),
        "train_excluded": getattr(t.store, "n_excluded", None),
        "train": {k: v for k, v in t.result.as_dict().items() if k != "history"},
    })  # fmt: skip


def load_trained(m: Member, plan: Plan) -> Trained | None:
    """The finished training of a run killed after its SAE was saved (trained.json, written
    after sae.safetensors, sae_config.yaml and history.csv), with the saved SAE in plan.sae (on
    plan.sae's device): the run goes straight to its evaluation, and its record is the one an
    uninterrupted run writes. None (train) without it, with rerun=true, or when the saved SAE
    does not load or is not this plan's (a warning says so)."""
    file = m.out / TRAINED
    if m.cfg.get("rerun", False) or not file.is_file():
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
    logger = start_logger(m)  # the evaluation's metrics still reach the logger
    stage(f"trained already ({WEIGHTS}, {TRAINED}): evaluating the saved SAE", m.out)
    return Trained(result, float(saved["norm_scale"]), str(saved["activation_cache"]), logger,
                   store, loaded=True)  # fmt: skip


def run(cfg: DictConfig, out: Path, choices: dict[str, Any]) -> ResultRecord:
    """One run: a group of one."""
    return run_group([Member(cfg, out, choices)])[0]


def run_group(members: list[Member], group: str | None = None) -> list[ResultRecord]:
    """Train and evaluate the members' SAEs together and write each one's result.json, exactly
    as separate runs would (same folders, same numbers), with `trained_in_group` set to the
    group's key when there are several. Shared: the model (loaded once), one harvest pass per
    split for all sites, the batches (lockstep training) and, per evaluation batch, the model
    up to the hooked layer and the clean pass. `stage_seconds` in each record gives the
    group's setup / harvest / train / evaluate wall times (shared stages counted once), and
    evaluate's two parts, activation_metrics (the held-out activation set) and lm_eval (the
    LM-set passes)."""
    t_start = time.perf_counter()
    plans = [plan_run(m.cfg) for m in members]
    for m in members:
        check_sources(m.cfg)  # hub sources: available offline or reachable, in seconds
    with member_logs(members):
        return _run_group(members, plans, group, t_start)


def _run_group(
    members: list[Member], plans: list[Plan], group: str | None, t_start: float
) -> list[ResultRecord]:
    lead = members[0]
    device = models.resolve_device(lead.cfg.device)
    for m in members:
        m.out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(m.cfg, m.out / "config.yaml", resolve=True)
    model = LazyModel(lead.cfg, device)
    clock = Clock()
    # The hook is checked against the loaded model's hook names on every run (a cache hit
    # too); the model is needed for the spliced evaluation anyway.
    bridge = model()
    hooks = [models.hook_name(m.cfg.model, int(m.cfg.layer.index), m.cfg.site, bridge=bridge)
             for m in members]  # fmt: skip
    for plan in plans:
        plan.sae.to(device)
    clock.lap("setup")
    sites = list({m.cfg.site.name: m.cfg.site for m in members}.values())
    n_held_out = int(lead.cfg.eval.n_activation_tokens)
    held_out = activations.get_activation_stores(model, lead.cfg, "eval", sites=sites,
                                                 n_tokens=n_held_out)  # fmt: skip
    held_out = without_outliers(lead.cfg, held_out)
    clock.lap("harvest")  # the held-out set; the training split's harvest is timed below
    trained = train_stage(members, plans, model, group)
    clock.split("harvest", "train",
                [t.result.seconds for t in trained if t.result is not None and not t.loaded])  # fmt: skip

    stage("evaluate", lead.out)
    act: list[Any] = [None] * len(members)
    by_site: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_site.setdefault(m.cfg.site.name, []).append(i)
    for site, idx in by_site.items():  # one pass over each site's held-out set for its SAEs
        eval_store = held_out[site]
        outs = activation_stage(lead.cfg, [plans[i].sae for i in idx], eval_store, device)
        for i, (act_metrics, freq) in zip(idx, outs, strict=True):
            save_npy_atomic(members[i].out / "firing_frequency.npy", freq.numpy())
            act[i] = (eval_store, act_metrics)
    clock.lap("activation_metrics")
    max_norms = {h: held_out[m.cfg.site.name].max_norm for m, h in zip(members, hooks, strict=True)}
    lm_windows: list[torch.Tensor] = []
    lm = evaluate_stage(lead.cfg, [(p.sae, h) for p, h in zip(plans, hooks, strict=True)],
                        bridge, device, max_norms, lm_windows)  # fmt: skip
    clock.lap("lm_eval")
    # "evaluate" is the two together (the key older records and scripts read).
    clock.laps["evaluate"] = clock.laps["activation_metrics"] + clock.laps["lm_eval"]
    records = []
    for m, plan, t, hook, (eval_store, act_metrics), lm_metrics, windows in zip(
        members, plans, trained, hooks, act, lm, lm_windows, strict=True
    ):
        save_npy_atomic(m.out / "lm_windows.npy", windows.numpy())  # evaluate.WINDOW_COLUMNS
        record = build_record(m.cfg, plan, t, m.out, m.choices, hook, device,
                              {**act_metrics, **lm_metrics}, str(eval_store.key))  # fmt: skip
        record.norm_filter = norm_filter(m.cfg, t.store, eval_store)
        record.trained_in_group = group
        record.stage_seconds = dict(clock.laps)
        record.wall_seconds = time.perf_counter() - t_start  # the whole group, record included
        write_result(m.out, record)
        r = record.metrics
        log.info(
            "[%s] done in %.0fs: l0=%.1f fvu=%.4f delta_lm_loss=%.4f frac_dead=%.4f (%d held-out tokens)",
            m.out.name, record.wall_seconds, r["l0"], r["fvu"], r["delta_lm_loss"],
            r["frac_dead"], r["n_activation_tokens"],
        )  # fmt: skip
        _after_result(m.out, t.logger, r)
        records.append(record)
    return records


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


def build_record(
    cfg: DictConfig, plan: Plan, trained: Trained, out: Path, choices: dict[str, Any],
    hook: str, device: torch.device, metrics: dict[str, Any], eval_activation_cache: str,
) -> ResultRecord:  # fmt: skip
    """The result record of a finished run (wall_seconds is set by the caller last)."""
    t, sp, sae = trained.result, plan.sparsity, plan.sae
    source = source_of(sae)
    if source and source.get("hook_name") not in (None, hook):
        log.warning("[%s] %s was trained at %s, evaluated at %s", out.name,
                    source.get("path"), source.get("hook_name"), hook)  # fmt: skip
    coefficient_mode = sp is not None and sp.mode == "coefficient"
    return ResultRecord(
        run_id=out.name,
        config_hash=plan.config_hash,
        curve_hash=plan.curve_hash,
        status="complete",
        experiment=cfg.experiment_name,
        model=cfg.model.name,
        layer=int(cfg.layer.index),
        layer_name=str(choices.get("layer") or cfg.layer.name),
        site=cfg.site.name,
        hook=hook,
        sae=str(choices.get("sae") or type(sae).__name__),
        sparsity=identity.sparsity_label(cfg) if sp is not None else "given",
        sparsity_mode=sp.mode if sp is not None else "given",
        target_l0=sp.target_l0 if sp is not None else None,
        sparsity_coefficient=cfg.sparsity.get("coefficient") if coefficient_mode else None,
        coefficient=t.coefficient if t is not None and sae.coefficient else None,
        seed=int(cfg.seed),
        d_in=plan.d_in,
        d_sae=plan.d_sae,
        norm_scale=trained.norm_scale,
        activation_cache=trained.activation_cache,
        activation_source="stream" if cfg.data.get("stream") else "cache",
        eval_activation_cache=eval_activation_cache,
        metrics_version=METRICS_VERSION,
        metric_definitions=definitions(),
        metrics={**metrics, "train_frac_dead": t.final_frac_dead if t is not None else None},
        dead_window_tokens=t.dead_window_tokens if t is not None else None,
        train_l0=t.train_l0 if t is not None else None,
        train_tokens=t.tokens if t is not None else 0,
        train_seconds=t.seconds if t is not None else 0.0,
        train_tokens_per_s=t.tokens_per_s if t is not None else None,
        peak_memory_mb=t.peak_memory_mb if t is not None else None,
        wall_seconds=0.0,
        resumed_from_step=t.resumed_from_step if t is not None else 0,
        train_max_fvu_jump=t.max_fvu_jump if t is not None else None,
        train_spike_step=t.spike_step if t is not None else None,
        choices=choices,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        run_dir=str(out),
        history_file="history.csv" if t is not None else None,
        sae_source=source,
        provenance=provenance(device),
    )


def _after_result(out: Path, logger: Any, metrics: dict[str, Any]) -> None:
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


def held_out_store(cfg: DictConfig, model: Any):
    """The eval split's activation cache of cfg.site: eval.n_activation_tokens held-out
    activations, harvested once per site and shared by every SAE (less the rows over
    `data.max_norm_multiple`, when it is set)."""
    n_tokens = int(cfg.eval.n_activation_tokens)
    store = activations.get_activation_store(model, cfg, split="eval", n_tokens=n_tokens)
    return store.without_outliers(cfg.data.get("max_norm_multiple"))


def without_outliers(cfg: DictConfig, stores: dict[str, Any]) -> dict[str, Any]:
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
    multiple = cfg.data.get("max_norm_multiple")
    return {name: store.without_outliers(multiple) for name, store in stores.items()}


def norm_filter(cfg: DictConfig, train_store: Any, eval_store: Any) -> dict[str, Any] | None:
    """What `without_outliers` left out, for the result record (None when it is off)."""
    multiple = cfg.data.get("max_norm_multiple")
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


def activation_stage(cfg: DictConfig, saes: list, store: Any, device: torch.device):
    """(metrics, firing frequencies) of each SAE in `saes` (all at the store's site): L0, FVU and
    frequencies on the held-out activation `store`, read once for all of them."""
    batches = store.batches(
        int(cfg.eval.activation_batch_size), seed=0, epochs=1, normalise=False, shuffle=False
    )
    return activation_metrics_group(
        [sae.eval() for sae in saes], batches, device, total=store.n_tokens,
        progress=cfg.get("progress", True),
    )  # fmt: skip


def evaluate_stage(cfg: DictConfig, members, lm, device: torch.device,
                   max_norms: dict[str, float | None] | None = None,
                   windows_out: list[torch.Tensor] | None = None):  # fmt: skip
    """The LM metrics of trained (scale-folded) SAEs, each (sae, hook) of `members`, on the LM
    set of the held-out split: one shared pass per batch up to the hooked layer
    (`evaluate_group`). max_norms: per hook, the held-out store's `max_norm` (positions with a
    larger activation norm keep their original activation). Returns one metrics dict per
    member; windows_out receives each member's per-window CE sums (`evaluate_group`)."""
    tokens = data.eval_windows(cfg, lm.tokenizer).to(device)
    mask = data.non_special_mask(tokens, lm.tokenizer)
    return evaluate_group(
        lm, [(sae.eval(), hook) for sae, hook in members], tokens, mask,
        batch_size=int(cfg.eval.batch_size), cache_dir=cfg.cache_dir,
        model_key=activations.model_key(cfg), kl_div=bool(cfg.eval.kl_div),
        progress=cfg.get("progress", True), max_norms=max_norms, windows_out=windows_out,
    )  # fmt: skip


def reevaluate(run_dir: str | Path, device: str = "auto") -> dict[str, float | None]:
    """Reload a finished run's SAE and config and evaluate it again (same metrics, exactly)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)
    dev = models.resolve_device(device)
    sae = load_sae(run_dir, dev)
    hook = models.hook_name(cfg.model, int(cfg.layer.index), cfg.site)
    lm = models.load_model(cfg.model, dev, cfg.cache_dir)
    store = held_out_store(cfg, lm)
    ((act_metrics, _),) = activation_stage(cfg, [sae], store, dev)
    lm_metrics = evaluate_stage(cfg, [(sae, hook)], lm, dev, {hook: store.max_norm})[0]
    return {**act_metrics, **lm_metrics}


def check_folder(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The complete result already in `out` for this config, or None (run it).

    A folder holding a result or a checkpoint of a *different* config (possible only when the
    user points hydra.run.dir somewhere by hand: folder names carry the config hash) is never
    reused: ConfigError names the differing keys. A result from other code (git commit) is
    reused with a warning; `rerun=true` recomputes it.
    """
    if cfg.get("rerun", False):
        return None
    mine = identity.identity_dict(cfg)
    done = read_result(out)
    saved = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").exists() else None
    theirs = identity.identity_dict(saved) if isinstance(saved, DictConfig) else None
    if theirs is not None and theirs != mine:
        diff = "; ".join(identity.diff_keys(theirs, mine)[:6])
        raise ConfigError(
            f"{out} holds a run of a different config ({diff}); use another results_dir or "
            "experiment_name, or delete that folder"
        )
    if not (done and done.get("status") == "complete"):
        return None
    commit, dirty = git_commit()
    if done.get("git_commit") != commit or done.get("git_dirty") or dirty:
        log.warning(
            "[%s] already complete, computed by code %s%s (now %s%s): reused; rerun=true "
            "recomputes it", out.name, str(done.get("git_commit"))[:10],
            "+changes" if done.get("git_dirty") else "", commit[:10], "+changes" if dirty else "",
        )  # fmt: skip
    else:
        log.info("[%s] already complete, skipped (rerun=true to run it again)", out.name)
    return done


def record_failure(out: Path, e: BaseException, choices: dict[str, Any], cfg: DictConfig) -> None:
    """A failed record with the traceback, unless a complete one is already there: a finished
    run is never turned into a failed one by something that broke after it was written."""
    done = read_result(out)
    if done and done.get("status") == "complete":
        return
    write_result(out, {
        "run_id": out.name, "status": "failed", "error": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(), "choices": choices, "run_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=False),
    })  # fmt: skip


def check_writable(cfg: DictConfig) -> None:
    """results_dir and cache_dir are folders this process can create and write in; checked
    before any model, data or training work (ConfigError names the key and the path). The test
    writes a file (`cli_errors.unwritable`): root ignores permission bits, and a read-only
    mount is read-only for root too.

    A read-only results folder usually fails earlier, in Hydra: it writes run.log, .hydra/ and
    (with -m) multirun.yaml into the run folders on every launch, a finished run's included,
    so re-launching a sweep whose folder is read-only cannot simply skip its finished runs; it
    ends with one line naming results_dir (benchmark.cli_errors)."""
    for key in ("results_dir", "cache_dir"):
        path = Path(str(cfg[key]))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={path}: is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{key}={path}: cannot create this folder ({e.strerror or e})"
            ) from None
        why = cli_errors.unwritable(path)
        if why is not None:
            raise ConfigError(f"{key}={path}: this folder is not writable ({why})")


def preflight(cfg: DictConfig) -> None:
    """The checks of this machine that a run needs and that take seconds at most, before the
    SAE is built or the model loads: the config's own checks (check_run), `device` exists here
    (cuda without CUDA, mps without Metal: models.resolve_device), and the hub sources
    (model, data and an `hf://` sae.path) are in the local cache or the hub answers
    (benchmark.hub.check_sources: offline fails in seconds, naming sae.path). Each failure is a
    ConfigError of one line."""
    check_run(cfg)
    models.resolve_device(str(cfg.device))
    check_sources(cfg)


def check_checkpoint(m: Member) -> None:
    """A checkpoint in the run's folder is read as plain data (`train.read_checkpoint`, its
    tensors memory-mapped: no I/O) before any model or data work, so a hostile, damaged or
    outdated one fails in a second, not after the harvest. rerun=true ignores it: training
    starts from scratch and overwrites it."""
    path = m.out / CHECKPOINT
    if path.exists() and not m.cfg.get("rerun", False):
        read_checkpoint(path, mmap=True)


def loader_error(cfg: DictConfig, e: BaseException) -> str | None:
    """The one-line message when the SAE loader of `sae.path` (train=none) could not read a
    file (an OSError: permissions, a folder where a file should be, ...), else None.
    benchmark.saes.build_sae already turns a loader's ValueError, TypeError and
    FileNotFoundError into a ConfigError; any other exception stays a bug."""
    cause = e.__cause__ if isinstance(e, InstantiationException) else None
    target = str(cfg.sae.get("_target_", ""))
    if isinstance(cause, OSError) and target and target in str(e):
        return f"sae.path={cfg.sae.get('path')}: {cli_errors.file_error(cause)}"
    return None


def run_jobs(members: list[Member], key: str | None = None) -> list[Any]:
    """What the members' Hydra jobs return (`run_members`), with the CLI's error policy: a user
    error (ConfigError, a full disk, an SAE file its loader cannot read) ends as one `error:`
    line and exit status 2; anything else is raised with its traceback. Called by `main` for its
    own job and by the fan-out launcher for each group (benchmark/fanout.py)."""
    try:
        return run_members(members, key)
    except (ConfigError, DiskFullError) as e:  # a user error: one line, exit 2, no traceback
        if cli_errors.debug():  # HYDRA_FULL_ERROR=1: the full traceback instead
            raise
        cli_errors.fail(str(e))
    except Exception as e:
        message = loader_error(members[0].cfg, e)
        if message is not None and not cli_errors.debug():
            cli_errors.fail(message)
        raise


def run_members(members: list[Member], key: str | None = None) -> list[Any]:
    """Each member's job return value (its delta_lm_loss; None for a member another process is
    running): the members' folders are claimed (`claim`, sorted order), the complete ones
    skipped, the others run together (`run_group`; `trained_in_group` is `key` when several
    run). A failure marks every unfinished member failed and is raised; a refused run (a
    ConfigError before it started) leaves no folder (`remove_unused`). Both under the locks."""
    with claim(members) as mine:
        values: dict[str, Any] = {}
        todo: list[Member] = []
        try:
            for m in mine:  # a finished run is skipped before anything else is checked
                done = check_folder(m.cfg, m.out)
                if done is not None:
                    values[str(m.out)] = done.get("delta_lm_loss")
                else:
                    check_writable(m.cfg)
                    preflight(m.cfg)
                    check_checkpoint(m)
                    todo.append(m)
            if todo:
                records = run_group(todo, key if len(todo) > 1 else None)
                for m, record in zip(todo, records, strict=True):
                    values[str(m.out)] = record.metrics["delta_lm_loss"]
        except ConfigError:
            for m in mine:  # refused before it started: leave no empty folder behind
                remove_unused(m.out)
            raise
        except DiskFullError:
            raise
        except Exception as e:
            for m in todo:
                record_failure(m.out, e, m.choices, m.cfg)
            raise
    return [values.get(str(m.out)) for m in members]


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One Hydra job, a group of one (`run_jobs`). A finished run is skipped before anything
    else is checked (it needs no device, hub or cache), then `check_writable` and `preflight`
    fail in seconds, before the SAE is built or the model loads. A user error ends as one
    `error:` line and exit status 2; a bug records a failed result.json and keeps its
    traceback. Ctrl-C is not caught here (`cli`): an interrupted run is neither failed nor
    finished, and the same command resumes it."""
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in identity.CHOICE_GROUPS}
    return run_jobs([Member(cfg, Path(hc.runtime.output_dir), choices)])[0]


def cli() -> None:
    """`python -m benchmark.run [overrides]`: the Hydra app, where Hydra's own user errors (a
    bad override, an unknown option, group or key, a run folder that cannot be created or
    written, a SLURM launcher without SLURM) end like the suite's: one `error: ...` line on
    stderr and exit status 2 (benchmark.cli_errors). Ctrl-C ends with one line saying how to
    resume and exit status 130 (no result is marked failed: the same command skips the
    finished runs and resumes the others). Bugs keep their traceback and status 1;
    HYDRA_FULL_ERROR=1 shows every traceback."""
    with cli_errors.on_interrupt(cli_errors.RESUME), cli_errors.one_line_errors():
        main()


if __name__ == "__main__":
    cli()
