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

Sparse path (`sparse`, baselines/sparse.py): every term is zero, with zero gradient, outside the
gate's support {(b, i): pi_gate_bi > 0}: f = H(pi_gate) ReLU(pi_mag) vanishes there, and so do
ReLU(pi_gate) in the RI-L1 and auxiliary terms (H and ReLU have zero derivative below 0). So
only the encoder product u = W_gate (x - b_dec) stays dense (the gate needs every entry); the
decoder, the auxiliary decoder and the whole backward run over the support's pairs, with the
same formulas. "auto" measures the support's density in each batch and takes the sparse path
below the device's crossover (`baselines.sparse.use_sparse`); early in training, when about
half of the gates are open, that is the dense path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.base import SAEOutput, SparseAutoencoder, squared_error
from baselines.sparse import (
    SparseCode,
    SparseMode,
    check_mode,
    code_if_sparse,
    dense_code,
    per_latent,
    sampled_pre,
    sparse_decode,
    sparse_output,
)


class GatedSAE(SparseAutoencoder):
    """Gated SAE. Args as `SparseAutoencoder`; coefficient is lambda of the RI-L1 term;
    sparse: True (sparse decoders and backward), False (dense reference) or "auto"."""

    activation_unit_params = ("b_gate", "b_mag", "b_dec")
    surrogate_gradients = {"aux": ("W_dec", "b_dec"), "loss": ("W_dec", "b_dec")}  # stop-grad

    def __init__(
        self, d_in: int, d_sae: int, coefficient: float = 0.0, sparse: SparseMode = "auto"
    ) -> None:
        super().__init__(d_in, d_sae, coefficient)
        self.sparse = check_mode(sparse)
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

    @torch.no_grad()
    def set_density(self, x: Tensor, k: float) -> None:
        """The gate bias shifted so that ~k gates per token of x are open."""
        self.b_gate.sub_(self.density_quantile(x, k))

    def active_code(self, pi_gate: Tensor) -> SparseCode | None:
        """The gate's support {pi_gate > 0} when the sparse path is taken, else None."""
        return code_if_sparse(self.sparse, pi_gate > 0)

    def forward(self, x: Tensor) -> SAEOutput:
        xc = x - self.b_dec
        u = xc @ self.W_enc  # (B, d_sae): one encoder product serves both paths
        pi_gate = u + self.b_gate
        code = self.active_code(pi_gate.detach())
        if code is None:
            pi_mag = u * self.r_mag.exp() + self.b_mag
            f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
            return SAEOutput(self.decode(f), f, pi_gate)
        # u at the support's pairs; its backward reaches W_enc and b_dec through those pairs only.
        u_n = sampled_pre(u, code, xc, self.W_enc, torch.zeros_like(self.b_gate), self.b_dec)
        gate_n = u_n + per_latent(self.b_gate, code)  # pi_gate > 0 on every pair
        f_n = torch.relu(u_n * per_latent(self.r_mag.exp(), code) + per_latent(self.b_mag, code))
        x_hat = sparse_decode(code, f_n, self.W_dec) + self.b_dec
        out = sparse_output(x_hat, dense_code(code, f_n, pi_gate), pi_gate, code, f_n)
        out.gate_values = gate_n  # type: ignore[attr-defined]
        return out

    def encode(self, x: Tensor) -> Tensor:
        return self.forward(x).f

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        norms = self.W_dec.norm(dim=1)  # (d_sae,)
        code: SparseCode | None = getattr(out, "code", None)
        if code is None:
            gate_act = torch.relu(out.pre)  # ReLU(pi_gate), (B, d_sae)
            sparsity = (gate_act * norms).sum(dim=-1).mean()
            x_hat_frozen = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        else:  # ReLU(pi_gate) is pi_gate on the support and 0 (no gradient) elsewhere
            gate_n: Tensor = out.gate_values  # type: ignore[attr-defined]
            sparsity = (gate_n * per_latent(norms, code)).sum() / code.n_tokens
            x_hat_frozen = sparse_decode(code, gate_n, self.W_dec.detach()) + self.b_dec.detach()
        aux = squared_error(x, x_hat_frozen)
        return {"loss": mse + coefficient * sparsity + aux, "mse": mse, "l1": sparsity, "aux": aux}
