"""Metrics of an SAE on the held-out activation set (the SAE alone, no LM): L0, FVU and
firing frequencies, for one SAE or a group reading the same site in one pass.

Owns the computation of the activation metrics whose definitions live in `benchmark.metrics`
(the LM metrics are `benchmark.evaluate`'s). Must not know the trainer, Hydra or any
architecture: the SAE is any module whose forward returns an `SAEOutput` on raw activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmark.progress import progress as progress_display


@dataclass
class SpliceStats:
    """Float64 running sums over the masked positions seen by the splice hook."""

    n: int = 0
    sse: float = 0.0  # sum ||x - x_hat||^2
    sum_sq: float = 0.0  # sum ||x||^2
    sum_x: Tensor | None = None  # (d,) sum of x
    active: float = 0.0  # sum over tokens of the number of active latents
    fired: Tensor | None = None  # (d_sae,) count of tokens on which each latent fired

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x64, xh64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sse += (x64 - xh64).pow(2).sum().item()
        self.sum_sq += x64.pow(2).sum().item()
        s = x64.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        on = f > 0
        self.active += on.sum().item()
        c = on.sum(dim=0, dtype=torch.long)
        self.fired = c if self.fired is None else self.fired + c

    def fvu(self) -> float:
        assert self.sum_x is not None
        total = self.sum_sq - self.sum_x.pow(2).sum().item() / self.n  # sum ||x - mean||^2
        return self.sse / total


@torch.no_grad()
def activation_metrics(
    sae: nn.Module,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    *,
    total: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """L0, FVU and firing-frequency statistics of `sae` on raw (unnormalised) activation
    batches (n, d_in): the held-out activation set. Returns (metrics, firing_frequency).
    progress: rows done out of `total` (if known), rate and ETA."""
    return activation_metrics_group([sae], batches, device, total=total, progress=progress)[0]


@torch.no_grad()
def activation_metrics_group(
    saes: Sequence[nn.Module],
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    *,
    total: float | None = None,
    progress: bool = False,
) -> list[tuple[dict[str, float], Tensor]]:
    """`activation_metrics` of every SAE in `saes` (all reading the same site) in one pass over
    the batches: each batch is read once and fed to every SAE, so each SAE's numbers are those
    of its own pass."""
    stats = [SpliceStats() for _ in saes]
    bar = progress_display(total, "evaluate activations", unit="tok", enabled=progress)
    for x in batches:
        x = x.to(device)
        for sae, st in zip(saes, stats, strict=True):
            out = sae(x)
            st.add(x, out.x_hat, out.f)
        bar.update(x.shape[0])
    bar.close()
    return [_activation_summary(st) for st in stats]


def _activation_summary(stats: SpliceStats) -> tuple[dict[str, float], Tensor]:
    if stats.fired is None:
        raise ValueError("activation_metrics: no activations to evaluate on")
    freq = stats.fired.double().cpu() / stats.n
    metrics = {
        "l0": stats.active / stats.n,
        "fvu": stats.fvu(),
        "frac_dead": (freq == 0).double().mean().item(),
        "frac_freq_over_10pct": (freq > 0.10).double().mean().item(),
        "frac_freq_over_1pct": (freq > 0.01).double().mean().item(),
        "n_activation_tokens": float(stats.n),
    }
    return metrics, freq
