"""The sparse path of TopK, BatchTopK, JumpReLU (with each of its sparsity losses), ReLU and
Gated (baselines/sparse.py) against the dense one.

The dense formulas are the reference: for random inputs at a few shapes the sparse path gives
the same outputs, loss terms and parameter gradients (float64, 1e-5 relative), with and without
AuxK's dead latents, and ~20 training steps end at the same weights.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from baselines.batchtopk import BatchTopKSAE
from baselines.gated import GatedSAE
from baselines.jumprelu import JumpReLUSAE
from baselines.relu import ReLUSAE
from baselines.sparse import MAX_SPARSE_DENSITY, SparseSAEOutput, mask_code, per_latent, use_sparse
from baselines.topk import TopKSAE
from benchmark.train import Sparsity, TrainConfig, train_sae
from tests.helpers import ROOT

SHAPES = [(12, 50, 64), (20, 96, 33), (7, 200, 5)]  # (d_in, d_sae, batch)
# The JumpReLU sparsity losses (baselines/jumprelu.py); the pre-activation term reads the dense pre.
JUMPRELU_VARIANTS = {
    "jumprelu": {},
    "jumprelu_tanh": {"sparsity_loss": "tanh", "tanh_scale": 4.0, "pre_act_coefficient": 0.05},
    "jumprelu_target_l0": {"sparsity_loss": "target_l0", "target_l0": 4.0},
}


def _make(arch: str, d_in: int, d_sae: int, **kw):
    """A float64 SAE on the dense path with non-trivial biases and thresholds."""
    torch.manual_seed(d_in * d_sae)
    if arch == "topk":
        sae = TopKSAE(d_in, d_sae, k=6, k_aux=9, sparse=False, **kw)
    elif arch == "batchtopk":
        sae = BatchTopKSAE(d_in, d_sae, k=6, k_aux=9, sparse=False, **kw)
    elif arch == "relu":
        sae = ReLUSAE(d_in, d_sae, coefficient=0.3, sparse=False, **kw)
    elif arch == "gated":
        sae = GatedSAE(d_in, d_sae, coefficient=0.3, sparse=False, **kw)
    else:
        sae = JumpReLUSAE(d_in, d_sae, coefficient=0.3, bandwidth=0.1, threshold_init=0.1,
                          sparse=False, **JUMPRELU_VARIANTS[arch], **kw)  # fmt: skip
    sae = sae.double()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        if arch == "gated":  # negative gate biases: a code about as sparse as the others'
            sae.b_gate.normal_(-0.3, 0.1)
            sae.b_mag.normal_(0, 0.1)
            sae.r_mag.normal_(0, 0.3)
        else:
            sae.b_enc.normal_(-0.3 if arch == "relu" else 0, 0.1)
        if arch.startswith("jumprelu"):
            sae.raw_threshold.uniform_(0.02, 0.3)
            if sae.threshold_param == "log":
                sae.raw_threshold.log_()
    return sae


def _pair(arch: str, d_in: int, d_sae: int, **kw):
    dense = _make(arch, d_in, d_sae, **kw)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    return dense, sparse


def _loss_and_grads(sae, x, dead):
    sae.zero_grad(set_to_none=True)
    terms = sae.loss(x, coefficient=0.3, dead_mask=dead)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(b[name] / scale, a[name] / scale, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


ARCHS = ["topk", "batchtopk", *JUMPRELU_VARIANTS, "relu", "gated"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_loss_and_gradients_equal_dense(arch, shape, with_dead):
    d_in, d_sae, batch = shape
    dense, sparse = _pair(arch, d_in, d_sae)
    x = torch.randn(batch, d_in, dtype=torch.float64) * 0.5
    dead = None
    if with_dead and dense.uses_dead_mask:
        dead = torch.arange(d_sae) % 3 == 0
    elif with_dead:  # JumpReLU, ReLU, Gated: no AuxK; vary the input scale instead
        x = x * 3
    out_d, out_s = dense(x), sparse(x)
    assert isinstance(out_s, SparseSAEOutput) and not isinstance(out_d, SparseSAEOutput)
    assert torch.equal(out_s.f, out_d.f) and torch.equal(out_s.pre, out_d.pre)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-10, atol=1e-12)
    terms_d, grads_d = _loss_and_grads(dense, x, dead)
    terms_s, grads_s = _loss_and_grads(sparse, x, dead)
    if dead is not None:
        assert terms_d["auxk"] > 0  # AuxK really ran
    _assert_same(terms_d, terms_s)
    _assert_same(grads_d, grads_s)


def test_jumprelu_log_threshold_sparse_equals_dense():
    dense, sparse = _pair("jumprelu", 12, 50, threshold_param="log")
    x = torch.randn(64, 12, dtype=torch.float64) * 0.5
    terms_d, grads_d = _loss_and_grads(dense, x, None)
    terms_s, grads_s = _loss_and_grads(sparse, x, None)
    _assert_same(terms_d, terms_s)
    _assert_same(grads_d, grads_s)
    assert grads_s["raw_threshold"].abs().sum() > 0  # the kernel window was hit


def test_sparse_topk_gradients_match_finite_differences():
    """Without AuxK every TopK gradient is a true derivative: gradcheck the sparse kernels."""
    _, sae = _pair("topk", 6, 30)
    x = torch.randn(5, 6, dtype=torch.float64)
    names = [n for n, _ in sae.named_parameters()]

    def loss(*values):
        params = dict(zip(names, values))
        return torch.func.functional_call(sae, params, (x,)).x_hat.pow(2).sum()

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in sae.parameters())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_run_ends_at_same_weights(arch):
    dense, sparse = _pair(arch, 16, 80)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 16, generator=g, dtype=torch.float64) * 0.3 for _ in range(20)]
    cfg = TrainConfig(n_tokens=64 * 20, batch_size=64, lr=3e-3, lr_warmup_steps=2,
                      coefficient_warmup_steps=5, log_every=1, dead_window_tokens=64 * 2)  # fmt: skip
    results = [
        train_sae(
            sae,
            lambda skip: itertools.islice(iter(data), skip, None),
            cfg,
            Sparsity("coefficient"),
            progress=False,
        )  # fmt: skip
        for sae in (dense, sparse)
    ]
    if dense.uses_dead_mask:  # AuxK ran on some steps
        assert any(row["auxk"] > 0 for row in results[0].history)
    for (name, a), (_, b) in zip(dense.state_dict().items(), sparse.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    for row_dense, row_sparse in zip(results[0].history, results[1].history, strict=True):
        assert row_sparse == pytest.approx(row_dense, rel=1e-6)


def test_batchtopk_eval_takes_dense_threshold_path():
    dense, sparse = _pair("batchtopk", 12, 50)
    x = torch.randn(64, 12, dtype=torch.float64)
    dense(x), sparse(x)  # training mode: both update the threshold the same way
    assert dense.threshold.item() == sparse.threshold.item() > 0
    sparse.eval()
    dense.eval()
    out = sparse(x)
    assert not isinstance(out, SparseSAEOutput)
    assert torch.equal(out.f, dense(x).f)


def test_auto_picks_by_density_and_device():
    cpu = torch.device("cpu")
    assert use_sparse("auto", 40 / 4608, cpu) and not use_sparse("auto", 0.5, cpu)
    assert not use_sparse("auto", 1e-4, torch.device("meta"))  # unmeasured device: dense
    assert use_sparse(True, 1.0, cpu) and not use_sparse(False, 0.0, cpu)
    assert 0 < MAX_SPARSE_DENSITY["cpu"] < 1
    assert isinstance(TopKSAE(8, 1000, k=4)(torch.randn(3, 8)), SparseSAEOutput)
    assert not isinstance(TopKSAE(8, 10, k=4)(torch.randn(3, 8)), SparseSAEOutput)
    jump = JumpReLUSAE(8, 1000, threshold_init=10.0)  # nothing near the threshold: sparse
    assert isinstance(jump(torch.randn(3, 8)), SparseSAEOutput)
    jump = JumpReLUSAE(8, 1000, threshold_init=1e-6)  # ~half the latents fire: dense
    assert not isinstance(jump(torch.randn(3, 8)), SparseSAEOutput)
    for sae, bias in ((GatedSAE(8, 1000), "b_gate"), (ReLUSAE(8, 1000), "b_enc")):
        x = torch.randn(3, 8)
        assert not isinstance(sae(x), SparseSAEOutput)  # zero biases: ~half open, dense
        with torch.no_grad():  # unit-norm encoder columns, |x - b_dec| ~ 3: ~1% of pairs open
            getattr(sae, bias).fill_(-2.0 * float(x.norm(dim=1).max()))
        out = sae(x)
        assert isinstance(out, SparseSAEOutput) and out.code.tokens.numel() < 0.15 * 3000


@pytest.mark.parametrize("cls", [TopKSAE, JumpReLUSAE, ReLUSAE, GatedSAE])
def test_sparse_flag_is_validated(cls):
    kw = {"k": 2} if cls is TopKSAE else {}
    with pytest.raises(ValueError, match="sparse must be"):
        cls(4, 8, sparse="yes", **kw)


def test_per_latent_gradient_is_plain_indexings() -> None:
    """per_latent(v, code) = v[code.latents], and its gradient sums each latent's pairs."""
    torch.manual_seed(0)
    mask = torch.rand(300, 50) < 0.3
    code = mask_code(mask)
    v = torch.randn(50, requires_grad=True)
    w = torch.randn(int(mask.sum()))
    (per_latent(v, code) * w).sum().backward()
    assert v.grad is not None
    got = v.grad.clone()
    v.grad = None
    (v[code.latents] * w).sum().backward()
    assert torch.equal(per_latent(v, code), v[code.latents])
    torch.testing.assert_close(got, v.grad, rtol=1e-5, atol=1e-6)
    by_hand = torch.zeros(50).index_add_(0, code.latents, w)
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)


TRAIN_IN_A_PROCESS = """
import sys, torch
from baselines.jumprelu import JumpReLUSAE
torch.set_num_threads(2)
x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)
sae = JumpReLUSAE(64, 2048, coefficient=1e-3, bandwidth=0.05, threshold_init=0.05, sparse=True)
opt = torch.optim.Adam(sae.parameters(), lr=4e-3, betas=(0.0, 0.999))
for step in range(8):
    xb = x[(step % 4) * 1024:(step % 4 + 1) * 1024]
    loss = sae.loss_terms(xb, sae(xb), 1e-3, None)["loss"]
    opt.zero_grad(); loss.backward(); opt.step(); sae.after_optimizer_step()
torch.save(sae.state_dict(), sys.argv[1])
"""


def test_jumprelu_training_is_bit_identical_across_processes(tmp_path) -> None:
    """Two processes, two threads each, the same 8 sparse steps: the same weights to the bit.
    (With plain indexing of the thresholds, their gradient's pair sums were added in a
    run-dependent order: the thresholds differed between processes after a few steps.)"""
    import subprocess
    import sys

    paths = [tmp_path / f"run{i}.pt" for i in range(2)]
    for path in paths:
        done = subprocess.run([sys.executable, "-c", TRAIN_IN_A_PROCESS, str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    a, b = (torch.load(p) for p in paths)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
