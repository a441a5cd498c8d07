"""One trainer for every SAE architecture.

Owns: the optimiser (Adam), the learning-rate and sparsity-coefficient schedules (their
formulas and the recipe's checks are in benchmark/recipe.py), matched-L0
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

import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from baselines.base import SparseAutoencoder
from benchmark.checkpoint import (
    diverged,
    first_nonfinite,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from benchmark.progress import Progress, progress
from benchmark.recipe import (
    NON_TRAINER_KEYS,
    PRECISIONS,
    SPIKE_JUMP,
    Sparsity,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    TrainState,
    check_precision_device,
    coefficient_at,
    lr_multiplier,
    matmul_precision,
    spike_watch,
    write_history,
)

__all__ = [  # the recipe's names (benchmark/recipe.py) are re-exported: callers import them here
    "NON_TRAINER_KEYS", "PRECISIONS", "SPIKE_JUMP", "BatchFactory", "Sparsity", "TrainConfig",
    "TrainResult", "TrainState", "Trainer", "TrainingDiverged", "check_precision_device",
    "coefficient_at", "lr_multiplier", "matmul_precision", "read_checkpoint", "spike_watch",
    "train_group", "train_sae", "write_history",
]  # fmt: skip
_log = logging.getLogger(__name__)  # `log` is train_sae's metrics callback

BatchFactory = Callable[[int], Iterator[Tensor]]
"""batches(skip) -> an iterator of (batch, d_in) float tensors, starting after `skip` batches."""


def _param_groups(sae: SparseAutoencoder, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """One Adam group per distinct lr scale; `lr_scale` maps parameter names (e.g.
    "raw_threshold") to a multiplier of the recipe's lr. Names the SAE lacks are ignored."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in sae.named_parameters():
        groups.setdefault(float(lr_scale.get(name, 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
            self.state = load_checkpoint(self.ckpt, sae, self.opt)
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
            raise diverged("non-finite loss", f"{terms['loss'].item()}", step, ckpt)
        opt.zero_grad(set_to_none=True)
        with matmul_precision(cfg.precision, self.device.type, backward=True):
            terms["loss"].backward()
        # A finite loss can still give inf gradients; the step would turn them into NaN weights.
        grads = [(n, p.grad) for n, p in self.params if p.grad is not None]
        if (bad := first_nonfinite(grads)) is not None:
            raise diverged("non-finite gradient of", bad, step, ckpt)
        sae.before_optimizer_step()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.after_optimizer_step()
        if (bad := first_nonfinite(self.params)) is not None:
            raise diverged("non-finite parameter", bad, step, ckpt)

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
            save_checkpoint(self.ckpt, self.sae, self.opt, self.state)

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
