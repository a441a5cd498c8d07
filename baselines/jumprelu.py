"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435), exactly as in docs/method.md,
plus two later variants of its sparsity loss and a data-driven threshold init (options below).

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

Variants (`sparsity_loss`; the default "l0" is the paper's loss above, unchanged). Sums over
latents i, means over the batch; d_i is decoder row i (unit norm after every step here, so its
norm changes values only between steps and its gradient is projected out; kept for fidelity).

  "tanh" (conf/sae/jumprelu_tanh.yaml): Anthropic, "Circuits Updates - January 2025",
  transformer-circuits.pub/2025/january-update (dictionary-learning section); the same form as
  SAE-Lens's `jumprelu_sparsity_loss_mode="tanh"` with `pre_act_loss_coefficient`:

    L = ||x - x_hat||^2 + lambda * sum_i tanh(c * f_i * ||d_i||)
                        + lambda_p * sum_i ReLU(theta_i - pre_i) * ||d_i||

  (Anthropic write |f_i| and store log thresholds; f >= 0 here.) The tanh term reaches theta
  through f (the JumpReLU pseudo-derivative above) and the encoder through d/dz f = H; the
  pre-activation term is an ordinary (piecewise-linear) function of theta, pre (so W_enc, b_enc,
  b_dec) and ||d_i||: the one term that pulls a never-firing latent towards its threshold.
  Defaults: lambda_p = 3e-6 (SAE-Lens: "to match Anthropic's setup") and c = 4 (SAE-Lens's
  default; the value on Anthropic's page was not read here), both at Anthropic's input scale
  E||x|| = sqrt(d_in). This suite trains on E||x||^2 = 1, i.e. on ~x / sqrt(d_in), so with
  `anthropic_units` the class uses c = c * sqrt(d_in), lambda_p = lambda_p / sqrt(d_in): the
  same loss up to an overall factor d_in (and lambda / d_in), which Adam ignores. Not taken from
  their recipe: the STE gradient into pre ("to all model parameters"), their bandwidth 2.0 and
  threshold init 0.1 (2/sqrt(d_in), 0.1/sqrt(d_in) here), lambda warm-up over the whole run.
  SAE-Lens applies the pre-activation term to dead latents only; Anthropic and this class to all.

  "target_l0" (conf/sae/jumprelu_target_l0.yaml): a quadratic penalty on the batch L0 around a
  target, so that the architecture aims at the L0 itself (`aims_at_target_l0`):

    L = ||x - x_hat||^2 + lambda * (L0 / L0_target - 1)^2,   L0 = mean_b sum_i H(pre_bi - theta_i)

  with L0's pseudo-derivative above (it trains theta only). The Gemma Scope 2 technical paper
  (McDougall et al., Google DeepMind, 2025) trains with a quadratic L0 penalty around a target
  (SAE-Lens PR #732 adds it as mode "quadratic"); its exact form could NOT be confirmed here, so
  this is the form of saprmarks/dictionary_learning's JumpReLU trainer,
  `sparsity_coefficient * (l0 / target_l0 - 1)^2`.

Threshold init (`threshold_init_mode`): "constant" (theta_i = threshold_init, the paper) or
"quantile": on the first training batch (B tokens; the trainer's step-0 hook `init_b_pre`)
theta_i = the k-th smallest pre_i, k = round((B + 1) * (1 - L0_target / d_sae)) clamped to
[1, B], so that a new token exceeds it with probability (B + 1 - k) / (B + 1) ~ L0_target /
d_sae and the initial expected L0 is ~ L0_target (the batch's own L0 is d_sae (B - k) / B).
Quantiles below min_threshold are clamped to it (those latents fire more often).

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
The variants keep it exact: the tanh term reads the same sampled values (tanh(0) = 0 elsewhere),
the quadratic reads the same L0, and the pre-activation term reads the dense pre (so its
encoder gradient is dense).
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
    code_if_sparse,
    per_latent,
    sparse_forward,
)

SparsityLoss = Literal["l0", "tanh", "target_l0"]


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


def _finite(name: str, value: float, low: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return value


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE.

    Args:
        d_in, d_sae, coefficient: see `SparseAutoencoder`; coefficient is lambda of the
            sparsity term (L0, tanh or quadratic, per `sparsity_loss`).
        bandwidth: eps of the rectangle kernel (paper: 0.001).
        threshold_init: initial theta for every latent (paper: 0.001).
        threshold_param: "direct" (train theta, default) or "log" (train log theta).
        min_threshold: lower clamp of theta after each step in "direct" mode (keeps theta > 0).
        sparse: True (sparse decoder and backward), False (dense reference) or "auto".
        sparsity_loss: "l0" (the paper), "tanh" (Anthropic) or "target_l0" (quadratic around
            target_l0); see the module docstring.
        tanh_scale: c of the tanh term.
        pre_act_coefficient: lambda_p of the pre-activation term (0: no term).
        anthropic_units: tanh_scale and pre_act_coefficient are given at Anthropic's input
            scale E||x|| = sqrt(d_in) and converted to the suite's E||x||^2 = 1.
        target_l0: the L0 aimed at, for sparsity_loss="target_l0" and the quantile init.
        threshold_init_mode: "constant" (threshold_init) or "quantile" (from the first batch).
    """

    activation_unit_params = ("b_enc", "b_dec")  # theta is folded in fold_scale below
    surrogate_gradients = {
        t: ("raw_threshold",)
        for t in ("loss", "mse", "l0_penalty", "tanh_penalty", "target_l0_penalty")
    }

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
        sparsity_loss: SparsityLoss = "l0",
        tanh_scale: float = 4.0,
        pre_act_coefficient: float = 0.0,
        anthropic_units: bool = False,
        target_l0: float | None = None,
        threshold_init_mode: Literal["constant", "quantile"] = "constant",
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
        self._init_variants(sparsity_loss, tanh_scale, pre_act_coefficient, anthropic_units,
                            target_l0, threshold_init_mode)  # fmt: skip

    def _init_variants(self, sparsity_loss: str, tanh_scale: float, pre_act_coefficient: float,
                       anthropic_units: bool, target_l0: float | None,
                       threshold_init_mode: str) -> None:  # fmt: skip
        """Check and store the variant options; c and lambda_p at the suite's input scale."""
        if sparsity_loss not in ("l0", "tanh", "target_l0"):
            raise ValueError(f"sparsity_loss must be l0, tanh or target_l0: {sparsity_loss!r}")
        if threshold_init_mode not in ("constant", "quantile"):
            raise ValueError(
                f"threshold_init_mode must be constant or quantile: {threshold_init_mode!r}"
            )
        if not isinstance(anthropic_units, bool):
            raise ValueError(f"anthropic_units must be true or false, got {anthropic_units!r}")
        needs_target = sparsity_loss == "target_l0" or threshold_init_mode == "quantile"
        if needs_target and target_l0 is None:
            what = "sparsity_loss=target_l0" if sparsity_loss == "target_l0" else "quantile init"
            raise ValueError(f"{what} needs target_l0: use a target-L0 entry (sparsity=l0_N)")
        if target_l0 is not None:
            target_l0 = _finite("target_l0", target_l0, 0.0)
            if not 0 < target_l0 <= self.d_sae:
                raise ValueError(f"target_l0={target_l0:g} must be in (0, d_sae={self.d_sae}]")
        scale = math.sqrt(self.d_in) if anthropic_units else 1.0
        self.sparsity_loss, self.threshold_init_mode = sparsity_loss, threshold_init_mode
        self.target_l0 = target_l0
        self.c = _finite("tanh_scale", tanh_scale, 0.0) * scale  # c at E||x||^2 = 1
        self.lambda_p = _finite("pre_act_coefficient", pre_act_coefficient, 0.0) / scale
        # The architecture aims at target_l0 itself: an outer lambda controller is redundant.
        self.aims_at_target_l0 = sparsity_loss == "target_l0"

    @property
    def threshold(self) -> Tensor:
        """theta, shape (d_sae,)."""
        return self.raw_threshold.exp() if self.threshold_param == "log" else self.raw_threshold

    @torch.no_grad()
    def set_density(self, x: Tensor, k: float) -> None:
        """Every threshold at the pre-activation quantile that leaves ~k latents per token."""
        theta = max(self.density_quantile(x, k), self.min_threshold)
        self.raw_threshold.fill_(math.log(theta) if self.threshold_param == "log" else theta)

    @torch.no_grad()
    def init_b_pre(self, sample: Tensor) -> None:
        """The trainer's first-batch hook (there is no b_pre here): with threshold_init_mode
        "quantile", theta_i = the order statistic of pre_i on `sample` (B, d_in) described in
        the module docstring; otherwise nothing."""
        if self.threshold_init_mode != "quantile":
            return
        assert self.target_l0 is not None  # checked in __init__
        pre = self.pre_activations(sample)  # (B, d_sae)
        B = pre.shape[0]
        k = min(max(round((B + 1) * (1 - self.target_l0 / self.d_sae)), 1), B)
        theta = pre.kthvalue(k, dim=0).values.float().clamp_min(self.min_threshold)  # (d_sae,)
        self.raw_threshold.copy_(theta.log() if self.threshold_param == "log" else theta)

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
        return code_if_sparse(
            self.sparse, pre > theta - (0.51 * self.bandwidth + 1e-5 * theta.abs())
        )

    def forward(self, x: Tensor) -> SAEOutput:
        return sparse_forward(
            self, x, lambda z, code: jumprelu(z, per_latent(self.threshold, code), self.bandwidth)
        )

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        terms = {"mse": squared_error(x, out.x_hat)}
        if self.sparsity_loss == "tanh":
            sparsity = terms["tanh_penalty"] = self.tanh_penalty(out)
        else:
            sparsity = terms["l0_penalty"] = self.l0(out)
            if self.sparsity_loss == "target_l0":
                assert self.target_l0 is not None  # checked in __init__
                sparsity = terms["target_l0_penalty"] = (sparsity / self.target_l0 - 1) ** 2
        loss = terms["mse"] + coefficient * sparsity
        if self.lambda_p > 0:
            terms["pre_act"] = self.pre_act_loss(out)
            loss = loss + self.lambda_p * terms["pre_act"]
        return {"loss": loss, **terms}

    def l0(self, out: SAEOutput) -> Tensor:
        """||f||_0 (mean over the batch) with the pseudo-derivative for theta only."""
        # L0 on the forward pass's own pre-activations, detached: see the module docstring.
        code: SparseCode | None = getattr(out, "code", None)
        if code is None:
            return step(out.pre.detach(), self.threshold, self.bandwidth).sum(dim=-1).mean()
        # The pairs outside the code are below the window: H = 0 and no gradient.
        z = out.pre.detach()[code.tokens, code.latents]  # (nnz,)
        return step(z, per_latent(self.threshold, code), self.bandwidth).sum() / code.n_tokens

    def tanh_penalty(self, out: SAEOutput) -> Tensor:
        """sum_i tanh(c * f_i * ||d_i||), mean over the batch."""
        norms = self.W_dec.norm(dim=1)  # (d_sae,)
        code: SparseCode | None = getattr(out, "code", None)
        if code is None:
            return torch.tanh(self.c * out.f * norms).sum(dim=-1).mean()
        values: Tensor = out.values  # type: ignore[attr-defined]  # (nnz,), f = 0 elsewhere
        return torch.tanh(self.c * values * per_latent(norms, code)).sum() / code.n_tokens

    def pre_act_loss(self, out: SAEOutput) -> Tensor:
        """sum_i ReLU(theta_i - pre_i) * ||d_i||, mean over the batch (dense pre)."""
        norms = self.W_dec.norm(dim=1)  # (d_sae,)
        return (torch.relu(self.threshold - out.pre) * norms).sum(dim=-1).mean()

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
