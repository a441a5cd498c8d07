"""Fan-out: the jobs of a multirun that share an activation source run as one group.

    python -m benchmark.run -m +experiment=quickstart          # 9 jobs -> 1 group of 9 SAEs
    python -m benchmark.run -m site=residual,mlp,attention sae=jumprelu,topk
                                                               # 6 jobs -> 1 group, 1 harvest
    python -m benchmark.run -m hydra/launcher=basic ...        # no grouping: one job at a time

`FanoutLauncher` (conf/hydra/launcher/fanout.yaml, the default launcher in conf/config.yaml) is
Hydra's basic in-process launcher plus one step before it: it composes every job's config and
folder, and groups the jobs by `benchmark.identity.group_key` (same model, layer, data, seed,
batch size, token budget, evaluation config and cache; the SAE, its sparsity target, the site
and the rest of the recipe may differ). Hydra's `run_job` then runs the jobs in launch order
(their folders, .hydra/ and logs as usual), each with its group's task (`Group.value`): the
first job of a group hands the whole group to `benchmark.run.run_jobs`, which runs it and
returns each member's value; the others return theirs. The model loads once, one harvest pass
serves all sites, the SAEs train in lockstep on the same batches and the evaluation shares the
model's pass up to the hooked layer. Every SAE still writes its own folder and result.json as a
single run would (with `trained_in_group`: the group key); numbers are unchanged by grouping
(tests/test_fanout.py).

Resume: each SAE checkpoints in its own folder; a killed group, re-launched with the same
command, skips its finished SAEs and resumes the others. A failed group marks every unfinished
member failed (result.json with the traceback) and each of its jobs reports it. `run_jobs`
claims every member's folder (benchmark.runfolder.claim): a member another process is running
is skipped, so the same sweep launched twice computes each SAE once. Each member's log lines
also go to its own run.log (benchmark.runfolder.member_logs). Launchers that run jobs in other
processes (`hydra/launcher=local`: joblib; `slurm`) do not group: each job is a group of one.

Owns: the grouping and the hand-over of each group to `benchmark.run.run_jobs` (imported only
when a group runs: benchmark.plan imports `cut_groups`; benchmark.run does not import this
module). Must not know the trainer, the evaluator or any architecture.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, open_dict, read_write

from benchmark import identity

log = logging.getLogger("benchmark.fanout")
T = TypeVar("T")


@dataclass
class Group:
    """The jobs of one fan-out group, in launch order, and once run, what their jobs return."""

    key: str
    members: list[Any] = field(default_factory=list)  # benchmark.run.Member
    values: dict[str, Any] | None = None  # folder -> its job's return value, once run
    error: str | None = None  # the failure of its run

    def task(self, out: Path) -> Callable[[DictConfig], Any]:
        """The task function run_job runs for the group's job writing to `out`."""
        return lambda _cfg: self.value(out)

    def value(self, out: Path) -> Any:
        """The return value of the group's job writing to `out`: the first job to ask hands the
        whole group to `benchmark.run.run_jobs`; the others get what it returned, or its error."""
        if self.values is None and self.error is None:
            from benchmark.run import run_jobs  # the pipeline: loaded when a group runs

            try:
                results = run_jobs(self.members, self.key)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                raise
            self.values = {str(m.out): v for m, v in zip(self.members, results, strict=True)}
        if self.values is None:
            raise RuntimeError(f"its fan-out group {self.key[:8]} failed: {self.error}")
        return self.values[str(out)]


def cut_groups(
    items: Sequence[T], key_of: Callable[[T], str], site_of: Callable[[T], str], *,
    max_saes: int | None = None, split_sites: bool = False,
) -> list[tuple[str, list[T]]]:  # fmt: skip
    """(group key, items) in launch order: items with equal `key_of` (the group key) form a
    group; split_sites: one group per site too (e.g. when a cluster's GPU holds one site's
    SAEs); max_saes: larger groups are cut into consecutive chunks of at most max_saes. A
    split or cut group's key is a hash of the group key and the site or chunk start.
    Used by the launchers and by benchmark.plan, so the plan groups as the run does."""
    groups: dict[str, list[T]] = {}
    for item in items:
        key = key_of(item)
        if split_sites:
            key = identity.digest([key, site_of(item)])
        groups.setdefault(key, []).append(item)
    if not max_saes:
        return list(groups.items())
    return [
        (key if len(group) <= max_saes else identity.digest([key, i]), group[i : i + max_saes])
        for key, group in groups.items()
        for i in range(0, len(group), max_saes)
    ]


def plan_groups(jobs: Sequence[tuple[DictConfig, Path, dict[str, Any]]], *,
                max_saes: int | None = None, split_sites: bool = False) -> list[Group]:  # fmt: skip
    """(task config, folder, choices) jobs grouped by group key in launch order (`cut_groups`)."""
    from benchmark.run import Member

    keyed = [(identity.group_key(cfg), cfg, out, choices) for cfg, out, choices in jobs]
    parts = cut_groups(keyed, lambda j: j[0], lambda j: str(j[1].site.name),
                       max_saes=max_saes, split_sites=split_sites)  # fmt: skip
    return [Group(key, [Member(cfg, out, ch) for _, cfg, out, ch in part]) for key, part in parts]


@dataclass
class SweepJob:
    """One job of a multirun, composed: its Hydra config (run by run_job), its task config
    (what the task function sees), its folder and its choices."""

    sweep: DictConfig
    task: DictConfig
    out: Path
    choices: dict[str, Any]
    overrides: list[str]


def compose_job(
    hydra_context: Any, config: DictConfig, overrides: Sequence[str], idx: int,
    job_id: Any = None,
) -> SweepJob:  # fmt: skip
    """A job composed once, as Hydra's launchers do: the same config is later run by run_job.
    hydra.job.id is `job_id` (a submitit task's id), else the job's number."""
    sweep = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep):
        sweep.hydra.job.id = idx if job_id is None else job_id
        sweep.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep)  # the folder name reads ${hydra:...}
    out = Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
    choices = {g: sweep.hydra.runtime.choices.get(g) for g in identity.CHOICE_GROUPS}
    task = copy.deepcopy(sweep)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return SweepJob(sweep, task, Path(os.path.abspath(out)), choices, list(overrides))


def run_grouped(hydra_context: Any, jobs: Sequence[SweepJob], *, max_saes: int | None = None,
                split_sites: bool = False) -> list[JobReturn]:  # fmt: skip
    """Group the jobs, then run each job through Hydra's run_job in launch order, its task its
    group's `Group.value` (the first job of a group runs the whole group)."""
    groups = plan_groups([(j.task, j.out, j.choices) for j in jobs], max_saes=max_saes,
                         split_sites=split_sites)  # fmt: skip
    for g in groups:
        if len(g.members) > 1:
            log.info("fan-out group %s: %d SAEs (%s)", g.key[:8], len(g.members),
                     ", ".join(m.out.name for m in g.members))  # fmt: skip
    group_of = {str(m.out): g for g in groups for m in g.members}
    returns = []
    for job in jobs:
        # The launcher's own logging again (console): the previous job's file log (its run.log)
        # would otherwise also get this job's launch line.
        configure_log(job.sweep.hydra.hydra_logging, job.sweep.hydra.verbose)
        log.info("\t#%s : %s", job.sweep.hydra.job.num, " ".join(filter_overrides(job.overrides)))
        returns.append(run_job(hydra_context=hydra_context, config=job.sweep,
                               task_function=group_of[str(job.out)].task(job.out),
                               job_dir_key="hydra.sweep.dir",
                               job_subdir_key="hydra.sweep.subdir"))  # fmt: skip
    return returns


class FanoutLauncher(BasicLauncher):
    """The basic launcher, with the jobs grouped first (module docstring)."""

    def __init__(
        self, group: bool = True, max_saes: int | None = None, split_sites: bool = False
    ) -> None:
        super().__init__()
        self.group, self.max_saes, self.split_sites = group, max_saes, split_sites

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        if not self.group:
            return super().launch(job_overrides, initial_job_idx)
        assert self.hydra_context is not None and self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally", len(job_overrides))
        jobs = [compose_job(self.hydra_context, self.config, o, initial_job_idx + i)
                for i, o in enumerate(job_overrides)]  # fmt: skip
        return run_grouped(self.hydra_context, jobs, max_saes=self.max_saes,
                           split_sites=self.split_sites)  # fmt: skip


class SubmititFanout:
    """For hydra-submitit's launchers (SLURM, or submitit's local executor): one submitit task
    per fan-out group instead of one per job. The task composes its members and runs their
    Hydra jobs in order in one process (`run_grouped`), so the first runs the whole group
    (benchmark.run.run_jobs) and the others return its results. Requeue after a time-out
    or preemption re-runs the task: finished members are skipped, the others resume from their
    checkpoints. Combine with a submitit launcher class (hydra_plugins/benchmark_fanout)."""

    hydra_context: Any
    config: Any
    task_function: Any

    def __init__(self, max_saes: int | None = None, split_sites: bool = False,
                 **params: Any) -> None:  # fmt: skip
        super().__init__(**params)  # type: ignore[call-arg]
        self.max_saes, self.split_sites = max_saes, split_sites
        self.fanout_jobs: dict[tuple[str, ...], list[tuple[int, list[str]]]] = {}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        jobs = [compose_job(self.hydra_context, self.config, o, initial_job_idx + i)
                for i, o in enumerate(job_overrides)]  # fmt: skip
        by_out = {str(j.out): (int(j.sweep.hydra.job.num), j.overrides) for j in jobs}
        groups = plan_groups([(j.task, j.out, j.choices) for j in jobs], max_saes=self.max_saes,
                             split_sites=self.split_sites)  # fmt: skip
        self.fanout_jobs = {}
        firsts = []
        for g in groups:
            members = [by_out[str(m.out)] for m in g.members]
            self.fanout_jobs[tuple(members[0][1])] = members
            firsts.append(members[0][1])
        log.info("fan-out: %d jobs in %d submitit tasks", len(jobs), len(firsts))
        per_task = super().launch(firsts, initial_job_idx)  # type: ignore[misc]
        return [r for returns in per_task for r in returns]

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[Any, Any]) -> list[JobReturn]:  # fmt: skip
        """One submitit task: the group whose first job has `sweep_overrides`."""
        import submitit
        from hydra.core.singleton import Singleton

        Singleton.set_state(singleton_state)
        setup_globals()
        task_id = submitit.JobEnvironment().job_id
        jobs = [compose_job(self.hydra_context, self.config, o, i, task_id)
                for i, o in self.fanout_jobs[tuple(sweep_overrides)]]  # fmt: skip
        return run_grouped(self.hydra_context, jobs)
