"""One trainer for every SAE architecture.

Owns: the optimiser (Adam), the learning-rate and sparsity-coefficient schedules, matched-L0
calibration of the coefficient, decoder-norm handling around each step (through the SAE's
`before_optimizer_step` / `after_optimizer_step`), the dead-latent window for AuxK, gradient
clipping, the matmul precision of the SAE's step (`train.precision`: fp32, or on CUDA tf32 or
bf16 autocast with fp32 parameters and optimiser state), checkpoints with exact resume, the
NaN guard (loss, gradients, parameters) and progress/logging, including the training history
(`write_history`).

Must not know: the model, the data source, Hydra or any architecture by name. It is fed a
factory of iterators over normalised activation batches and asks the SAE only for its
interface (`loss`, `forward`, `uses_dead_mask`, `aims_at_target_l0`, the optimiser-step hooks
and the first-batch hook `init_b_pre(sample)`: `baselines.base.SparseAutoencoder`).

Sparsity modes (recorded in the result):
- "coefficient": fixed lambda with a linear warm-up 0 -> lambda over coefficient_warmup_steps.
- "target_l0": lambda starts at the SAE's configured value and, during the first
  calibration_frac of the steps, follows log(lambda) += gain_t * log(L0_batch / target_l0) after
  every step (an integral controller on the log of the L0 error), gain_t = calibration_gain
  (or annealed linearly to 0 over the phase with calibration_anneal); then it is frozen. With a
  linear lr decay over the last steps, the L0 drift after the freeze stays small (measured:
  conf/train/cpu.yaml). There is no
  separate lambda warm-up in this mode: the controller's start is the warm-up. Architectures
  without a coefficient (TopK: L0 = k) skip calibration.
"""

from __future__ import annotations

import csv
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from baselines.base import SparseAutoencoder
from benchmark.errors import ConfigError
from benchmark.fileio import atomic_write
from benchmark.progress import Progress, progress
from interop.foreign import PARSE_ERRORS, load_plain, refusal

_log = logging.getLogger(__name__)  # `log` is train_sae's metrics callback

BatchFactory = Callable[[int], Iterator[Tensor]]
"""batches(skip) -> an iterator of (batch, d_in) float tensors, starting after `skip` batches."""


# Keys of a train config that are read by others, not by the trainer: the run's recipe name,
# the dictionary size (benchmark.validate.dictionary_size) and per-architecture blocks that SAE
# YAMLs interpolate (conf/sae/jumprelu.yaml reads ${train.jumprelu.*}). Any other key that is
# not a TrainConfig field is a typo and fails in `TrainConfig.from_dict`.
NON_TRAINER_KEYS: tuple[str, ...] = ("name", "width", "width_factor", "jumprelu")


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


def _param_groups(sae: SparseAutoencoder, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """One Adam group per distinct lr scale; `lr_scale` maps parameter names (e.g.
    "raw_threshold") to a multiplier of the recipe's lr. Names the SAE lacks are ignored."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in sae.named_parameters():
        groups.setdefault(float(lr_scale.get(name, 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _first_nonfinite(named: Sequence[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or inf, or None: a max and a min per tensor
    (no overflow, unlike a norm; both propagate NaN) and one host sync for all of them.
    Measured on 2 CPU cores, 576 -> 4608, batch 1024: ~0.9 ms per call, two calls per ~210 ms
    step (<1%); torch._foreach_norm(inf) took ~17 ms, torch.aminmax ~3 ms on the strided W_enc."""
    tensors = [t.detach() for _, t in named if t.numel() > 0]
    if not tensors:
        return None
    extremes = torch.stack([m.float() for t in tensors for m in (t.amax(), t.amin())])  # (2n,)
    bad = ~torch.isfinite(extremes.view(-1, 2)).all(dim=1)  # (n,) NaN or +-inf in tensor i
    if not bool(bad.any()):
        return None
    names = [n for n, t in named if t.numel() > 0]
    return names[int(bad.nonzero()[0])]


def _diverged(what: str, name: str, step: int, ckpt: Path | None) -> TrainingDiverged:
    last = ckpt if ckpt is not None and ckpt.exists() else "none"
    return TrainingDiverged(f"{what} {name} at step {step}; last good checkpoint: {last}")


CHECKPOINT_FORMAT = 2  # 2: the TrainState as plain values (`weights_only` loads it)


def _save_checkpoint(path: Path, sae, opt, state: TrainState) -> None:
    weights = [(n, t) for n, t in sae.state_dict().items() if t.is_floating_point()]
    if (bad := _first_nonfinite(weights)) is not None:  # the last good checkpoint stays
        raise _diverged("non-finite", bad, state.step - 1, path)
    # Tensors, numbers, strings, lists and dicts only: torch.load(weights_only=True) reads it
    # back without unpickling any object, so a checkpoint from someone else cannot run code.
    ckpt = {"format": CHECKPOINT_FORMAT, "sae": sae.state_dict(), "opt": opt.state_dict(),
            "state": asdict(state)}  # fmt: skip
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))  # never a half-written checkpoint


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents as plain data: `torch.load(weights_only=True)`, which builds
    tensors, numbers, strings, lists and dicts and refuses every other pickled object (no code
    runs). A file that needs more (a checkpoint written before the suite saved plain values, a
    foreign or hostile pickle) or is damaged raises ConfigError naming the file: nothing is
    loaded from it, and `rerun=true` trains from scratch instead of resuming. mmap: map the
    tensors instead of reading them (a check before heavy work that costs no I/O)."""
    path = Path(path)
    refuse = (
        f"{path}: refused: not a checkpoint of this suite's format {CHECKPOINT_FORMAT} (plain "
        "tensors and numbers)"
    )
    try:
        ckpt = load_plain(path, mmap=mmap)
    except PARSE_ERRORS as e:  # a pickled object outside the allow-list, or a damaged file
        raise ConfigError(f"{refuse} ({refusal(e)}); set rerun=true to train this run from "
                          "scratch (or delete the file)") from None  # fmt: skip
    ok = isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
    if not ok or not all(isinstance(ckpt.get(k), dict) for k in ("sae", "opt", "state")):
        raise ConfigError(f"{refuse}; set rerun=true to train this run from scratch")
    return ckpt


def _load_checkpoint(path: Path, sae, opt) -> TrainState:
    ckpt = read_checkpoint(path)
    names = {f.name for f in fields(TrainState)}
    state = {k: v for k, v in ckpt["state"].items() if k in names}
    try:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["opt"])
        return TrainState(**state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: does not fit this run's SAE or optimiser "
                          f"({refusal(e)}); set rerun=true to train it from scratch") from None  # fmt: skip


class Trainer:
    """One SAE's training, a step at a time: the optimiser, the schedules, calibration, the
    dead-latent window, the NaN guard, checkpoints and the history. `train_sae` drives one
    Trainer over its own batch stream; `train_group` drives several in lockstep over shared
    streams (fan-out). Both call the same `step`, so an SAE trained in a group ends with
    exactly the weights of a separate run fed the same batches.

    A checkpoint at `checkpoint_path` is loaded on construction (resume at `state.step`) as
    plain data (`read_checkpoint`); `resume=False` ignores it (it is overwritten at the next
    checkpoint: `rerun=true` trains from scratch). `seconds` counts this SAE's own steps (and, in `train_sae`, its batch loading).
    """

    def __init__(
        self, sae: SparseAutoencoder, cfg: TrainConfig, sparsity: Sparsity, *,
        checkpoint_path: str | Path | None = None,
        log: Callable[[dict[str, float], int], None] | None = None, progress: bool = True,
        resume: bool = True,
    ) -> None:  # fmt: skip
        self.sae, self.cfg, self.sparsity, self.log = sae, cfg, sparsity, log
        self.device = next(sae.parameters()).device
        check_precision_device(cfg.precision, self.device.type)
        self.opt = torch.optim.Adam(
            _param_groups(sae, cfg.param_lr_scale), lr=cfg.lr, betas=cfg.adam_betas,
            eps=cfg.adam_eps,
        )  # fmt: skip
        self.state = TrainState(coefficient=sae.coefficient)
        self.ckpt = Path(checkpoint_path) if checkpoint_path else None
        if resume and self.ckpt is not None and self.ckpt.exists():
            self.state = _load_checkpoint(self.ckpt, sae, self.opt)
            _log.info("resuming from the checkpoint %s at step %d", self.ckpt, self.state.step)
        if self.state.tokens_since_fired is not None:  # a checkpoint is read onto the CPU
            self.state.tokens_since_fired = self.state.tokens_since_fired.to(self.device)
        else:
            self.state.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long,
                                                        device=self.device)  # fmt: skip
        # An architecture that aims at the target itself (a target-L0 penalty) is not calibrated.
        aims = sae.aims_at_target_l0
        calibrate = sparsity.mode == "target_l0" and self.state.coefficient > 0 and not aims
        self.calibration_steps = int(cfg.calibration_frac * cfg.total_steps) if calibrate else 0
        self.params = list(sae.named_parameters())
        self.step0 = self.state.step
        self.seconds = 0.0
        self.bar = _progress_bar(cfg.total_steps, self.state.step, progress)

    @property
    def done(self) -> bool:
        return self.state.step >= self.cfg.total_steps

    def step(self, x: Tensor) -> None:
        """One optimiser step on the normalised batch x (B, d_in); then log and checkpoint."""
        t0 = time.perf_counter()
        sae, cfg, state, opt, ckpt = self.sae, self.cfg, self.state, self.opt, self.ckpt
        step = state.step
        x = x.to(self.device, non_blocking=True)
        if step == 0:
            sae.init_b_pre(x)  # the architecture's first-batch hook (a no-op by default)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(step, cfg) * group["lr_scale"]
        since = state.tokens_since_fired
        assert since is not None
        dead = since >= cfg.dead_window if sae.uses_dead_mask else None
        lam = coefficient_at(step, state, cfg, self.sparsity)
        with matmul_precision(cfg.precision, self.device.type):
            out = sae(x)
            terms = sae.loss(x, coefficient=lam, dead_mask=dead, out=out)
        if cfg.precision == "bf16":  # the loss and its terms in fp32, whatever autocast chose
            terms = {name: t.float() for name, t in terms.items()}
        if not torch.isfinite(terms["loss"]):
            raise _diverged("non-finite loss", f"{terms['loss'].item()}", step, ckpt)
        opt.zero_grad(set_to_none=True)
        with matmul_precision(cfg.precision, self.device.type, backward=True):
            terms["loss"].backward()
        # A finite loss can still give inf gradients; the step would turn them into NaN weights.
        grads = [(n, p.grad) for n, p in self.params if p.grad is not None]
        if (bad := _first_nonfinite(grads)) is not None:
            raise _diverged("non-finite gradient of", bad, step, ckpt)
        sae.before_optimizer_step()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.after_optimizer_step()
        if (bad := _first_nonfinite(self.params)) is not None:
            raise _diverged("non-finite parameter", bad, step, ckpt)

        with torch.no_grad():
            fired = out.f > 0  # (B, d_sae), from this step's forward pass
            l0 = fired.sum(dim=-1).float().mean().item()
            since += x.shape[0]
            since[fired.any(dim=0)] = 0
            var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
            fvu = (terms["mse"].detach().float() / var).item() if var > 0 else float("nan")
        spike_watch(state, fvu, step, cfg.lr_warmup_steps)
        state.l0_ema = l0 if math.isnan(state.l0_ema) else 0.9 * state.l0_ema + 0.1 * l0
        if step < self.calibration_steps and self.sparsity.target_l0:
            # Integral control on log lambda (optionally with a gain annealed to 0).
            err = math.log(max(l0, 0.5) / self.sparsity.target_l0)
            gain = cfg.calibration_gain
            if cfg.calibration_anneal:
                gain *= 1 - step / self.calibration_steps
            state.coefficient *= math.exp(gain * err)
        state.step = step + 1

        if state.step == 1 or state.step % cfg.log_every == 0 or state.step == cfg.total_steps:
            lr = opt.param_groups[0]["lr"]  # the group of the shared weights (W_dec first)
            row = _log_row(state, terms, x, cfg, l0=l0, lr=lr, coefficient=lam)
            state.history.append(row)
            if self.log is not None:
                self.log(row, state.step)
            self.bar.set_postfix(**{k: f"{row[k]:.4g}" for k in ("loss", "l0", "fvu")})
        self.bar.update(1)
        if ckpt is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            self.checkpoint()
        self.seconds += time.perf_counter() - t0

    def checkpoint(self) -> None:
        if self.ckpt is not None:
            _save_checkpoint(self.ckpt, self.sae, self.opt, self.state)

    def result(self) -> TrainResult:
        self.bar.close()
        tokens = (self.state.step - self.step0) * self.cfg.batch_size
        return TrainResult(
            steps=self.state.step,
            tokens=self.state.step * self.cfg.batch_size,
            seconds=self.seconds,
            tokens_per_s=tokens / self.seconds if self.seconds > 0 else float("nan"),
            peak_memory_mb=peak_memory_mb(self.device),
            coefficient=self.state.coefficient,
            train_l0=self.state.l0_ema,
            history=self.state.history,
            final_frac_dead=_frac_dead(self.state, self.cfg),
            dead_window_tokens=self.cfg.dead_window,
            resumed_from_step=self.step0,
            max_fvu_jump=self.state.max_fvu_jump,
            spike_step=self.state.spike_step if self.state.spike_step >= 0 else None,
        )


def train_sae(
    sae: SparseAutoencoder,
    batches: BatchFactory,
    cfg: TrainConfig,
    sparsity: Sparsity,
    *,
    checkpoint_path: str | Path | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `sae` in place on cfg.total_steps batches; resume from checkpoint_path if present.

    stop_after: stop (after checkpointing) once this many steps are done: simulates an
    interrupted run in tests.
    """
    trainer = Trainer(sae, cfg, sparsity, checkpoint_path=checkpoint_path, log=log,
                      progress=progress)  # fmt: skip
    it = batches(trainer.state.step)
    while not trainer.done:
        t0 = time.perf_counter()
        x = next(it)
        trainer.seconds += time.perf_counter() - t0  # a single run's clock includes loading
        trainer.step(x)
        if stop_after is not None and trainer.state.step >= stop_after:
            trainer.checkpoint()
            break
    return trainer.result()


def train_group(
    trainers: Sequence[Trainer],
    streams: Sequence[Any],
    batches: Mapping[Any, BatchFactory],
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> list[TrainResult]:
    """Fan-out: train several SAEs in lockstep. `streams[i]` names the batch stream trainer i
    reads (e.g. its site); `batches[name]` is that stream's factory, opened once at the
    earliest step any of its trainers needs. Each batch is drawn once per stream and fed to
    every trainer of that stream that is at that step (a trainer resumed further ahead waits
    until the stream reaches it). All trainers must share batch_size and n_tokens (the group
    key, benchmark.identity.group_key). The batch loading time is shared out evenly among
    the trainers of a stream. stop_after: as in `train_sae`, for every trainer."""
    if len({(t.cfg.batch_size, t.cfg.total_steps) for t in trainers}) > 1:
        raise ValueError("train_group: the trainers differ in batch_size or n_tokens")
    total = trainers[0].cfg.total_steps if trainers else 0
    members: dict[Any, list[Trainer]] = {}
    for trainer, name in zip(trainers, streams, strict=True):
        members.setdefault(name, []).append(trainer)
    first = {name: min(t.state.step for t in ts) for name, ts in members.items()}
    its = {name: batches[name](first[name]) for name in members}
    start = min(first.values(), default=total)
    end = total if stop_after is None else min(total, stop_after)
    bar = _progress_bar(end, start, progress)
    for step in range(start, end):
        for name, ts in members.items():
            if step < first[name]:
                continue
            t0 = time.perf_counter()
            x = next(its[name])
            share = (time.perf_counter() - t0) / len(ts)
            for t in ts:
                t.seconds += share
                if t.state.step == step:
                    t.step(x)
        bar.update(1)
    bar.close()
    if stop_after is not None:
        for t in trainers:
            t.checkpoint()
    return [t.result() for t in trainers]


def _frac_dead(state: TrainState, cfg: TrainConfig) -> float:
    """Fraction of latents that have not fired within the last cfg.dead_window tokens."""
    assert state.tokens_since_fired is not None
    return float((state.tokens_since_fired >= cfg.dead_window).float().mean())


def _log_row(
    state: TrainState, terms: dict[str, Tensor], x: Tensor, cfg: TrainConfig, *, l0: float,
    lr: float, coefficient: float,
) -> dict[str, float]:  # fmt: skip
    """One history row. FVU here is per batch (the evaluator's FVU is over the whole set);
    `coefficient` is the lambda this step used (after its warm-up), `lr` the applied one."""
    var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().item()
    losses = {name: float(v.detach()) for name, v in terms.items()}  # loss, mse, named terms
    return {
        "step": state.step,
        "tokens": state.step * cfg.batch_size,
        "lr": lr,
        "coefficient": coefficient,
        "l0": l0,
        "l0_ema": state.l0_ema,
        "fvu": losses["mse"] / var if var > 0 else float("nan"),
        "frac_dead": _frac_dead(state, cfg),
        **losses,
    }


def _progress_bar(total: int, initial: int, enabled: bool) -> Progress:
    """Steps done, with the last logged loss / L0 / FVU: a bar on a terminal, a log line every
    ~10% (or 30 s) elsewhere (benchmark.progress); nothing with `progress=False`."""
    return progress(total, "train", unit="step", enabled=enabled, initial=initial)
