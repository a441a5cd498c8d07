"""Sweep progress: a Hydra callback that prints which job started, and when each ends, its
status and wall time; at the end of a multirun, one line per job from the result files.

Owns nothing but that display (the per-stage lines come from benchmark.run). Works with every
launcher: job callbacks run where the job runs (in-process, joblib workers, SLURM nodes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _job_num(config: DictConfig) -> int:
    """The job's number in a multirun; a single run has none (hydra.job.num is ???): 0."""
    return int(OmegaConf.select(config, "hydra.job.num", default=0, throw_on_missing=False))


class SweepProgress(Callback):
    def __init__(self) -> None:
        self._t0: dict[int, float] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        num = _job_num(config)
        self._t0[num] = time.perf_counter()
        name = Path(config.hydra.runtime.output_dir).name
        print(f"[sweep] job {num} {name}: started", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        num = _job_num(config)
        seconds = time.perf_counter() - self._t0.pop(num, time.perf_counter())
        name = Path(config.hydra.runtime.output_dir).name
        status = getattr(job_return.status, "name", str(job_return.status)).lower()
        print(f"[sweep] job {num} {name}: {status} in {seconds:.0f}s", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        print(f"[sweep] finished: {root}", flush=True)
        for path in sorted(root.glob("*/result.json")):
            try:
                r = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                print(f"  {path.parent.name}: unreadable result.json")
                continue
            if r.get("status") != "complete":
                print(f"  {path.parent.name}: {r.get('status')} ({r.get('error')})")
                continue
            print(
                f"  {path.parent.name}: l0={r['l0']:.1f} fvu={r['fvu']:.4f} "
                f"delta_lm_loss={r['delta_lm_loss']:.4f} frac_dead={r['frac_dead']:.4f} "
                f"wall={r.get('wall_seconds', 0):.0f}s"
            )
