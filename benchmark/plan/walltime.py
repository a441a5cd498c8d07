"""The wall time by part, per unit (a job alone, or a fan-out group), summed over one device,
and the longest single unit (the wall time with a device for each)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from benchmark.plan.assumptions import (
    CONVERT_SECONDS,
    JOB_SECONDS,
    LM_EVAL_FACTOR,
    STARTUP_SECONDS,
    TOKENIZE_SECONDS,
)
from benchmark.plan.basis import Basis
from benchmark.plan.costs import ModelWork
from benchmark.plan.throughput import Throughput

MODES = ("independent", "fanout")  # jobs one at a time; fan-out groups


def model_converted(cfg: DictConfig) -> bool:
    """False only for the bundled model with no converted copy under cache_dir/models."""
    if cfg.model.get("source") != "bundled":
        return True
    folder = Path(str(cfg.cache_dir)) / "models"
    return any((d / "checksums.json").is_file() for d in folder.glob("*") if d.is_dir())


def part_names(converted: bool) -> tuple[str, ...]:
    return (
        "start-up (imports, model boot" + ("" if converted else ", conversion") + ")",
        "harvest / stream (model forward)",
        "data windows (tokenizer)",
        "SAE training",
        "held-out activation metrics (SAE forward)",
        "LM-set evaluation (model forward)",
        "per-job overhead",
    )


@dataclass
class WallTime:
    converted: bool  # the model needs no conversion
    grouped: bool  # the configured launcher runs fan-out groups
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: by mode
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, math.nan))
    longest: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, math.nan))

    @property
    def as_configured(self) -> float:
        return self.wall["fanout" if self.grouped else "independent"]

    @property
    def longest_configured(self) -> float:
        return self.longest["fanout" if self.grouped else "independent"]


@dataclass
class UnitClock:
    """Seconds of one unit's parts (start-up: only when the unit is a process of its own)."""

    th: Throughput
    startup: float
    in_process: bool
    lm_factor: float
    n_act: int  # eval.n_activation_tokens
    n_parts: int

    def seconds(self, w: ModelWork) -> list[float]:
        th = self.th
        if not w.jobs:
            return [0.0] * self.n_parts
        return [
            0.0 if self.in_process else self.startup,
            w.harvest / th.model_rate,
            w.tokens_windowed * TOKENIZE_SECONDS / 1e6,
            sum(th.sae_seconds(j, j.train_tokens) for j in w.jobs),
            sum(th.sae_seconds(j, self.n_act) for j in w.jobs) / 3,  # forward: ~1/3 of a step
            w.lm_eval * self.lm_factor / th.model_rate,
            JOB_SECONDS * len(w.jobs),
        ]


def wall_time(b: Basis, work: dict[str, list[ModelWork]], th: Throughput) -> WallTime:
    """Per unit of each mode (`work`: MODES -> units), then summed; nan where a rate is
    unknown (a device not here without --tflops)."""
    converted = model_converted(b.cfg0)
    out = WallTime(converted=converted, grouped=b.sweep.grouped)
    if not (math.isfinite(th.model_rate) and (math.isfinite(th.sae_rate) or not th.untimed)):
        return out
    names = part_names(converted)
    startup = STARTUP_SECONDS + (0.0 if converted else CONVERT_SECONDS)
    clock = UnitClock(
        th=th, startup=startup, in_process=b.sweep.in_process,
        lm_factor=LM_EVAL_FACTOR.get(b.device.type, 1.2),
        n_act=int(b.cfg0.eval.n_activation_tokens), n_parts=len(names),
    )  # fmt: skip
    per = {k: [clock.seconds(w) for w in work[k]] for k in MODES}
    once = startup if b.sweep.in_process and b.todo else 0.0
    cols = {k: column_sums(v, len(names)) for k, v in per.items()}
    for k in cols:
        cols[k][0] += once
        out.wall[k] = sum(cols[k])
        out.longest[k] = max((sum(u) for u in per[k]), default=0.0) + once
    out.parts = {n: (cols["independent"][i], cols["fanout"][i]) for i, n in enumerate(names)}
    return out


def column_sums(units: Sequence[Sequence[float]], n: int) -> list[float]:
    return [sum(u[i] for u in units) for i in range(n)]
