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

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmark import cli_errors, identity, models
from benchmark.errors import ConfigError
from benchmark.fileio import DiskFullError, save_npy_atomic
from benchmark.hub import check_sources
from benchmark.metrics import METRICS_VERSION, definitions
from benchmark.results import ResultRecord, provenance, write_result
from benchmark.runchecks import (
    check_checkpoint,
    check_folder,
    check_writable,
    loader_error,
    preflight,
    record_failure,
)
from benchmark.runfolder import claim, member_logs, remove_unused
from benchmark.saes import build_sae, load_sae, sae_node
from benchmark.specs import EvalSpec, SourceSpec, plain
from benchmark.stages import (
    Clock,
    LazyModel,
    Plan,
    Trained,
    Unit,
    activation_stage,
    after_result,
    evaluate_stage,
    held_out_stores,
    norm_filter,
    stage,
    train_stage,
)
from benchmark.train import Sparsity, TrainConfig
from benchmark.validate import check_run, dictionary_size, evaluate_only, site_width
from interop.foreign import source_of, suite_node

log = logging.getLogger("benchmark.run")


def plan_run(cfg: DictConfig) -> Plan:
    check_run(cfg)
    d_in = site_width(cfg)
    hashes = identity.config_hash(cfg), identity.curve_hash(cfg)
    if evaluate_only(cfg):  # a released or foreign SAE: sizes and sparsity come from its file
        sae = build_sae(plain(cfg.sae), d_in, d_sae=None)
        return Plan(None, None, sae, dict(suite_node(sae)), d_in, sae.d_sae, *hashes)
    train_cfg = TrainConfig.from_dict(plain(cfg.train))
    sparsity = Sparsity(cfg.sparsity.mode, cfg.sparsity.get("target_l0"))
    d_sae = dictionary_size(cfg, d_in)
    # The seed is set right before the SAE is built, so its initial weights do not depend on
    # whether this run harvested (or on anything else that draws random numbers first).
    torch.manual_seed(int(cfg.seed))
    node = sae_node(plain(cfg.sae), d_in, d_sae)
    sae = build_sae(node, d_in, d_sae)
    return Plan(train_cfg, sparsity, sae, node, d_in, d_sae, *hashes)


@dataclass
class Member:
    """One job of a run: its config, its folder and its Hydra choices. A single run is a group
    of one; a fan-out group (benchmark/fanout.py) has several, sharing model, layer, data,
    batch stream and evaluation config (benchmark.identity.group_key)."""

    cfg: DictConfig
    out: Path
    choices: dict[str, Any]

    @functools.cached_property
    def source(self) -> SourceSpec:
        """Where its activations come from (model, layer, site, data, device, cache)."""
        return SourceSpec.of(self.cfg)

    def unit(self, plan: Plan) -> Unit:
        """The member as the stages see it (benchmark/stages.py)."""
        return Unit(self.out, plan, self.source.site, bool(self.cfg.get("rerun", False)),
                    lambda: start_logger(self))  # fmt: skip


def start_logger(m: Member) -> Any:
    """The member's logger (conf/logger/, from the composed config), started for its run."""
    logger = instantiate(m.cfg.logger)
    logger.start(OmegaConf.to_container(m.cfg, resolve=True), m.out.name, str(m.out))
    return logger


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
    lead, source = members[0], members[0].source
    ev = EvalSpec.of(lead.cfg.eval)
    device = models.resolve_device(source.device)
    for m in members:
        m.out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(m.cfg, m.out / "config.yaml", resolve=True)
    model = LazyModel(source.model, device, source.cache_dir)
    clock = Clock()
    # The hook is checked against the loaded model's hook names on every run (a cache hit
    # too); the model is needed for the spliced evaluation anyway.
    bridge = model()
    hooks = [models.hook_name(m.source.model, m.source.layer, m.source.site, bridge=bridge)
             for m in members]  # fmt: skip
    for plan in plans:
        plan.sae.to(device)
    clock.lap("setup")
    sites = list({m.source.site.name: m.source.site for m in members}.values())
    held_out = held_out_stores(model, source, sites, ev.n_activation_tokens)
    clock.lap("harvest")  # the held-out set; the training split's harvest is timed below
    units = [m.unit(plan) for m, plan in zip(members, plans, strict=True)]
    trained = train_stage(units, source, int(lead.cfg.seed), model, group)
    clock.split("harvest", "train",
                [t.result.seconds for t in trained if t.result is not None and not t.loaded])  # fmt: skip

    stage("evaluate", lead.out)
    act: list[Any] = [None] * len(members)
    by_site: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_site.setdefault(m.source.site.name, []).append(i)
    for site, idx in by_site.items():  # one pass over each site's held-out set for its SAEs
        eval_store = held_out[site]
        outs = activation_stage(ev, [plans[i].sae for i in idx], eval_store, device,
                                source.progress)  # fmt: skip
        for i, (act_metrics, freq) in zip(idx, outs, strict=True):
            save_npy_atomic(members[i].out / "firing_frequency.npy", freq.numpy())
            act[i] = (eval_store, act_metrics)
    clock.lap("activation_metrics")
    max_norms = {h: held_out[m.source.site.name].max_norm
                 for m, h in zip(members, hooks, strict=True)}  # fmt: skip
    lm_windows: list[torch.Tensor] = []
    lm = evaluate_stage(source, ev, [(p.sae, h) for p, h in zip(plans, hooks, strict=True)],
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
        record.norm_filter = norm_filter(m.source.data.max_norm_multiple, t.store, eval_store)
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
        after_result(m.out, t.logger, r)
        records.append(record)
    return records


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


def reevaluate(run_dir: str | Path, device: str = "auto") -> dict[str, float | None]:
    """Reload a finished run's SAE and config and evaluate it again (same metrics, exactly)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)
    source, ev = SourceSpec.of(cfg), EvalSpec.of(cfg.eval)
    dev = models.resolve_device(device)
    sae = load_sae(run_dir, dev)
    hook = models.hook_name(source.model, source.layer, source.site)
    lm = models.load_model(source.model, dev, source.cache_dir)
    store = held_out_stores(lm, source, [source.site], ev.n_activation_tokens)[source.site.name]
    ((act_metrics, _),) = activation_stage(ev, [sae], store, dev, source.progress)
    lm_metrics = evaluate_stage(source, ev, [(sae, hook)], lm, dev, {hook: store.max_norm})[0]
    return {**act_metrics, **lm_metrics}


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
                    check_checkpoint(m.cfg, m.out)
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
