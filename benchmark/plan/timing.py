"""Measurements on this machine: a square matmul's FLOP/s, and SAE training steps timed with the
real trainer on synthetic activations (the architectures' public interface only)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from benchmark.plan.assumptions import MIN_BATCH, MIN_WIDTH, STEP_SECONDS, TIMED_SECONDS
from benchmark.plan.jobs import Job


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available(device: Any) -> bool:
    """The device is on this machine (so it can be timed)."""
    import torch

    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_available())
    try:
        torch.empty(1, device=device)
        return True
    except Exception:  # noqa: BLE001
        return False


def matmul_flops(device: Any, dtype: Any, seconds: float = 0.4) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`: the median of ~`seconds` of them."""
    import torch

    n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    times: list[float] = []
    while sum(times) < seconds or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


@dataclass
class SAETiming:
    sae: str
    d_in: int
    d_sae: int
    batch: int
    timed_width: int
    timed_batch: int
    steps: int
    seconds_per_token: float  # at the timed shape
    params_per_latent: float  # the SAE's parameters / (d_in x d_sae) at the timed shape

    @property
    def scaled(self) -> bool:
        return (self.timed_width, self.timed_batch) != (self.d_sae, self.batch)

    def per_token(self, d_in: int, d_sae: int) -> float:
        """Seconds per training token at (d_in, d_sae), scaled by d_in x d_sae."""
        return self.seconds_per_token * (d_in * d_sae) / (self.d_in * self.timed_width)


def timed_shape(job: Job, fp32_flops: float) -> tuple[int, int, int]:
    """(width, batch, steps) to time: the job's, or a smaller width (>= 32 k, >= MIN_WIDTH)
    and batch (>= MIN_BATCH) when a step would take over STEP_SECONDS; enough steps for
    ~TIMED_SECONDS (2 to 20)."""
    assert job.d_sae is not None
    d_in, d_sae, batch = job.d_in, job.d_sae, job.batch_size
    k = float(job.target_l0 or 64)
    budget = STEP_SECONDS * fp32_flops / 12.0  # batch x d_in x d_sae of a STEP_SECONDS step
    width = d_sae
    if batch * d_in * width > budget:
        width = min(d_sae, max(MIN_WIDTH, int(32 * k), int(budget / (batch * d_in))))
    timed_batch = batch
    if timed_batch * d_in * width > budget:
        timed_batch = min(batch, max(MIN_BATCH, int(budget / (d_in * width))))
    est = 12.0 * timed_batch * d_in * width / fp32_flops
    steps = int(min(20, max(2, round(TIMED_SECONDS / max(est, 1e-6)))))
    return width, timed_batch, steps


def time_sae(job: Job, device: Any, fp32_flops: float) -> SAETiming:
    """Seconds per training token of job's SAE on `device`: the real trainer on synthetic
    activations (E||x||^2 = 1) at the job's shapes, one warm-up step then ~TIMED_SECONDS of
    steps, or at a smaller width and batch when a step would take over STEP_SECONDS. The SAE
    is put at the job's code density by its own `set_density` (penalised architectures start
    dense), as after training."""
    import torch

    from benchmark.saes import build_sae
    from benchmark.train import Sparsity, TrainConfig, train_sae

    assert job.d_sae is not None
    cfg, d_in = job.cfg, job.d_in
    width, timed_batch, steps = timed_shape(job, fp32_flops)
    tc = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    tc.n_tokens, tc.batch_size = timed_batch * (1 + steps), timed_batch
    tc.log_every, tc.checkpoint_every = 10**9, 0
    torch.manual_seed(0)
    x = torch.randn(timed_batch, d_in, device=device) / math.sqrt(d_in)
    sae = build_sae(cfg.sae, d_in, width).to(device)
    sae.set_density(x, float(job.target_l0 or 64))
    marks: list[float] = []

    def batches(skip: int) -> Iterator[Any]:  # the trainer takes a batch right before a step
        while True:
            sync(device)
            marks.append(time.perf_counter())
            yield x

    sparsity = Sparsity(str(cfg.sparsity.mode), cfg.sparsity.get("target_l0"))
    train_sae(sae, batches, tc, sparsity, progress=False)
    sync(device)
    marks.append(time.perf_counter())
    step_seconds = statistics.median(b - a for a, b in zip(marks[1:-1], marks[2:], strict=True))
    n_params = sum(p.numel() for p in sae.parameters())
    return SAETiming(
        sae=job.sae, d_in=d_in, d_sae=job.d_sae, batch=job.batch_size, timed_width=width,
        timed_batch=timed_batch, steps=steps, seconds_per_token=step_seconds / timed_batch,
        params_per_latent=n_params / (d_in * width),
    )  # fmt: skip
