"""Fan-out: the jobs of a multirun that share an activation source run as one group.

    python -m benchmark.run -m +experiment=quickstart          # 9 jobs -> 1 group of 9 SAEs
    python -m benchmark.run -m site=residual,mlp,attention sae=jumprelu,topk
                                                               # 6 jobs -> 1 group, 1 harvest
    python -m benchmark.run -m hydra/launcher=basic ...        # no grouping: one job at a time

`FanoutLauncher` (conf/hydra/launcher/fanout.yaml, the default launcher in conf/config.yaml) is
Hydra's basic in-process launcher plus one step before it: it composes every job's config and
folder, and groups the jobs by `benchmark.identity.group_key` (same model, layer, data, seed,
batch size, token budget, evaluation config and cache; the SAE, its sparsity target, the site
and the rest of the recipe may differ). Hydra then runs the jobs in order as usual; the first
job of a group runs the whole group (`benchmark.run.run_group`): the model loads once, one
harvest pass serves all sites, the SAEs train in lockstep on the same batches and the
evaluation shares the model's pass up to the hooked layer. Every SAE still writes its own
folder and result.json exactly as a single run would (with `trained_in_group`: the group key);
the group's other jobs then return the results already computed. Numbers are unchanged by
grouping (tests/test_fanout.py: same weights and metrics as separate runs).

Resume: each SAE checkpoints in its own folder; a killed group, re-launched with the same
command, skips its finished SAEs and resumes the others from their checkpoints. A group whose
run fails marks every unfinished member failed (result.json with the traceback).

Launchers that run jobs in other processes (`hydra/launcher=local`: joblib; `slurm`) do not
group: each job is a group of one.

Owns: the grouping and the hand-over from Hydra's jobs to `run_group`. Must not know the
trainer, the evaluator or any architecture.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, open_dict, read_write

from benchmark import identity

log = logging.getLogger("benchmark.fanout")
CHOICE_GROUPS = ("model", "layer", "site", "sae", "sparsity", "data", "train", "eval")


@dataclass
class Group:
    """The jobs of one fan-out group, in launch order, and what became of them."""

    key: str
    members: list[Any] = field(default_factory=list)  # benchmark.run.Member
    ran: bool = False
    values: dict[str, Any] = field(default_factory=dict)  # folder -> the job's return value
    error: str | None = None


_GROUPS: dict[str, Group] = {}  # absolute job folder -> its group (groups of 2 or more)


def group_for(out: str | Path) -> Group | None:
    """The fan-out group the job writing to `out` belongs to, or None (it runs alone)."""
    return _GROUPS.get(os.path.abspath(out))


def plan_groups(jobs: Sequence[tuple[DictConfig, Path, dict[str, Any]]]) -> list[Group]:
    """Group (task config, folder, choices) jobs by group key, keeping launch order."""
    from benchmark.run import Member

    groups: dict[str, Group] = {}
    for cfg, out, choices in jobs:
        key = identity.group_key(cfg)
        groups.setdefault(key, Group(key)).members.append(Member(cfg, out, choices))
    return list(groups.values())


class FanoutLauncher(BasicLauncher):
    """The basic launcher, with the jobs grouped first (module docstring)."""

    def __init__(self, group: bool = True) -> None:
        super().__init__()
        self.group = group

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        _GROUPS.clear()
        if self.group:
            for g in plan_groups([self._job(o, initial_job_idx + i)
                                  for i, o in enumerate(job_overrides)]):  # fmt: skip
                if len(g.members) > 1:
                    log.info("fan-out group %s: %d SAEs (%s)", g.key[:8], len(g.members),
                             ", ".join(m.out.name for m in g.members))  # fmt: skip
                    for m in g.members:
                        _GROUPS[os.path.abspath(m.out)] = g
        return super().launch(job_overrides, initial_job_idx)

    def _job(self, overrides: Sequence[str], idx: int) -> tuple[DictConfig, Path, dict[str, Any]]:
        """A job's task config, folder and choices, composed as Hydra's run_job will."""
        assert self.hydra_context is not None and self.config is not None
        sweep = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep):
            sweep.hydra.job.id = idx
            sweep.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep)  # the folder name reads ${hydra:...}
        out = Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
        choices = {g: sweep.hydra.runtime.choices.get(g) for g in CHOICE_GROUPS}
        task = copy.deepcopy(sweep)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return task, Path(os.path.abspath(out)), choices
