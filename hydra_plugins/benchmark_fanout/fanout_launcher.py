"""The fan-out launcher as a Hydra plugin (conf/hydra/launcher/fanout.yaml names this class);
see benchmark/fanout.py."""

from benchmark.fanout import FanoutLauncher as _FanoutLauncher


class FanoutLauncher(_FanoutLauncher):
    """benchmark.fanout.FanoutLauncher, defined where Hydra's plugin discovery looks."""
