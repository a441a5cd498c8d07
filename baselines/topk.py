"""TopK SAE (Gao et al. 2024, arXiv 2406.04093), as stated in docs/method.md.

    z     = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))        x_hat = W_dec z + b_pre
    L     = ||x - x_hat||^2 + aux_coefficient * AuxK

b_pre is the shared `b_dec` of the base class. L0 = k whenever the k-th largest pre-activation
is positive (always, in practice; the ReLU only guards the degenerate case).

AuxK: the trainer supplies `dead_mask` (d_sae,), True for latents that have not fired within
its dead-latent window (10M tokens in the paper; scaled down for short runs). With
e = x - x_hat (detached), the auxiliary reconstruction is e_hat = W_dec z_aux where z_aux keeps
the top-k_aux pre-activations among dead latents only (k_aux = min(k_aux, #dead)), and
AuxK = ||e - e_hat||^2 (summed over dims, mean over batch; the same units as the main term).
It is zero when nothing is dead or no mask is given. Its gradient reaches the encoder columns,
encoder biases and decoder rows of dead latents only (and b_pre, through the encoder's input
centring).

Sparse path (`sparse`, baselines/sparse.py): the encoder product stays dense (the top-k reads
every pre-activation), but the decoder reads only the k active rows per token, and the backward
touches only the active (token, latent) pairs (and the AuxK pairs): the same loss and gradients
as the dense formulas, at a fraction of the cost when k << d_sae. "auto" picks the faster path
for the device and k / d_sae (`baselines.sparse.use_sparse`).

`init_b_pre(sample)` sets b_pre to the data's geometric median (Weiszfeld iterations) or mean;
the trainer calls it once before the first step when the architecture has it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from baselines.base import SAEOutput, SparseAutoencoder, squared_error
from baselines.sparse import (
    SparseCode,
    SparseMode,
    check_mode,
    sampled_pre,
    sparse_decode,
    sparse_forward,
    topk_code,
    use_sparse,
)


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; x is (N, d)."""
    m = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        m_new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (m_new - m).norm() <= tol * m.norm().clamp_min(1e-8):
            return m_new
        m = m_new
    return m


class TopKSAE(SparseAutoencoder):
    """TopK SAE.

    Args:
        d_in, d_sae: see `SparseAutoencoder`.
        k: active latents per token (= the target L0).
        k_aux: AuxK's k; None -> the power of two nearest d_in / 2 (the paper's 512 for
            d_in 768).
        aux_coefficient: weight of AuxK (paper: 1/32).
        b_pre_init: "geometric_median", "mean" or "zero": how `init_b_pre` sets b_pre.
        coefficient: unused (TopK has no sparsity penalty); accepted for a uniform interface.
        sparse: True (sparse decoder and backward), False (dense reference) or "auto".
    """

    uses_dead_mask = True
    # AuxK's target e = x - x_hat is detached, so it depends on every parameter without a
    # gradient path back; with dead latents the total loss inherits that.
    surrogate_gradients = {"auxk": ("*",), "loss": ("*",)}

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        k_aux: int | None = None,
        aux_coefficient: float = 1 / 32,
        b_pre_init: Literal["geometric_median", "mean", "zero"] = "geometric_median",
        coefficient: float = 0.0,
        sparse: SparseMode = "auto",
    ) -> None:
        super().__init__(d_in, d_sae, coefficient)
        self.sparse = check_mode(sparse)
        if not 0 < k <= d_sae:
            raise ValueError(f"k (target L0) must be in [1, d_sae={d_sae}], got {k}")
        if k_aux is None:
            k_aux = 2 ** round(math.log2(d_in / 2)) if d_in >= 2 else 1
        if k_aux <= 0:
            raise ValueError(f"k_aux must be positive, got {k_aux}")
        if b_pre_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"b_pre_init must be geometric_median, mean or zero: {b_pre_init!r}")
        self.k, self.k_aux, self.aux_coefficient = int(k), int(k_aux), float(aux_coefficient)
        self.b_pre_init = b_pre_init

    @torch.no_grad()
    def init_b_pre(self, sample: Tensor) -> None:
        """Initialise b_pre (= b_dec) from a sample of training activations (N, d_in)."""
        if self.b_pre_init == "geometric_median":
            self.b_dec.copy_(geometric_median(sample.double()).to(self.b_dec.dtype))
        elif self.b_pre_init == "mean":
            self.b_dec.copy_(sample.double().mean(dim=0).to(self.b_dec.dtype))

    def activate(self, pre: Tensor) -> Tensor:
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def pre_activations(self, x: Tensor) -> Tensor:
        """As the base class, with the bias added inside the matmul (one pass less)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def active_code(self, pre: Tensor) -> SparseCode | None:
        """The active (token, latent) pairs when the sparse path is taken, else None."""
        if not use_sparse(self.sparse, self.k / self.d_sae, pre.device):
            return None
        return topk_code(pre.topk(self.k, dim=-1).indices, self.d_sae)

    def forward(self, x: Tensor) -> SAEOutput:
        return sparse_forward(self, x, lambda z, code: torch.relu(z))

    def _sampled_pre(self, pre: Tensor, code: SparseCode, x: Tensor) -> Tensor:
        return sampled_pre(pre, code, x - self.b_dec, self.W_enc, self.b_enc, self.b_dec)

    def auxk(self, pre: Tensor, x: Tensor, x_hat: Tensor, dead_mask: Tensor | None) -> Tensor:
        """||e - W_dec z_aux||^2 over dead latents; 0 when none is dead."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        k_aux = min(self.k_aux, int(dead_mask.sum()))
        e = (x - x_hat).detach()
        if use_sparse(self.sparse, k_aux / self.d_sae, pre.device):
            dead_pre = pre.detach().masked_fill(~dead_mask, float("-inf"))  # (B, d_sae)
            code = topk_code(dead_pre.topk(k_aux, dim=-1).indices, self.d_sae)
            values = torch.relu(self._sampled_pre(pre, code, x))  # (B * k_aux,)
            return squared_error(e, sparse_decode(code, values, self.W_dec))
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))  # (B, d_sae)
        top = dead_pre.topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return squared_error(e, z_aux @ self.W_dec)

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        aux = self.auxk(out.pre, x, out.x_hat, dead_mask)
        return {"loss": mse + self.aux_coefficient * aux, "mse": mse, "auxk": aux}
