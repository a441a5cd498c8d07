"""One trainer for every SAE architecture.

Owns: the optimiser (Adam), the learning-rate and sparsity-coefficient schedules, matched-L0
calibration of the coefficient, decoder-norm handling around each step (through the SAE's
`before_optimizer_step` / `after_optimizer_step`), the dead-latent window for AuxK, gradient
clipping, checkpoints with exact resume, the NaN guard and progress/logging.

Must not know: the model, the data source, Hydra or any architecture by name. It is fed a
factory of iterators over normalised activation batches and asks the SAE only for its
interface (`loss`, `forward`, `uses_dead_mask`, the optimiser-step hooks, and an optional
`init_b_pre(sample)`).

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

import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from baselines.base import SparseAutoencoder
from benchmark.fileio import atomic_write

BatchFactory = Callable[[int], Iterator[Tensor]]
"""batches(skip) -> an iterator of (batch, d_in) float tensors, starting after `skip` batches."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the last good checkpoint (if any) is left untouched."""


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
    calibration_frac: float = 0.25
    calibration_gain: float = 0.02
    calibration_anneal: bool = False
    checkpoint_every: int = 0
    log_every: int = 100
    param_lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.n_tokens < self.batch_size:
            raise ValueError(
                f"train.n_tokens={self.n_tokens} is less than one batch "
                f"(train.batch_size={self.batch_size})"
            )
        if self.lr_decay not in ("none", "linear", "cosine"):
            raise ValueError(f"train.lr_decay must be none, linear or cosine: {self.lr_decay!r}")
        if not 0.0 <= self.calibration_frac <= 1.0:
            raise ValueError(f"train.calibration_frac must be in [0, 1]: {self.calibration_frac}")

    @property
    def total_steps(self) -> int:
        return self.n_tokens // self.batch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a config mapping, ignoring keys that belong to other readers."""
        names = set(cls.__dataclass_fields__)
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


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    coefficient: float  # final lambda (calibrated in target_l0 mode)
    train_l0: float  # EMA of the batch L0 at the end
    history: list[dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _save_checkpoint(path: Path, sae, opt, state: TrainState) -> None:
    ckpt = {"sae": sae.state_dict(), "opt": opt.state_dict(), "state": state}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))  # never a half-written checkpoint


def _load_checkpoint(path: Path, sae, opt) -> TrainState:
    ckpt = torch.load(path, weights_only=False)
    sae.load_state_dict(ckpt["sae"])
    opt.load_state_dict(ckpt["opt"])
    return ckpt["state"]


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
    device = next(sae.parameters()).device
    opt = torch.optim.Adam(
        _param_groups(sae, cfg.param_lr_scale), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps
    )
    state = TrainState(coefficient=sae.coefficient)
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and ckpt.exists():
        state = _load_checkpoint(ckpt, sae, opt)
    if state.tokens_since_fired is None:
        state.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    calibrate = sparsity.mode == "target_l0" and state.coefficient > 0
    calibration_steps = int(cfg.calibration_frac * cfg.total_steps) if calibrate else 0

    it = batches(state.step)
    bar = _progress_bar(cfg.total_steps, state.step, progress)
    t0, step0 = time.perf_counter(), state.step
    for step in range(state.step, cfg.total_steps):
        x = next(it).to(device, non_blocking=True)  # (B, d_in)
        init_b_pre = getattr(sae, "init_b_pre", None)  # optional architecture hook (TopK)
        if step == 0 and callable(init_b_pre):
            init_b_pre(x)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(step, cfg) * group["lr_scale"]
        dead = state.tokens_since_fired >= cfg.dead_window_tokens if sae.uses_dead_mask else None
        out = sae(x)
        terms = sae.loss(
            x, coefficient=coefficient_at(step, state, cfg, sparsity), dead_mask=dead, out=out
        )
        if not torch.isfinite(terms["loss"]):
            raise TrainingDiverged(
                f"non-finite loss {terms['loss'].item()} at step {step}; last good checkpoint: "
                f"{ckpt if ckpt is not None and ckpt.exists() else 'none'}"
            )
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sae.before_optimizer_step()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.after_optimizer_step()

        with torch.no_grad():
            fired = out.f > 0  # (B, d_sae), from this step's forward pass
            l0 = fired.sum(dim=-1).float().mean().item()
            state.tokens_since_fired += x.shape[0]
            state.tokens_since_fired[fired.any(dim=0)] = 0
        state.l0_ema = l0 if math.isnan(state.l0_ema) else 0.9 * state.l0_ema + 0.1 * l0
        if step < calibration_steps and sparsity.target_l0:
            # Integral control on log lambda (optionally with a gain annealed to 0).
            err = math.log(max(l0, 0.5) / sparsity.target_l0)
            gain = cfg.calibration_gain
            if cfg.calibration_anneal:
                gain *= 1 - step / calibration_steps
            state.coefficient *= math.exp(gain * err)
        state.step = step + 1

        if state.step % cfg.log_every == 0 or state.step == cfg.total_steps:
            row = _log_row(state, terms, x, cfg, l0, step)
            state.history.append(row)
            if log is not None:
                log(row, state.step)
            bar.set_postfix(loss=row["loss"], l0=row["l0"], fvu=row["fvu"], refresh=False)
        bar.update(1)
        if ckpt is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, sae, opt, state)
        if stop_after is not None and state.step >= stop_after:
            if ckpt is not None:
                _save_checkpoint(ckpt, sae, opt, state)
            break
    bar.close()
    seconds = time.perf_counter() - t0
    tokens = (state.step - step0) * cfg.batch_size
    return TrainResult(
        steps=state.step,
        tokens=state.step * cfg.batch_size,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
        peak_memory_mb=peak_memory_mb(device),
        coefficient=state.coefficient,
        train_l0=state.l0_ema,
        history=state.history,
    )


def _log_row(state: TrainState, terms: dict[str, Tensor], x: Tensor, cfg, l0, step) -> dict:
    """Batch statistics; FVU here is per batch (the evaluator's FVU is over the whole set)."""
    var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().item()
    row = {name: float(v.detach()) for name, v in terms.items()}
    row.update(
        step=state.step,
        l0=l0,
        l0_ema=state.l0_ema,
        fvu=row["mse"] / var if var > 0 else float("nan"),
        coefficient=state.coefficient,
        lr=cfg.lr * lr_multiplier(step, cfg),
        frac_dead=float((state.tokens_since_fired >= cfg.dead_window_tokens).float().mean()),
    )
    return row


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        unit="step",
        mininterval=2.0,
        dynamic_ncols=True,
    )
