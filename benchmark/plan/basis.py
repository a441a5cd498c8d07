"""What every part of the plan starts from: the command line's options, and the composed sweep
with its device, dtype, model shape and fan-out groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from benchmark.plan.jobs import Job, Sweep, groups_of
from benchmark.plan.model import ModelShape, resolve


@dataclass
class Options:
    multirun: bool = False
    json: str | None = None
    tflops: float | None = None
    sae_tflops: float | None = None
    efficiency: float | None = None
    disk_budget: float | None = None
    device_memory: float | None = None
    timing: bool = True


@dataclass
class Basis:
    """The sweep and what its first job's config says about the machine and the model."""

    sweep: Sweep
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    nbytes: int  # bytes per value of the model's dtype
    model: ModelShape
    # Fan-out groups as the configured fan-out launcher cuts them (split_sites, max_saes); for
    # another launcher, as hydra/launcher=fanout (or slurm_fanout) would by default.
    groups: list[list[Job]]

    @classmethod
    def of(cls, sweep: Sweep) -> Basis:
        import torch

        cfg0 = sweep.jobs[0].cfg
        device, dtype = resolve(str(cfg0.device), str(cfg0.model.dtype))
        return cls(
            sweep=sweep, device=device, dtype=dtype,
            nbytes=torch.empty(0, dtype=dtype).element_size(),
            model=ModelShape.from_config(cfg0.model),
            groups=groups_of(sweep.jobs, True, sweep.max_saes, sweep.split_sites),
        )  # fmt: skip

    @property
    def jobs(self) -> list[Job]:
        return self.sweep.jobs

    @property
    def todo(self) -> list[Job]:
        """The jobs still to run (not complete in results_dir)."""
        return [j for j in self.jobs if not j.done]

    @property
    def cfg0(self) -> DictConfig:
        return self.jobs[0].cfg

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
