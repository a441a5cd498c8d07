"""The classic ReLU (L1) SAE, the reference point SAE papers report.

    f = ReLU(W_enc (x - b_dec) + b_enc)         x_hat = W_dec f + b_dec
    L = ||x - x_hat||^2 + lambda * sum_i |f_i| * ||d_i||

The L1 term is weighted by decoder row norms (d_i = row i of W_dec), so it cannot be gamed by
shrinking latents and growing decoder rows; with unit-norm rows the weights are 1 in value but
still carry their gradient.

Sparse path (`sparse`, baselines/sparse.py): f, the L1 term and every gradient vanish outside the
pairs with pre > 0, so once training has made the code sparse the encoder product is the only
dense one; the decoder and the backward run over those pairs ("auto": below the device's
measured crossover density, `baselines.sparse.use_sparse`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from baselines.base import SAEOutput, SparseAutoencoder, squared_error
from baselines.sparse import (
    SparseCode,
    SparseMode,
    check_mode,
    code_if_sparse,
    per_latent,
    sparse_forward,
)


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE. Args as `SparseAutoencoder`; coefficient is lambda of the L1 term;
    sparse: True (sparse decoder and backward), False (dense reference) or "auto"."""

    def __init__(
        self, d_in: int, d_sae: int, coefficient: float = 0.0, sparse: SparseMode = "auto"
    ) -> None:
        super().__init__(d_in, d_sae, coefficient)
        self.sparse = check_mode(sparse)

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def pre_activations(self, x: Tensor) -> Tensor:
        """As the base class, with the bias added inside the matmul (one pass less)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    @torch.no_grad()
    def set_density(self, x: Tensor, k: float) -> None:
        """The encoder bias shifted so that ~k latents per token of x are positive."""
        self.b_enc.sub_(self.density_quantile(x, k))

    def active_code(self, pre: Tensor) -> SparseCode | None:
        """The pairs with pre > 0 when the sparse path is taken, else None."""
        return code_if_sparse(self.sparse, pre > 0)

    def forward(self, x: Tensor) -> SAEOutput:
        return sparse_forward(self, x, lambda z, code: torch.relu(z))

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        norms = self.W_dec.norm(dim=1)  # (d_sae,)
        code: SparseCode | None = getattr(out, "code", None)
        if code is None:
            l1 = (out.f.abs() * norms).sum(dim=-1).mean()
        else:  # f = 0 outside the code's pairs
            values: Tensor = out.values  # type: ignore[attr-defined]
            l1 = (values.abs() * per_latent(norms, code)).sum() / code.n_tokens
        return {"loss": mse + coefficient * l1, "mse": mse, "l1": l1}
