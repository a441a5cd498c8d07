"""Hydra finds launchers only in the `hydra_plugins` namespace package: this registers the
suite's fan-out launcher there (the code lives in benchmark/fanout.py)."""
