"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014), as stated in docs/method.md.

    pi_gate = W_gate (x - b_dec) + b_gate           f_gate = H(pi_gate)
    W_mag   = diag(exp(r_mag)) W_gate               (weight sharing)
    f_mag   = ReLU(W_mag (x - b_dec) + b_mag)
    f       = f_gate * f_mag                         x_hat = W_dec f + b_dec

    L = ||x - x_hat||^2
        + lambda * sum_i ||d_i|| * ReLU(pi_gate)_i                      ("RI-L1")
        + ||x - x_hat_frozen(ReLU(pi_gate))||^2

x_hat_frozen decodes with stop-gradient copies of W_dec and b_dec, so the auxiliary term trains
the gate path only and never the decoder (the stop-gradient is part of the method; docs/method.md).
H has zero derivative, so the reconstruction term trains the gate path not at all: the gate
learns from the sparsity and auxiliary terms, the magnitude path from the reconstruction.

Here W_gate is stored as `W_enc` (d_in, d_sae) to share the base interface; `r_mag` scales
latent i's encoder column, i.e. row i of the paper's (d_sae, d_in) W_gate. `b_enc` is unused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.base import SAEOutput, SparseAutoencoder, squared_error


class GatedSAE(SparseAutoencoder):
    """Gated SAE. Args as `SparseAutoencoder`; coefficient is lambda of the RI-L1 term."""

    activation_unit_params = ("b_gate", "b_mag", "b_dec")
    surrogate_gradients = {"aux": ("W_dec", "b_dec"), "loss": ("W_dec", "b_dec")}  # stop-grad

    def __init__(self, d_in: int, d_sae: int, coefficient: float = 0.0) -> None:
        super().__init__(d_in, d_sae, coefficient)
        del self.b_enc  # the gate and magnitude paths have their own biases
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))

    @property
    def W_gate(self) -> Tensor:
        """(d_in, d_sae); the same tensor as W_enc."""
        return self.W_enc

    @property
    def W_mag(self) -> Tensor:
        """diag(exp(r_mag)) W_gate, in this module's (d_in, d_sae) layout."""
        return self.W_enc * self.r_mag.exp()

    def pre_activations(self, x: Tensor) -> Tensor:
        """The gate pre-activations pi_gate, shape (B, d_sae)."""
        return (x - self.b_dec) @ self.W_enc + self.b_gate

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # W_mag (x - b_dec) = exp(r_mag) * (W_gate (x - b_dec)): one encoder product serves both
        # paths (and its backward is one product pair), not two.
        u = (x - self.b_dec) @ self.W_enc  # (B, d_sae)
        return u + self.b_gate, u * self.r_mag.exp() + self.b_mag  # pi_gate, pi_mag

    def forward(self, x: Tensor) -> SAEOutput:
        pi_gate, pi_mag = self._paths(x)
        f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
        return SAEOutput(self.decode(f), f, pi_gate)

    def encode(self, x: Tensor) -> Tensor:
        return self.forward(x).f

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        gate_act = torch.relu(out.pre)  # ReLU(pi_gate), (B, d_sae)
        sparsity = (gate_act * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        x_hat_frozen = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        aux = squared_error(x, x_hat_frozen)
        return {"loss": mse + coefficient * sparsity + aux, "mse": mse, "l1": sparsity, "aux": aux}
