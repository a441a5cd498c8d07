"""The sweep as the run launches it: every job composed and checked, its folder and whether it
is complete, and the fan-out groups the configured launcher cuts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark import identity
from benchmark.compose import CONF_DIR
from benchmark.fanout import cut_groups
from benchmark.validate import check_run, dictionary_size, evaluate_only, site_width


@dataclass
class Job:
    overrides: list[str]
    sae: str  # the sae choice (a file in conf/sae)
    sparsity: str
    site: str
    layer: int
    d_in: int
    d_sae: int | None  # None: evaluate-only (train=none), the size is the file's
    batch_size: int
    train_tokens: int  # train.n_tokens (0: evaluate-only)
    target_l0: float | None
    stream: bool
    group: str  # benchmark.identity.group_key
    run_dir: str
    done: bool  # run_dir holds a complete result.json: benchmark.run skips it
    cfg: DictConfig = field(repr=False)


@dataclass
class Sweep:
    multirun: bool
    jobs: list[Job]
    launcher: str  # the hydra/launcher choice
    grouped: bool  # the launcher runs fan-out groups (benchmark/fanout.py)
    in_process: bool  # one process runs every job (basic, fanout); else a process per task
    max_saes: int | None = None  # the fan-out launcher's cap on a group
    split_sites: bool = False  # the fan-out launcher's one-site-per-group
    timeout_min: float | None = None  # the launcher's time limit per task (slurm)
    max_num_timeout: int = 0  # requeues after a time-out (slurm)


def is_multirun(mode: Any) -> bool:
    return str(mode).rsplit(".", 1)[-1] == "MULTIRUN"


def expand(overrides: Sequence[str], multirun: bool) -> tuple[bool, list[list[str]], DictConfig]:
    """(multirun?, each job's overrides, the sweep's config), as `python -m benchmark.run`
    launches them. Call inside `initialize_config_dir`.

    Hydra's multirun composes the sweep's config without the sweep overrides and reads
    `hydra.mode` and `hydra.sweeper.params` from it; the basic sweeper then takes the
    cartesian product of those params followed by the task overrides (the non-`hydra`
    overrides: the same key replaces the preset's sweep); each job is composed from the
    `hydra` overrides plus its own list.
    """
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    plain = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
    master = compose("config", overrides=plain, return_hydra_config=True)
    if not (multirun or is_multirun(master.hydra.get("mode"))):
        return False, [list(overrides)], master  # a sweep fails in compose, as in the run
    for o in parsed:
        if o.is_hydra_override() and o.is_sweep_override():
            raise ConfigCompositionException(
                f"Sweeping over Hydra's configuration is not supported : '{o.input_line}'"
            )
    hydra_overrides = [str(o.input_line) for o in parsed if o.is_hydra_override()]
    task = [str(o.input_line) for o in parsed if not o.is_hydra_override()]
    params = master.hydra.sweeper.get("params") or {}
    params_conf = [f"{k}={v}" for k, v in params.items()] + task
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params_conf), None)
    return True, [hydra_overrides + job for job in batches[0]], master


def compose_jobs(overrides: Sequence[str], multirun: bool = False) -> Sweep:
    """Every job of the command, composed and checked as the run checks it up front."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        is_multi, job_overrides, master = expand(overrides, multirun)
        jobs = [compose_job(ov, is_multi) for ov in job_overrides]
        return launcher_sweep(master, is_multi, jobs)


def launcher_sweep(master: DictConfig, is_multi: bool, jobs: list[Job]) -> Sweep:
    """The sweep as the configured launcher runs it.

    benchmark.fanout: the fan-out launchers (fanout in-process; slurm_fanout and
    slurm_local_fanout, one submitit task per group) group a multirun's jobs, cut by
    split_sites and max_saes; a single run is a group of one; basic, local and slurm never
    group. basic and fanout run every job in this one process."""
    launcher = str(master.hydra.runtime.choices.get("hydra/launcher") or "basic")
    lc = master.hydra.launcher
    fanout_capable = "max_saes" in lc or "split_sites" in lc
    target = str(lc.get("_target_", "")).rsplit(".", 1)[-1]
    timeout = lc.get("timeout_min")
    max_saes = lc.get("max_saes") if fanout_capable else None
    return Sweep(
        multirun=is_multi, jobs=jobs, launcher=launcher,
        grouped=is_multi and fanout_capable and bool(lc.get("group", True)),
        in_process=target in ("BasicLauncher", "FanoutLauncher"),
        max_saes=int(max_saes) if max_saes else None,
        split_sites=bool(lc.get("split_sites", False)) if fanout_capable else False,
        timeout_min=float(timeout) if timeout else None,
        max_num_timeout=int(lc.get("max_num_timeout") or 0),
    )  # fmt: skip


def compose_job(ov: list[str], is_multi: bool) -> Job:
    """One job: its config composed from `ov` (inside `initialize_config_dir`) and checked."""
    from hydra import compose

    from benchmark.train import TrainConfig

    cfg = compose("config", overrides=ov, return_hydra_config=True)
    sae = str(cfg.hydra.runtime.choices.get("sae") or "")
    run_dir = hydra_run_dir(cfg, is_multi)
    with open_dict(cfg):
        del cfg["hydra"]
    check_run(cfg)
    sae = sae or str(cfg.sae._target_).rsplit(".", 1)[-1]
    d_in = site_width(cfg)
    d_sae: int | None = None
    batch = tokens = 0
    if not evaluate_only(cfg):
        tc = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
        d_sae, batch, tokens = dictionary_size(cfg, d_in), tc.batch_size, tc.n_tokens
    return Job(
        overrides=list(ov), sae=sae, sparsity=identity.sparsity_label(cfg),
        site=str(cfg.site.name), layer=int(cfg.layer.index), d_in=d_in, d_sae=d_sae,
        batch_size=batch, train_tokens=tokens,
        target_l0=cfg.sparsity.get("target_l0"), stream=bool(cfg.data.get("stream")),
        group=identity.group_key(cfg), run_dir=str(run_dir),
        done=is_complete(run_dir) and not cfg.get("rerun", False), cfg=cfg,
    )  # fmt: skip


def hydra_run_dir(cfg: DictConfig, multirun: bool) -> Path:
    """The job's folder as Hydra names it (hydra.sweep.dir/subdir or hydra.run.dir)."""
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    before = holder.cfg
    holder.set_config(cfg)  # for ${hydra:runtime.choices.sae} in the folder's name
    try:
        h = cfg.hydra
        return Path(str(h.sweep.dir), str(h.sweep.subdir)) if multirun else Path(str(h.run.dir))
    finally:
        holder.cfg = before


def is_complete(run_dir: Path) -> bool:
    """`run_dir` holds a result.json whose status is complete."""
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def groups_of(
    jobs: Sequence[Job], grouped: bool = True, max_saes: int | None = None,
    split_sites: bool = False,
) -> list[list[Job]]:  # fmt: skip
    """Fan-out groups in launch order, cut as the launchers cut them
    (`benchmark.fanout.cut_groups`; grouped=False: every job alone)."""
    if not grouped:
        return [[j] for j in jobs]
    parts = cut_groups(jobs, lambda j: j.group, lambda j: j.site, max_saes=max_saes,
                       split_sites=split_sites)  # fmt: skip
    return [part for _, part in parts]
