"""The training recipe as data: `TrainConfig` (checked when it is built), the sparsity mode
(`Sparsity`), the lr and coefficient schedules, the matmul precision, the loss-spike watch, and
what a training returns (`TrainState`, `TrainResult`, `write_history`).

Owns the numbers of a recipe and their checks; `benchmark.train` (the trainer) uses them and
re-exports the public names. Must not know: models, data, Hydra, any architecture by name.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write

# Keys of a train config that are read by others, not by the trainer: the run's recipe name and
# the dictionary size (benchmark.validate.dictionary_size). Any other key that is not a
# TrainConfig field is a typo and fails in `TrainConfig.from_dict`. (An architecture's own
# values belong to its SAE config, and a recipe's to conf/recipe/<train>_<sae>.yaml.)
NON_TRAINER_KEYS: tuple[str, ...] = ("name", "width", "width_factor")


# train.precision: the SAE's matmul precision. fp32: plain float32. tf32: float32 with TF32
# tensor-core matmuls (CUDA only). bf16: forward and loss under torch.autocast(bfloat16) (CUDA
# only); parameters, thresholds, gradients and Adam state stay float32 and the loss is float32.
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def check_precision_device(precision: str, device_type: str) -> None:
    """ConfigError if train.precision asks for CUDA matmuls on another device (on a CPU, bf16
    matmuls are extremely slow and TF32 does not exist)."""
    if precision in PRECISIONS and precision != "fp32" and device_type != "cuda":
        raise ConfigError(
            f"train.precision={precision} needs CUDA, but the SAE trains on {device_type}; "
            "use train.precision=fp32 there (bf16 matmuls are extremely slow on a CPU)"
        )


@contextmanager
def _tf32() -> Iterator[None]:
    """TF32 tensor-core matmuls and convolutions inside the block; the flags are restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_precision(
    precision: str, device_type: str, *, backward: bool = False
) -> AbstractContextManager[Any]:
    """The context of train.precision for the SAE's forward and loss (backward=False) or its
    backward pass: fp32 none; tf32 the TF32 flags for both; bf16 autocast for the forward and
    loss only (autocast's backward runs each op in its forward's dtype by itself)."""
    if precision == "tf32":
        return _tf32()
    if precision == "bf16" and not backward:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


# A loss spike: one batch's FVU more than SPIKE_JUMP x the EMA (decay 0.9) of the batch FVUs
# before it, at a step after the lr warm-up. A step that throws the SAE off its solution (Adam
# with the paper's beta1 = 0 at a large lr) shows as a jump of orders of magnitude, while
# healthy batches vary by up to ~3x (a batch holding a few high-norm tokens). Measured on the
# quickstart's layer 6 residual, L0 40, seed 1: JumpReLU at lr 4e-3 jumped 1203x at step 188
# and ended 95% dead; JumpReLU at 2e-3 and Gated at 4e-3 (healthy) 2.8x, TopK 1.7x. Training
# goes on; the record, the tuning protocol (scripts/tune_cpu_recipe.py) and the report's
# problems.csv flag it.
SPIKE_JUMP = 10.0


def spike_watch(state: TrainState, fvu: float, step: int, warmup_steps: int) -> None:
    """Update the state's loss-spike watch with this step's batch FVU."""
    if not math.isfinite(fvu):
        return
    if step >= warmup_steps and math.isfinite(state.fvu_ema) and state.fvu_ema > 0:
        jump = fvu / state.fvu_ema
        state.max_fvu_jump = max(state.max_fvu_jump, jump)
        if jump > SPIKE_JUMP and state.spike_step < 0:
            state.spike_step = step
    state.fvu_ema = fvu if math.isnan(state.fvu_ema) else 0.9 * state.fvu_ema + 0.1 * fvu


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter; the last good checkpoint (if any) is left
    untouched."""


def _real(key: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False,
          open_high: bool = False) -> float:  # fmt: skip
    """`value` as a float if it is a finite real number in the interval, else a ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
    if not ok:
        op = ">" if open_low else ">="
        want = (
            f"a finite number {op} {low:g}"
            if high == math.inf
            else f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        )
        raise ConfigError(f"train.{key} must be {want}, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"train.{key} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """The recipe. Field docs live in conf/train/*.yaml, which mirror these names."""

    n_tokens: int
    batch_size: int = 4096
    lr: float = 7e-5
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 1000
    lr_warmup_start: float = 0.1
    lr_decay: str = "none"
    lr_decay_frac: float = 0.2
    coefficient_warmup_steps: int = 10_000
    grad_clip: float | None = None
    dead_window_tokens: int = 10_000_000
    dead_window_frac: float | None = None
    calibration_frac: float = 0.25
    calibration_gain: float = 0.02
    calibration_anneal: bool = False
    checkpoint_every: int = 0
    log_every: int = 100
    param_lr_scale: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        """Types and ranges; each failure names its train.<key> and the value."""
        self.batch_size = _integer("batch_size", self.batch_size, 1)
        self.n_tokens = _integer("n_tokens", self.n_tokens, 1)
        if self.n_tokens < self.batch_size:
            raise ConfigError(
                f"train.n_tokens={self.n_tokens} is less than one batch "
                f"(train.batch_size={self.batch_size})"
            )
        self.lr = _real("lr", self.lr, 0, open_low=True)
        betas = self.adam_betas  # a list from YAML (or a ListConfig)
        if isinstance(betas, str) or not (isinstance(betas, Sequence) and len(betas) == 2):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = (
            _real("adam_betas[0]", betas[0], 0, 1, open_high=True),
            _real("adam_betas[1]", betas[1], 0, 1, open_high=True),
        )
        self.adam_eps = _real("adam_eps", self.adam_eps, 0, open_low=True)
        self.lr_warmup_steps = _integer("lr_warmup_steps", self.lr_warmup_steps, 0)
        self.lr_warmup_start = _real("lr_warmup_start", self.lr_warmup_start, 0)
        if self.lr_decay not in ("none", "linear", "cosine"):
            raise ConfigError(
                f"train.lr_decay must be none, linear or cosine, got {self.lr_decay!r}"
            )
        self.lr_decay_frac = _real("lr_decay_frac", self.lr_decay_frac, 0, 1)
        self.coefficient_warmup_steps = _integer(
            "coefficient_warmup_steps", self.coefficient_warmup_steps, 0
        )
        if self.grad_clip is not None:
            self.grad_clip = _real("grad_clip", self.grad_clip, 0, open_low=True)
        self.dead_window_tokens = _integer("dead_window_tokens", self.dead_window_tokens, 1)
        if self.dead_window_frac is not None:
            self.dead_window_frac = _real("dead_window_frac", self.dead_window_frac, 0, 1,
                                          open_low=True)  # fmt: skip
        self.calibration_frac = _real("calibration_frac", self.calibration_frac, 0, 1)
        self.calibration_gain = _real("calibration_gain", self.calibration_gain, 0)
        if not isinstance(self.calibration_anneal, bool):
            raise ConfigError(
                f"train.calibration_anneal must be true or false, got {self.calibration_anneal!r}"
            )
        self.checkpoint_every = _integer("checkpoint_every", self.checkpoint_every, 0)
        self.log_every = _integer("log_every", self.log_every, 1)
        if not isinstance(self.param_lr_scale, Mapping):  # a dict (or a DictConfig)
            raise ConfigError(
                f"train.param_lr_scale must be a mapping, got {self.param_lr_scale!r}"
            )
        self.param_lr_scale = {
            str(k): _real(f"param_lr_scale.{k}", v, 0) for k, v in self.param_lr_scale.items()
        }
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    @property
    def total_steps(self) -> int:
        return self.n_tokens // self.batch_size

    @property
    def dead_window(self) -> int:
        """Tokens without a firing after which a latent counts as dead (AuxK, frac_dead):
        dead_window_tokens, or with dead_window_frac that fraction of the run, capped by
        dead_window_tokens and at least one batch."""
        if self.dead_window_frac is None:
            return self.dead_window_tokens
        by_frac = max(self.batch_size, int(self.dead_window_frac * self.n_tokens))
        return min(self.dead_window_tokens, by_frac)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a train config mapping. Keys in NON_TRAINER_KEYS belong to other readers
        and are skipped; any other key that is not a field raises ConfigError."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in d if k not in names and k not in NON_TRAINER_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown train key(s): {', '.join(f'train.{k}' for k in unknown)}; valid keys: "
                f"{', '.join(sorted(names))} (read elsewhere: {', '.join(NON_TRAINER_KEYS)})"
            )
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Sparsity:
    mode: str  # "coefficient" | "target_l0"
    target_l0: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("coefficient", "target_l0"):
            raise ValueError(f"sparsity.mode must be coefficient or target_l0: {self.mode!r}")
        if self.mode == "target_l0" and not (self.target_l0 and self.target_l0 > 0):
            raise ValueError(f"sparsity.target_l0 must be > 0 in target_l0 mode: {self.target_l0}")


@dataclass
class TrainState:
    """Everything besides the SAE and optimiser that a resumed run needs."""

    step: int = 0
    coefficient: float = 0.0
    tokens_since_fired: Tensor | None = None  # (d_sae,) int64
    l0_ema: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)
    # Loss-spike watch (`spike_watch`): EMA of the batch FVU, the largest ratio of a batch's FVU
    # to the EMA before it (after the lr warm-up), and the first step where it exceeded
    # SPIKE_JUMP (-1: none).
    fvu_ema: float = float("nan")
    max_fvu_jump: float = 0.0
    spike_step: int = -1


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    coefficient: float  # final lambda (calibrated in target_l0 mode)
    train_l0: float  # EMA of the batch L0 at the end
    history: list[dict[str, float]]  # rows at step 1, every log_every steps and the last step
    final_frac_dead: float  # fraction of latents silent for >= dead_window_tokens at the end
    dead_window_tokens: int  # the effective window (TrainConfig.dead_window)
    resumed_from_step: int = 0  # the checkpoint's step when the run resumed, else 0
    max_fvu_jump: float = 0.0  # largest batch FVU / EMA of the batches before it (after warm-up)
    spike_step: int | None = None  # first step whose jump exceeded SPIKE_JUMP (None: no spike)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_history(path: str | Path, history: list[dict[str, float]]) -> Path:
    """Write the history rows as a CSV (one column per key, in first-seen order), atomically."""
    columns = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    return atomic_write(path, write)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Cosine warm-up from lr_warmup_start to 1, then optional decay to 0 at the end."""
    mult = 1.0
    if step < cfg.lr_warmup_steps:
        t = step / cfg.lr_warmup_steps
        mult = cfg.lr_warmup_start + (1 - cfg.lr_warmup_start) * (1 - math.cos(math.pi * t)) / 2
    decay_steps = int(cfg.lr_decay_frac * cfg.total_steps)
    start = cfg.total_steps - decay_steps
    if cfg.lr_decay != "none" and decay_steps > 0 and step >= start:
        t = (step - start) / decay_steps
        mult *= 1 - t if cfg.lr_decay == "linear" else (1 + math.cos(math.pi * t)) / 2
    return mult


def coefficient_at(step: int, state: TrainState, cfg: TrainConfig, sparsity: Sparsity) -> float:
    if sparsity.mode == "coefficient" and step < cfg.coefficient_warmup_steps:
        return state.coefficient * step / cfg.coefficient_warmup_steps
    return state.coefficient
