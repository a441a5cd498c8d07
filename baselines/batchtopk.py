"""BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410): TopK over the whole batch.

Training: keep the k * B largest pre-activations of the batch (B tokens) and ReLU them, so L0
is k on average over the batch but varies per token. Inference: one global threshold theta,
f = pre * H(pre - theta), so a token's code does not depend on the rest of its batch. theta is
an exponential moving average (`threshold_momentum`) of the smallest positive activation kept
in each training batch. AuxK, initialisation, b_pre and the sparse training path are TopK's (this class extends it);
at inference the threshold code takes the dense path.

This file is also the worked example of adding a baseline by config (README,
docs/architectures.md): one class here and one YAML, conf/sae/batchtopk.yaml.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from baselines.sparse import SparseCode, SparseMode, make_code, use_sparse
from baselines.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """Args as `TopKSAE` (sparse included), plus threshold_momentum for the inference
    threshold's moving average."""

    activation_unit_params = ("b_enc", "b_dec", "threshold")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        k_aux: int | None = None,
        aux_coefficient: float = 1 / 32,
        b_pre_init: Literal["geometric_median", "mean", "zero"] = "geometric_median",
        threshold_momentum: float = 0.99,
        sparse: SparseMode = "auto",
    ) -> None:
        # An explicit signature (not *args, **kwargs), so that a typo in conf/sae/batchtopk.yaml
        # is caught by the config check before any work.
        super().__init__(d_in, d_sae, k, k_aux, aux_coefficient, b_pre_init, sparse=sparse)
        if not 0.0 <= threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        self.threshold_momentum = float(threshold_momentum)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def activate(self, pre: Tensor) -> Tensor:
        if not self.training:
            return pre * (pre > self.threshold.clamp_min(0.0)).to(pre.dtype)
        flat = pre.flatten()
        top = flat.topk(self.k * pre.shape[0])
        f = torch.zeros_like(flat).scatter(0, top.indices, torch.relu(top.values)).view_as(pre)
        self._update_threshold(top.values)
        return f

    def active_code(self, pre: Tensor) -> SparseCode | None:
        """The k * B kept pairs of a training batch, sorted by token; None on the dense path."""
        if not self.training or not use_sparse(self.sparse, self.k / self.d_sae, pre.device):
            return None
        top = pre.flatten().topk(self.k * pre.shape[0])
        self._update_threshold(top.values)
        flat = top.indices.sort(stable=True).values  # row-major order = sorted by token
        return make_code(flat // self.d_sae, flat % self.d_sae, pre.shape[0], self.d_sae)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            m = self.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)
