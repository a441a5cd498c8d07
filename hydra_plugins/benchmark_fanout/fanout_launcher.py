"""The fan-out launchers as Hydra plugins (conf/hydra/launcher/*fanout*.yaml name these
classes); see benchmark/fanout.py."""

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from benchmark import cli_errors
from benchmark.errors import ConfigError
from benchmark.fanout import FanoutLauncher as _FanoutLauncher
from benchmark.fanout import SubmititFanout


class FanoutLauncher(_FanoutLauncher):
    """benchmark.fanout.FanoutLauncher, defined where Hydra's plugin discovery looks."""


class SlurmFanoutLauncher(SubmititFanout, SlurmLauncher):
    """One SLURM array task per fan-out group (benchmark.fanout.SubmititFanout)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """Off a SLURM cluster (no srun or sbatch on PATH): one line (ConfigError, which
        benchmark.cli_errors prints as `error: ...`, status 2) before any job is composed,
        instead of submitit's RuntimeError after all of them."""
        why = cli_errors.no_slurm()
        if why is not None:
            raise ConfigError(cli_errors.slurm_missing(cli_errors.launcher_choice(), why))
        return super().launch(job_overrides, initial_job_idx)


class LocalFanoutLauncher(SubmititFanout, LocalLauncher):
    """The same through submitit's local executor: the SLURM code path on one machine."""
