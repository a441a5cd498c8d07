"""The fan-out launchers as Hydra plugins (conf/hydra/launcher/*fanout*.yaml name these
classes); see benchmark/fanout.py."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from benchmark.fanout import FanoutLauncher as _FanoutLauncher
from benchmark.fanout import SubmititFanout


class FanoutLauncher(_FanoutLauncher):
    """benchmark.fanout.FanoutLauncher, defined where Hydra's plugin discovery looks."""


class SlurmFanoutLauncher(SubmititFanout, SlurmLauncher):
    """One SLURM array task per fan-out group (benchmark.fanout.SubmititFanout)."""


class LocalFanoutLauncher(SubmititFanout, LocalLauncher):
    """The same through submitit's local executor: the SLURM code path on one machine."""
