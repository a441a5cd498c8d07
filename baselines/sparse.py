"""Sparse kernels for SAE steps whose code has few non-zeros per token (TopK, BatchTopK, JumpReLU).

Owns: the sparse code (`SparseCode`: which (token, latent) pairs are non-zero), the two
autograd functions that touch only those pairs, and the rule that picks the sparse or the
dense path (`use_sparse`).

    sampled_pre(pre, code, ...)  values_n = pre[token_n, latent_n] of
                                 pre = (x - b_dec) W_enc + b_enc, computed densely beforehand
                                 (a top-k needs every pre-activation); the backward reaches
                                 only the sampled columns of W_enc and entries of b_enc.
    sparse_decode(code, v, W)    x_hat_b = sum_n [token_n = b] v_n W[latent_n]; the backward
                                 computes the gradient of v (one dot product per pair) and of
                                 the touched rows of W only.

Both are plain PyTorch: `embedding_bag` (a gather-multiply-sum per bag) for every product with
the decoder or encoder rows, and `torch.sparse.sampled_addmm` for the per-pair dot products.
The dense formulas (`pre @ ...`, `f @ W_dec`) stay in the architectures as the reference.

Must not know: any architecture's loss, the trainer.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.base import SAEOutput

SparseMode = bool | Literal["auto"]

# Largest fraction of non-zero (token, latent) pairs at which the sparse path is faster, per
# device type. Measured with `scripts/bench_train.py --crossover --steps 3` (fp32, 2 busy CPU
# cores, 576 -> 4608, batch 4096, whole trainer steps), sparse / dense step speed at density
# 0.4% / 0.9% / 3.5% / 14% / 28%: TopK 1.82 / 2.08 / 1.73 / 1.04 / 0.68x, JumpReLU (dense path
# costlier: more elementwise passes) 2.17 / 1.84 / 1.93 / 1.81 / 1.00x. One crossover for both.
# Not measured on GPUs yet: "auto" keeps the dense path there (`sparse=True` forces it).
MAX_SPARSE_DENSITY: dict[str, float] = {"cpu": 0.15}


def use_sparse(mode: SparseMode, density: float, device: torch.device) -> bool:
    """The path to take: `mode` if it is a bool, else sparse below the measured crossover."""
    if mode != "auto":
        return bool(mode)
    return density <= MAX_SPARSE_DENSITY.get(device.type, 0.0)


def check_mode(mode: object) -> SparseMode:
    if mode not in (True, False, "auto"):
        raise ValueError(f"sparse must be true, false or 'auto', got {mode!r}")
    return mode  # type: ignore[return-value]


class SparseCode(NamedTuple):
    """The non-zero pattern of a (n_tokens, d_sae) code: nnz pairs sorted by token."""

    tokens: Tensor  # (nnz,) int64, ascending
    latents: Tensor  # (nnz,) int64
    token_offsets: Tensor  # (n_tokens + 1,) start of each token's run, then nnz
    by_latent: Tensor  # (nnz,) permutation that groups the pairs by latent (stable)
    latent_offsets: Tensor  # (d_sae,) start of each latent's run in by_latent order

    @property
    def n_tokens(self) -> int:
        return self.token_offsets.numel() - 1

    @property
    def d_sae(self) -> int:
        return self.latent_offsets.numel()


def make_code(tokens: Tensor, latents: Tensor, n_tokens: int, d_sae: int) -> SparseCode:
    """Index bookkeeping for pairs already sorted by token (one stable sort by latent)."""
    per_token = torch.bincount(tokens, minlength=n_tokens)
    token_offsets = torch.cat([per_token.new_zeros(1), per_token.cumsum(0)])
    # int32 keys: the CPU sort of 2e5 int64 keys took 20-350 ms on 2 busy cores, int32 ~2-10 ms.
    keys = latents.to(torch.int32) if d_sae < 2**31 else latents
    by_latent = keys.sort(stable=True).indices
    per_latent = torch.bincount(latents, minlength=d_sae)
    return SparseCode(tokens, latents, token_offsets, by_latent, per_latent.cumsum(0) - per_latent)


def topk_code(indices: Tensor, d_sae: int) -> SparseCode:
    """The code of a per-token top-k: indices (B, k) -> B * k pairs."""
    B, k = indices.shape
    tokens = torch.arange(B, device=indices.device).repeat_interleave(k)
    return make_code(tokens, indices.flatten(), B, d_sae)


def mask_code(mask: Tensor) -> SparseCode:
    """The code of the True entries of a (B, d_sae) mask, in row-major order."""
    tokens, latents = mask.nonzero(as_tuple=True)
    return make_code(tokens, latents, mask.shape[0], mask.shape[1])


def code_if_sparse(mode: SparseMode, mask: Tensor) -> SparseCode | None:
    """The code of `mask`'s pairs when the sparse path is taken for its density, else None."""
    if mode is False:
        return None
    if not use_sparse(mode, int(mask.count_nonzero()) / mask.numel(), mask.device):
        return None
    return mask_code(mask)


def _by_latent_sum(code: SparseCode, table: Tensor, weights: Tensor) -> Tensor:
    """out_i = sum over pairs n with latent i of weights_n * table[token_n]: (d_sae, d)."""
    order = code.by_latent
    return F.embedding_bag(code.tokens[order], table, code.latent_offsets, mode="sum",
                           per_sample_weights=weights[order])  # fmt: skip


class _SampledPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, code, xc, W_enc, b_enc, b_dec):  # type: ignore[override]
        ctx.code = code
        ctx.save_for_backward(xc, W_enc)
        return pre[code.tokens, code.latents]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xc, W_enc = ctx.saved_tensors
        code: SparseCode = ctx.code
        grad = grad.to(W_enc.dtype)  # bf16 under autocast (`pre` was); the weights' dtype here
        # d pre_bi / d W_enc[:, i] = xc_b: column i gets sum_b g_bi xc_b over its sampled tokens.
        grad_W = _by_latent_sum(code, xc, grad).t() if ctx.needs_input_grad[3] else None
        grad_b_enc = grad.new_zeros(code.d_sae).index_add_(0, code.latents, grad)  # (d_sae,)
        # pre depends on b_dec through -b_dec W_enc: sum the pairs first, one mat-vec after.
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[5] else None
        return None, None, None, grad_W, grad_b_enc, grad_b_dec


class _PerLatent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vector, latents):  # type: ignore[override]
        ctx.save_for_backward(latents)
        ctx.d_sae = vector.shape[0]
        return vector[latents]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (latents,) = ctx.saved_tensors
        return grad.new_zeros(ctx.d_sae).index_add_(0, latents, grad), None


def per_latent(vector: Tensor, code: SparseCode) -> Tensor:
    """vector[code.latents] (nnz,) for a (d_sae,) vector (e.g. JumpReLU's thresholds), with a
    reproducible gradient. Plain indexing's backward sums the many pairs of one latent with
    `index_put_(accumulate=True)`, which on a multi-threaded CPU adds them in an order that
    changes from run to run: JumpReLU's thresholds then differed by ~1e-9 after 3 steps, and
    after 312 steps at lr 4e-3 one run's held-out L0 by 0.9% and its delta LM loss by 8%. `index_add_` on a vector adds them in
    pair order, so a run is bit-identical in every process (tests/test_sparse.py)."""
    return _PerLatent.apply(vector, code.latents)


def sampled_pre(
    pre: Tensor, code: SparseCode, xc: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor
) -> Tensor:
    """pre[tokens, latents] (nnz,) for pre = xc @ W_enc + b_enc with xc = x - b_dec, where `pre`
    was computed from exactly these tensors; gradients reach W_enc, b_enc, b_dec sparsely."""
    return _SampledPre.apply(pre.detach(), code, xc.detach(), W_enc, b_enc, b_dec)  # type: ignore[no-any-return]


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, code, values, W_dec):  # type: ignore[override]
        ctx.code = code
        ctx.save_for_backward(values, W_dec)
        return F.embedding_bag(code.latents, W_dec, code.token_offsets[:-1], mode="sum",
                               per_sample_weights=values)  # fmt: skip

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        code: SparseCode = ctx.code
        grad, values = grad.contiguous(), values.detach()
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:  # one dot product <grad_b, W_dec[i]> per pair (b, i)
            with warnings.catch_warnings():  # "sparse CSR support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(code.token_offsets, code.latents, values,
                                                  (code.n_tokens, code.d_sae),
                                                  check_invariants=False)  # fmt: skip
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.t(), beta=0.0).values()
        if ctx.needs_input_grad[2]:  # row i: sum_b v_bi grad_b over the tokens that use it
            grad_W = _by_latent_sum(code, grad, values)
        return None, grad_values, grad_W


def sparse_decode(code: SparseCode, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum_n values_n W_dec[latents_n] per token: (n_tokens, d_in), without b_dec."""
    # values come out of autocast's bf16 encoder product (train.precision=bf16); embedding_bag
    # needs them in W_dec's dtype (autocast does not cover it). A no-op in fp32.
    return _SparseDecode.apply(code, values.to(W_dec.dtype), W_dec)  # type: ignore[no-any-return]


def dense_code(code: SparseCode, values: Tensor, like: Tensor) -> Tensor:
    """The (n_tokens, d_sae) code as a dense tensor, differentiable in `values`."""
    return like.new_zeros(code.n_tokens, code.d_sae).index_put((code.tokens, code.latents), values)


class SparseSAEOutput(SAEOutput):
    """An `SAEOutput` (still the same 3-tuple) that also carries the sparse code and its values,
    so that the loss can use them: `code` and `values` (nnz,), differentiable."""

    code: SparseCode
    values: Tensor


def sparse_output(x_hat: Tensor, f: Tensor, pre: Tensor, code: SparseCode, values: Tensor):
    out = SparseSAEOutput(x_hat, f, pre)
    out.code, out.values = code, values
    return out


def sparse_forward(sae, x: Tensor, values_of) -> SAEOutput:
    """The forward pass of an SAE with a sparse path (TopK, BatchTopK, JumpReLU): the dense
    pre-activations, then `sae.active_code(pre)` picks the path. Dense: `sae.activate(pre)`.
    Sparse: `values_of(z, code)` turns the sampled pre-activations z (nnz,) of the code's pairs
    into latent values, and the decoder reads only those rows."""
    pre = sae.pre_activations(x)  # (B, d_sae), dense, still differentiable for any caller
    code = sae.active_code(pre.detach())
    if code is None:
        f = sae.activate(pre)
        return SAEOutput(sae.decode(f), f, pre)
    z = sampled_pre(pre, code, x - sae.b_dec, sae.W_enc, sae.b_enc, sae.b_dec)  # (nnz,)
    values = values_of(z, code)
    x_hat = sparse_decode(code, values, sae.W_dec) + sae.b_dec
    return sparse_output(x_hat, dense_code(code, values, pre), pre, code, values)
