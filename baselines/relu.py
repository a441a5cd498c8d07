"""The classic ReLU (L1) SAE, the reference point SAE papers report.

    f = ReLU(W_enc (x - b_dec) + b_enc)         x_hat = W_dec f + b_dec
    L = ||x - x_hat||^2 + lambda * sum_i |f_i| * ||d_i||

The L1 term is weighted by decoder row norms (d_i = row i of W_dec), so it cannot be gamed by
shrinking latents and growing decoder rows; with unit-norm rows the weights are 1 in value but
still carry their gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from baselines.base import SAEOutput, SparseAutoencoder, squared_error


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE. Args as `SparseAutoencoder`; coefficient is lambda of the L1 term."""

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        l1 = (out.f.abs() * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return {"loss": mse + coefficient * l1, "mse": mse, "l1": l1}
