"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, arXiv 2503.17547).

A BatchTopK SAE (baselines/batchtopk.py: the k * B largest pre-activations of the batch in
training, one global threshold at inference) whose dictionary is split into M groups of
latents, [0, end_0), [end_0, end_1), ..., [end_{M-2}, end_{M-1} = d_sae). Prefix m holds the
first m + 1 groups; every prefix must reconstruct the input on its own:

    f        = BatchTopK_k(W_enc (x - b_dec) + b_enc)          (over the whole dictionary)
    x_hat_m  = f[:, :end_m] W_dec[:end_m] + b_dec              m = 0 .. M-1
    L        = sum_m ||x - x_hat_m||^2  +  aux_coefficient * AuxK

(the paper's loss, L(x) = sum_{m in M} ||x - (f(x)_{1:m} W_dec_{1:m} + b_dec)||^2
+ alpha L_aux, with the BatchTopK activation and Gao et al.'s AuxK). Errors are summed over
features and averaged over the batch, as every architecture here (baselines/base.py).

Decisions:
- **Sum, not mean, over prefixes**: the paper's equation sums, and SAE-Lens's
  MatryoshkaBatchTopKTrainingSAE adds each inner level's MSE to the loss. Implementations that
  average (dictionary_learning's trainer weights each prefix 1/M by default) scale the same
  objective by a constant: under Adam that changes only AuxK's relative weight (and epsilon).
- **Group sizes** are fractions of d_sae (`group_fractions`, summing to 1), so one YAML serves
  every width; null gives `n_groups` doubling groups, sizes proportional to 1, 2, 4, ...
  (5 groups: the first holds 1/31 of the latents, the last 16/31). Boundaries are rounded to
  whole latents; a group that would be empty at a small width is merged into the next.
- **"mse"** is the last prefix, the whole dictionary: the same reconstruction as every other
  architecture's "mse", so FVU and the trainer's logs compare across architectures. The inner
  prefixes are named `mse_prefix_0` .. `mse_prefix_{M-2}`; "loss" = mse + their sum + AuxK.
- **AuxK** is TopK's, unchanged (baselines/topk.py): the top k_aux dead latents of the whole
  dictionary reconstruct the full residual x - x_hat_{M-1}, detached, weight 1/32. So its
  gradient is by definition not the derivative of the term (`surrogate_gradients`, inherited);
  every prefix term's gradient is the true derivative.
- Inference, the threshold, b_pre and `fold_scale` are BatchTopK's: the groups only change the
  loss. An exported Matryoshka SAE is a BatchTopK (a JumpReLU with one threshold).

Sparse path: on BatchTopK's sparse training path each inner prefix decodes only the active pairs
of its groups (one sparse decode per group, then running sums), so the step stays sparse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from baselines.base import SAEOutput, squared_error
from baselines.batchtopk import BatchTopKSAE
from baselines.sparse import SparseMode, SparseSAEOutput, make_code, sparse_decode

MAX_GROUPS = 32


def group_ends(d_sae: int, group_fractions: Sequence[float] | None, n_groups: int) -> list[int]:
    """End index (exclusive) of each nested group; the last is d_sae. Fractions are of d_sae;
    None: `n_groups` doubling groups. Empty groups (small widths) merge into the next."""
    if group_fractions is None:
        # More groups than log2(d_sae) + 1 only merge; the bound keeps 2**n finite and cheap.
        if not 1 <= n_groups <= MAX_GROUPS:
            raise ValueError(f"n_groups must be in [1, {MAX_GROUPS}], got {n_groups}")
        fractions = [2.0**i / (2**n_groups - 1) for i in range(n_groups)]
    else:
        fractions = [float(v) for v in group_fractions]
        total = sum(fractions)
        if not fractions or min(fractions) <= 0 or not math.isclose(total, 1.0, rel_tol=1e-6):
            raise ValueError(f"group_fractions must be positive and sum to 1, got {fractions}")
    inner = [math.floor(c * d_sae + 0.5) for c in itertools.accumulate(fractions[:-1])]
    return sorted({end for end in inner if 0 < end < d_sae} | {d_sae})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Args as `BatchTopKSAE`, plus:
    group_fractions: the nested groups' sizes as fractions of d_sae (summing to 1), first group
        first; None: `n_groups` doubling groups.
    n_groups: the number of doubling groups when group_fractions is None."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        k_aux: int | None = None,
        aux_coefficient: float = 1 / 32,
        b_pre_init: Literal["geometric_median", "mean", "zero"] = "geometric_median",
        threshold_momentum: float = 0.99,
        group_fractions: Sequence[float] | None = None,
        n_groups: int = 5,
        sparse: SparseMode = "auto",
    ) -> None:
        # An explicit signature, so a typo in the YAML is caught by the config check.
        super().__init__(
            d_in, d_sae, k, k_aux, aux_coefficient, b_pre_init, threshold_momentum, sparse=sparse
        )
        self.group_ends = group_ends(d_sae, group_fractions, n_groups)

    def prefix_reconstructions(self, out: SAEOutput) -> list[Tensor]:
        """x_hat_m (B, d_in) for the inner prefixes m = 0 .. M-2 (the last one is out.x_hat)."""
        starts = [0, *self.group_ends[:-2]]
        if isinstance(out, SparseSAEOutput):  # decode each group's active pairs only
            code, values = out.code, out.values
            parts = []
            for start, end in zip(starts, self.group_ends[:-1]):
                keep = (code.latents >= start) & (code.latents < end)  # still sorted by token
                group = make_code(code.tokens[keep], code.latents[keep], code.n_tokens, self.d_sae)
                parts.append(sparse_decode(group, values[keep], self.W_dec))  # (B, d_in)
        else:
            parts = [out.f[:, s:e] @ self.W_dec[s:e] for s, e in zip(starts, self.group_ends[:-1])]
        return [part + self.b_dec for part in itertools.accumulate(parts)]

    def loss_terms(
        self, x: Tensor, out: SAEOutput, coefficient: float, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        terms = super().loss_terms(x, out, coefficient, dead_mask)  # loss, mse, auxk
        inner = {
            f"mse_prefix_{m}": squared_error(x, x_hat)
            for m, x_hat in enumerate(self.prefix_reconstructions(out))
        }
        for term in inner.values():
            terms["loss"] = terms["loss"] + term
        return terms | inner
