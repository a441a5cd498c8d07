"""The one small interface every SAE architecture implements.

Owns: the shared parameters (W_enc, b_enc, W_dec, b_dec), their initialisation (docs/method.md:
He-uniform decoder, unit-norm rows, encoder = decoder transpose, zero biases), the forward pass
and the reconstruction term, decoder-norm handling around an optimiser step, and folding the
input-normalisation scalar into the weights.

Must not know: Hydra, the data, the model, the trainer, schedules. The trainer passes the current
sparsity coefficient (after its warm-up) to `loss`; an architecture owns only its `encode` and its
extra loss terms.

Conventions: W_enc is (d_in, d_sae), W_dec is (d_sae, d_in), so row i of W_dec is the decoder
direction d_i of latent i. Losses are summed over the feature dimension and averaged over the
batch, as in docs/method.md (||x - x_hat||^2 summed over dims, mean over batch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class SAEOutput(NamedTuple):
    """Result of `SparseAutoencoder.forward`."""

    x_hat: Tensor  # (B, d_in) reconstruction
    f: Tensor  # (B, d_sae) latent activations (the sparse code)
    pre: Tensor  # (B, d_sae) encoder pre-activations, before the nonlinearity


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over features, averaged over the batch."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()


class SparseAutoencoder(nn.Module):
    """Base class: subclasses implement `encode` and `loss` (and may add parameters).

    Args:
        d_in: width of the activations the SAE reads.
        d_sae: number of latents (dictionary size).
        coefficient: the sparsity coefficient lambda the loss uses when the caller passes none.
            Architectures without one (TopK) ignore it.
    """

    #: Parameters measured in activation units; `fold_scale(c)` multiplies them by c.
    activation_unit_params: tuple[str, ...] = ("b_enc", "b_dec")
    #: True when `loss` needs the trainer's dead-latent mask (TopK's AuxK).
    uses_dead_mask: bool = False
    #: loss term -> parameters whose gradient in that term is, by the method's definition, not
    #: the derivative (straight-through pseudo-derivatives, stop-gradients); "*" = all of them.
    #: Finite-difference tests check every other (term, parameter) pair.
    surrogate_gradients: dict[str, tuple[str, ...]] = {}
    #: True when the architecture aims at the target L0 itself (a target-L0 penalty): the
    #: trainer then leaves lambda uncalibrated.
    aims_at_target_l0: bool = False

    def __init__(self, d_in: int, d_sae: int, coefficient: float = 0.0) -> None:
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae, self.coefficient = d_in, d_sae, float(coefficient)
        W_dec = torch.empty(d_sae, d_in)
        # He-uniform (kaiming) then unit-norm rows: only the directions survive the normalisation.
        nn.init.kaiming_uniform_(W_dec, a=math.sqrt(5))
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # encoder = decoder transpose, then untied
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # --- forward -------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """W_enc (x - b_dec) + b_enc, shape (B, d_sae)."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """The architecture's nonlinearity: pre-activations (B, d_sae) -> latents (B, d_sae)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Activations (B, d_in) -> latents f (B, d_sae)."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: Tensor) -> Tensor:
        """Latents (B, d_sae) -> reconstruction W_dec f + b_dec, shape (B, d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        f = self.activate(pre)
        return SAEOutput(self.decode(f), f, pre)

    def loss(
        self,
        x: Tensor,
        *,
        coefficient: float | None = None,
        dead_mask: Tensor | None = None,
        out: SAEOutput | None = None,
    ) -> dict[str, Tensor]:
        """Every loss term by name; the total is under "loss", the reconstruction under "mse".

        coefficient: lambda for this step (None: the configured `self.coefficient`).
        dead_mask: (d_sae,) bool, latents the trainer counts as dead (used by AuxK).
        out: `self(x)` if the caller already has it (the trainer reuses it for statistics).
        """
        out = self(x) if out is None else out
        lam = self.coefficient if coefficient is None else float(coefficient)
        return self.loss_terms(x, out, lam, dead_mask)

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """The architecture's loss from the forward output: {"loss", "mse", ...named terms}."""
        raise NotImplementedError

    # --- optional hooks (defaults: nothing) ------------------------------------------------
    def init_b_pre(self, sample: Tensor) -> None:
        """The trainer's first-batch hook: called once, with the first training batch (B, d_in),
        before the first step (TopK: b_pre from its geometric median; JumpReLU: quantile
        thresholds). Default: nothing."""

    def set_density(self, x: Tensor, k: float) -> None:
        """Put the code at ~k active latents per token of x, as after training, by the
        architecture's own threshold or bias (`density_quantile`). The planner and
        scripts/bench_train.py time steps there, since an untrained penalised SAE fires on
        about half its latents. Default: nothing (a TopK is at k by construction)."""

    @torch.no_grad()
    def density_quantile(self, x: Tensor, k: float) -> float:
        """The pre-activation value that k x B of x's pre-activations exceed (at least one,
        at most all but one)."""
        pre = self.pre_activations(x).flatten()
        keep = max(1, min(pre.numel() - 1, int(k * x.shape[0])))
        return float(pre.kthvalue(pre.numel() - keep).values)

    # --- decoder norms and other constraints around an optimiser step ------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (docs/method.md)."""
        g = self.W_dec.grad
        if g is not None:
            d = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            g -= (g * d).sum(dim=1, keepdim=True) * d

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm. Subclasses add their own projections."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    # --- input normalisation -------------------------------------------------------------------
    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        """Fold the input normalisation into the weights.

        The SAE was trained on x / c. Afterwards it reads raw x and returns
        x_hat(x) = c * x_hat_trained(x / c), with latents f(x) = c * f_trained(x / c): every
        parameter in activation units (`activation_unit_params`: biases, thresholds) is
        multiplied by c, while W_enc and W_dec are unchanged, so decoder rows keep unit norm
        and the set of active latents (hence L0) is unchanged.
        """
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"fold_scale needs a finite positive scalar, got {c!r}")
        for name in self.activation_unit_params:
            getattr(self, name).mul_(c)
