"""Matryoshka BatchTopK (baselines/matryoshka_batchtopk.py) against its formula.

conf/sae/matryoshka_batchtopk.yaml also runs every generic test of test_baselines.py (forward,
decoder norms, fold_scale, save/reload, finite differences of each term on the dense path),
the bf16 step of test_precision.py and the export round trips of test_interop.py. Here: group
boundaries, a case computed by hand, the single-group invariant (= BatchTopK), the prefix
terms against the slicing formula, the sparse path against the dense one and finite
differences on it, the inference threshold, and a short training run.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from baselines.batchtopk import BatchTopKSAE
from baselines.matryoshka_batchtopk import MatryoshkaBatchTopKSAE, group_ends
from baselines.sparse import SparseSAEOutput
from benchmark.train import Sparsity, TrainConfig, train_sae


# --- group boundaries --------------------------------------------------------------------------
def test_group_ends_doubling_default_and_fractions():
    # 4608 / 31 = 148.6: cumulative 1, 3, 7, 15, 31 / 31 of the width, rounded.
    assert group_ends(4608, None, 5) == [149, 446, 1041, 2230, 4608]
    # width 10: 0.32 -> 0 (empty: merged), 0.97 -> 1, 2.26 -> 2, 4.84 -> 5, 10.
    assert group_ends(10, None, 5) == [1, 2, 5, 10]
    assert group_ends(8, [0.25, 0.75], 5) == [2, 8]
    assert group_ends(8, None, 1) == group_ends(8, [1.0], 5) == [8]


@pytest.mark.parametrize(
    ("fractions", "n_groups"), [([0.5, 0.4], 5), ([0.0, 1.0], 5), ([-0.5, 1.5], 5), ([], 5),
                                ([float("nan"), 1.0], 5), (None, 0), (None, 10**9)],
)  # fmt: skip
def test_group_config_errors(fractions, n_groups):
    with pytest.raises(ValueError, match="group_fractions|n_groups"):
        MatryoshkaBatchTopKSAE(4, 8, k=2, group_fractions=fractions, n_groups=n_groups)


# --- a case computed by hand -------------------------------------------------------------------
def _hand_sae(sparse: bool) -> MatryoshkaBatchTopKSAE:
    """d_in 2, d_sae 4, groups {0, 1} and {2, 3}, k 2, biases 0, encoder = decoder transpose
    with decoder rows d0 = (1, 0), d1 = (0, 1), d2 = (0.6, 0.8), d3 = (0.8, -0.6)."""
    sae = MatryoshkaBatchTopKSAE(2, 4, k=2, k_aux=1, group_fractions=[0.5, 0.5], sparse=sparse)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.t())
    return sae


# Tokens a = (3, 1), b = (0, 2). pre = x W_dec^T: a -> (3, 1, 2.6, 1.8), b -> (0, 2, 1.6, -1.2).
# BatchTopK keeps the k * B = 4 largest of the 8: 3 (a0), 2.6 (a2), 2 (b1), 1.8 (a3), so
# f_a = (3, 0, 2.6, 1.8), f_b = (0, 2, 0, 0).
X_HAND = torch.tensor([[3.0, 1.0], [0.0, 2.0]])


@pytest.mark.parametrize("sparse", [False, True])
def test_hand_computed_loss_terms(sparse):
    sae = _hand_sae(sparse)
    out = sae(X_HAND)
    assert isinstance(out, SparseSAEOutput) == sparse
    torch.testing.assert_close(out.f, torch.tensor([[3.0, 0.0, 2.6, 1.8], [0.0, 2.0, 0.0, 0.0]]))
    terms = sae.loss(X_HAND, out=out)
    # Whole dictionary: x_hat_a = 3 d0 + 2.6 d2 + 1.8 d3 = (3 + 1.56 + 1.44, 2.08 - 1.08) = (6, 1),
    # error (-3, 0) -> 9; x_hat_b = 2 d1 = (0, 2), error 0. Mean over the batch: 4.5.
    torch.testing.assert_close(terms["mse"], torch.tensor(4.5))
    # First prefix (latents 0, 1): x_hat_a = 3 d0 = (3, 0), error (0, 1) -> 1; x_hat_b = (0, 2)
    # -> 0. Mean: 0.5.
    torch.testing.assert_close(terms["mse_prefix_0"], torch.tensor(0.5))
    assert terms["auxk"].item() == 0.0  # no dead mask
    torch.testing.assert_close(terms["loss"], torch.tensor(4.5 + 0.5))  # summed, not averaged
    assert set(terms) == {"loss", "mse", "mse_prefix_0", "auxk"}
    # d mse_prefix_0 / d d0 = (1/B) sum_b 2 (x_hat_b - x_b) f_b0 = (3, 0) - (3, 1) times 3
    # = (0, -3); d1's only token (b) is reconstructed exactly; d2, d3 are not in the prefix.
    (grad,) = torch.autograd.grad(terms["mse_prefix_0"], sae.W_dec)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -3.0], [0, 0], [0, 0], [0, 0]]))
    (grad_enc,) = torch.autograd.grad(sae.loss(X_HAND)["mse_prefix_0"], sae.W_enc)
    assert torch.count_nonzero(grad_enc[:, 2:]) == 0  # later groups' encoders: untouched


@pytest.mark.parametrize("sparse", [False, True])
def test_hand_computed_auxk(sparse):
    sae = _hand_sae(sparse)
    dead = torch.tensor([False, True, False, True])
    terms = sae.loss(X_HAND, dead_mask=dead)
    # e = x - x_hat (whole dictionary): e_a = (-3, 0), e_b = (0, 0). k_aux = 1 among dead {1, 3}:
    # a: pre 1 vs 1.8 -> 1.8 d3 = (1.44, -1.08); b: pre 2 vs -1.2 -> 2 d1 = (0, 2).
    # AuxK = (|(-4.44, 1.08)|^2 + |(0, -2)|^2) / 2 = (19.7136 + 1.1664 + 4) / 2 = 12.44.
    torch.testing.assert_close(terms["auxk"], torch.tensor(12.44))
    torch.testing.assert_close(terms["loss"], torch.tensor(5.0 + 12.44 / 32))


def test_inference_uses_the_batchtopk_threshold():
    sae = _hand_sae(sparse=False)
    sae.threshold_momentum = 0.0
    sae(X_HAND)  # training: the smallest kept activation, 1.8, becomes the threshold
    assert sae.threshold.item() == pytest.approx(1.8)
    sae.eval()
    # (2, 0.5): pre = (2, 0.5, 1.6, 1.3); only 2 > 1.8. (0, 3): pre = (0, 3, 2.4, -1.8).
    x = torch.tensor([[2.0, 0.5], [0.0, 3.0]])
    out = sae(x)
    torch.testing.assert_close(out.f, torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 2.4, 0]]))
    torch.testing.assert_close(sae(x[:1]).f, out.f[:1])  # per token: no batch dependence
    ref = BatchTopKSAE(2, 4, k=2, sparse=False).eval()
    ref.load_state_dict(sae.state_dict())
    assert torch.equal(ref(x).f, out.f) and torch.equal(ref(x).x_hat, out.x_hat)


# --- invariants on random weights --------------------------------------------------------------
def _random_pair(sparse, fractions, d_in=12, d_sae=40, k=4, seed=0):
    """A float64 Matryoshka SAE with non-trivial biases, and a BatchTopK with the same weights."""
    torch.manual_seed(seed)
    kw = {"k": k, "k_aux": 6, "sparse": sparse}
    sae = MatryoshkaBatchTopKSAE(d_in, d_sae, group_fractions=fractions, **kw).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    ref = BatchTopKSAE(d_in, d_sae, **kw).double()
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(32, d_in, dtype=torch.float64)
    return sae, ref, x


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dead", [False, True])
def test_single_group_equals_batchtopk(sparse, dead):
    sae, ref, x = _random_pair(sparse, [1.0])
    mask = torch.arange(40) % 3 == 0 if dead else None
    got, want = sae.loss(x, dead_mask=mask), ref.loss(x, dead_mask=mask)
    assert got.keys() == want.keys() == {"loss", "mse", "auxk"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
    got["loss"].backward()
    want["loss"].backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("sparse", [False, True])
def test_prefix_terms_are_the_slicing_formula(sparse):
    """mse_prefix_m = ||x - (f[:, :end_m] W_dec[:end_m] + b_dec)||^2 from the full code f."""
    sae, _, x = _random_pair(sparse, [0.1, 0.2, 0.3, 0.4])
    assert sae.group_ends == [4, 12, 24, 40]
    out = sae(x)
    assert isinstance(out, SparseSAEOutput) == sparse
    dead = torch.arange(40) % 4 == 1
    terms = sae.loss(x, dead_mask=dead, out=out)
    total = terms["mse"] + terms["auxk"] / 32
    for m, end in enumerate(sae.group_ends[:-1]):
        x_hat = out.f[:, :end] @ sae.W_dec[:end] + sae.b_dec
        want = (x - x_hat).pow(2).sum(-1).mean()
        torch.testing.assert_close(terms[f"mse_prefix_{m}"], want, rtol=1e-10, atol=1e-12)
        total = total + want
    torch.testing.assert_close(terms["loss"], total, rtol=1e-10, atol=1e-12)
    assert terms["auxk"] > 0 and len(terms) == 2 + 4  # loss, auxk, mse and three inner prefixes


@pytest.mark.parametrize("dead", [False, True])
def test_sparse_path_equals_dense(dead):
    """The inner prefixes' sparse group decodes give the dense slices' terms and gradients."""
    dense, _, x = _random_pair(False, None)  # five doubling groups: ends 1, 4, 9, 19, 40
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    mask = torch.arange(40) % 3 == 0 if dead else None
    results = []
    for sae in (dense, sparse):
        terms = sae.loss(x, dead_mask=mask)
        terms["loss"].backward()
        results.append((terms, {n: p.grad for n, p in sae.named_parameters()}))
    (terms_d, grads_d), (terms_s, grads_s) = results
    assert terms_d.keys() == terms_s.keys() and len(terms_d) == 3 + 4
    for name in terms_d:
        torch.testing.assert_close(terms_s[name], terms_d[name], rtol=1e-10, atol=1e-12)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-10, atol=1e-12)


def test_sparse_path_prefix_gradients_match_finite_differences():
    """The sparse group decodes: every prefix term's gradient is its derivative (test_baselines
    checks the dense path the same way)."""
    sae, _, _ = _random_pair(True, [0.25, 0.25, 0.5], d_in=4, d_sae=12, k=2)
    x = torch.randn(4, 4, dtype=torch.float64)
    names = [n for n, _ in sae.named_parameters()]
    for term in ("mse_prefix_0", "mse_prefix_1"):

        def f(*values, term=term):
            params = {f"inner.{k}": v for k, v in zip(names, values)}
            return torch.func.functional_call(_Term(sae, term), params, (x,))

        inputs = tuple(p.detach().clone().requires_grad_(True) for p in sae.parameters())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4), term


class _Term(torch.nn.Module):
    def __init__(self, inner, term):
        super().__init__()
        self.inner, self.term = inner, term

    def forward(self, x):
        return self.inner.loss(x)[self.term]


# --- a short training run ----------------------------------------------------------------------
def _train(sae, data, steps):
    cfg = TrainConfig(n_tokens=data[0].shape[0] * steps, batch_size=data[0].shape[0], lr=1e-2,
                      lr_warmup_steps=5, log_every=10, dead_window_tokens=10**9)  # fmt: skip
    batches = lambda skip: itertools.islice(itertools.cycle(data), skip, None)  # noqa: E731
    return train_sae(sae, batches, cfg, Sparsity("coefficient"), progress=False)


def test_training_reduces_the_loss_and_trains_the_first_prefix():
    """100 steps on synthetic data with a power law of feature frequencies (64 unit directions
    in 16 dims, feature i fires with probability 0.5 / (i + 1)): the loss falls, and the first
    group alone (8 of 64 latents) reconstructs far better than the same 8 latents of a BatchTopK
    trained from the same initialisation on the same batches. Measured over seeds 0-4: loss
    ratio last / first step 0.23-0.38, first-prefix error ratio 0.39-0.48."""
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    p = 0.5 / torch.arange(1, 65)
    codes = torch.rand(20 * 128, 64, generator=g) * (torch.rand(20 * 128, 64, generator=g) < p)
    data = list((codes @ truth).split(128))
    torch.manual_seed(1)
    sae = MatryoshkaBatchTopKSAE(16, 64, k=3, group_fractions=[0.125, 0.375, 0.5])
    ref = BatchTopKSAE(16, 64, k=3)
    ref.load_state_dict(sae.state_dict())  # the same initialisation
    runs = [_train(model, data, 100) for model in (sae, ref)]
    first, last = runs[0].history[0], runs[0].history[-1]
    assert last["loss"] < 0.5 * first["loss"] and last["mse_prefix_0"] < first["mse_prefix_0"]
    # The reference's first 8 latents, measured by the same formula (its weights in a Matryoshka).
    probe = copy.deepcopy(sae)
    probe.load_state_dict(ref.state_dict())
    x = torch.cat(data[:8])
    with torch.no_grad():
        ours, theirs = sae.loss(x)["mse_prefix_0"], probe.loss(x)["mse_prefix_0"]
    assert ours < 0.6 * theirs, (ours.item(), theirs.item())
