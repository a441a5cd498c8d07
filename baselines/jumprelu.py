"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435), exactly as in docs/method.md.

    pre = W_enc (x - b_dec) + b_enc
    f   = JumpReLU_theta(pre) = pre * H(pre - theta)        one threshold theta_i > 0 per latent
    L   = ||x - x_hat||^2 + lambda * ||f||_0

Straight-through pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2], bandwidth eps:

    d/dtheta JumpReLU_theta(z) := -(theta / eps) * K((z - theta) / eps)
    d/dtheta H(z - theta)      := -(1 / eps) * K((z - theta) / eps)
    d/dz JumpReLU_theta(z)     := H(z - theta)        d/dz H(z - theta) := 0

The L0 term is computed on the *same* pre-activations as the forward pass, passed through
`.detach()`: since d/dz of H is 0 by the definition above, this changes no gradient value, it only
makes structural the paper's statement that the L0 term trains the thresholds alone and the
encoder learns from the reconstruction term only.

Threshold storage (`threshold_param`): "direct" (default) trains theta itself in fp32 and
clamps it to >= `min_threshold` after each optimiser step; "log" trains log(theta) as in the
paper's released code. The default is "direct" because with eps = 1e-3 Adam moves log(theta) by
~lr per step, i.e. theta by a relative ~lr: at short (CPU-length) runs the thresholds barely
move (docs/method.md, "known trap"). In "log" mode the chain rule through exp is applied by autograd
on top of the pseudo-derivative with respect to theta.

Sparse path (`sparse`, baselines/sparse.py): every gradient above is zero outside the pairs
(token, latent) that are active (pre > theta) or inside the kernel window
(|pre - theta| < eps / 2). The encoder product stays dense; the decoder, the L0 term and the
whole backward then run over those pairs only, with the same pseudo-derivatives (`_JumpReLU`
and `_Step` applied to the sampled pre-activations). "auto" measures the pairs' density in
each batch and takes the sparse path below the device's crossover (`baselines.sparse.use_sparse`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from baselines.base import SAEOutput, SparseAutoencoder, squared_error
from baselines.sparse import (
    SparseCode,
    SparseMode,
    check_mode,
    dense_code,
    mask_code,
    sampled_pre,
    sparse_decode,
    sparse_output,
    use_sparse,
)


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 if |u| < 1/2 else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = (z > theta).to(z.dtype) * grad
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return grad_z, grad_theta.sum_to_size(theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), grad_theta.sum_to_size(theta.shape), None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """z * H(z - theta) with the straight-through pseudo-derivative for theta."""
    return _JumpReLU.apply(z, theta, bandwidth)  # type: ignore[no-any-return]


def step(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """H(z - theta) with the straight-through pseudo-derivative for theta (none for z)."""
    return _Step.apply(z, theta, bandwidth)  # type: ignore[no-any-return]


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE.

    Args:
        d_in, d_sae, coefficient: see `SparseAutoencoder`; coefficient is lambda of the L0 term.
        bandwidth: eps of the rectangle kernel (paper: 0.001).
        threshold_init: initial theta for every latent (paper: 0.001).
        threshold_param: "direct" (train theta, default) or "log" (train log theta).
        min_threshold: lower clamp of theta after each step in "direct" mode (keeps theta > 0).
        sparse: True (sparse decoder and backward), False (dense reference) or "auto".
    """

    activation_unit_params = ("b_enc", "b_dec")  # theta is folded in fold_scale below
    surrogate_gradients = {t: ("raw_threshold",) for t in ("loss", "mse", "l0_penalty")}

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        coefficient: float = 0.0,
        bandwidth: float = 0.001,
        threshold_init: float = 0.001,
        threshold_param: Literal["direct", "log"] = "direct",
        min_threshold: float = 1e-6,
        sparse: SparseMode = "auto",
    ) -> None:
        super().__init__(d_in, d_sae, coefficient)
        self.sparse = check_mode(sparse)
        if bandwidth <= 0 or threshold_init <= 0:
            raise ValueError(
                f"bandwidth and threshold_init must be > 0, got {bandwidth}, {threshold_init}"
            )
        if threshold_param not in ("direct", "log"):
            raise ValueError(f"threshold_param must be 'direct' or 'log', got {threshold_param!r}")
        self.bandwidth, self.threshold_param = float(bandwidth), threshold_param
        self.min_threshold = float(min_threshold)
        init = torch.full((d_sae,), float(threshold_init), dtype=torch.float32)  # fp32 always
        self.raw_threshold = nn.Parameter(init.log() if threshold_param == "log" else init)

    @property
    def threshold(self) -> Tensor:
        """theta, shape (d_sae,)."""
        return self.raw_threshold.exp() if self.threshold_param == "log" else self.raw_threshold

    def activate(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    def pre_activations(self, x: Tensor) -> Tensor:
        """As the base class, with the bias added inside the matmul (one pass less)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def active_code(self, pre: Tensor) -> SparseCode | None:
        """Pairs that are active or inside the kernel window, when the sparse path is taken."""
        if self.sparse is False:
            return None
        # One comparison per pre-activation, with a margin: every pair with pre > theta or
        # |pre - theta| / eps < 1/2 (as `rectangle` rounds it) has pre > theta - 0.51 eps;
        # extra pairs just below the window only carry zero values and zero gradients.
        theta = self.threshold.detach()
        near = pre > theta - (0.51 * self.bandwidth + 1e-5 * theta.abs())  # (B, d_sae)
        density = int(near.count_nonzero()) / near.numel()
        if not use_sparse(self.sparse, density, pre.device):
            return None
        return mask_code(near)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)  # (B, d_sae), dense, still differentiable for any caller
        code = self.active_code(pre.detach())
        if code is None:
            f = self.activate(pre)
            return SAEOutput(self.decode(f), f, pre)
        z = sampled_pre(pre, code, x - self.b_dec, self.W_enc, self.b_enc, self.b_dec)  # (nnz,)
        values = jumprelu(z, self.threshold[code.latents], self.bandwidth)
        x_hat = sparse_decode(code, values, self.W_dec) + self.b_dec
        return sparse_output(x_hat, dense_code(code, values, pre), pre, code, values)

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        mse = squared_error(x, out.x_hat)
        # L0 on the forward pass's own pre-activations, detached: see the module docstring.
        code: SparseCode | None = getattr(out, "code", None)
        if code is None:
            l0 = step(out.pre.detach(), self.threshold, self.bandwidth).sum(dim=-1).mean()
        else:  # the pairs outside the code are below the window: H = 0 and no gradient
            z = out.pre.detach()[code.tokens, code.latents]  # (nnz,)
            l0 = step(z, self.threshold[code.latents], self.bandwidth).sum() / code.n_tokens
        return {"loss": mse + coefficient * l0, "mse": mse, "l0_penalty": l0}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.threshold_param == "direct":
            self.raw_threshold.clamp_(min=self.min_threshold)

    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        super().fold_scale(c)
        if self.threshold_param == "log":
            self.raw_threshold.add_(math.log(c))
        else:
            self.raw_threshold.mul_(c)
