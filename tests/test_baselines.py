"""Unit tests of the SAE architectures against docs/method.md.

Tests in the first block are parametrised over conf/sae/*.yaml, so a baseline added by config
is covered with no new test code. The later blocks check each architecture's own math on
hand-computed cases.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from torch.func import functional_call

from baselines.base import SparseAutoencoder
from baselines.gated import GatedSAE
from baselines.jumprelu import JumpReLUSAE
from baselines.topk import TopKSAE
from benchmark.saes import load_sae, sae_node, save_sae
from interop.foreign import suite_node
from tests.helpers import SAE_NAMES, compose_config, sae_from_conf

D_IN, D_SAE = 12, 40

# Parameters whose gradient is a straight-through *pseudo*-derivative by definition (docs/method.md),
# so finite differences do not apply to them; everything else must match finite differences.
PSEUDO_GRADIENT = {"raw_threshold"}


def _data(n=64, d=D_IN, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * 0.5 + 0.1


def _step(sae, x, **kw):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    dead = torch.arange(sae.d_sae) % 3 == 0 if sae.uses_dead_mask else None
    terms = sae.loss(x, coefficient=1e-3, dead_mask=dead, **kw)
    opt.zero_grad()
    terms["loss"].backward()
    sae.before_optimizer_step()
    grad = sae.W_dec.grad.clone()
    opt.step()
    sae.after_optimizer_step()
    return grad


# --- every architecture in conf/sae/ -----------------------------------------------------------
@pytest.mark.parametrize("name", SAE_NAMES)
def test_forward_shapes_and_loss_terms(name):
    torch.manual_seed(0)
    sae = sae_from_conf(name, D_IN, D_SAE)
    x = _data()
    out = sae(x)
    assert out.x_hat.shape == (64, D_IN) and out.f.shape == (64, D_SAE)
    assert torch.equal(sae.encode(x), out.f)
    torch.testing.assert_close(sae.decode(out.f), out.x_hat)
    terms = sae.loss(x)
    assert {"loss", "mse"} <= set(terms) and all(t.ndim == 0 for t in terms.values())
    torch.testing.assert_close(terms["mse"], ((x - out.x_hat) ** 2).sum(-1).mean())


@pytest.mark.parametrize("name", SAE_NAMES)
def test_set_density_puts_the_code_at_k(name):
    """`set_density(x, k)`: the architecture's own threshold or bias leaves k x B of x's
    pre-activations above it (the planner and bench time steps there); a TopK-like
    architecture is at its k by construction and keeps the default, which changes nothing."""
    torch.manual_seed(0)
    sae = sae_from_conf(name, D_IN, D_SAE)
    x = _data()
    before = (sae.encode(x) > 0).sum(-1).float().mean().item()
    sae.set_density(x, 3)
    l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    if type(sae).set_density is SparseAutoencoder.set_density:
        assert l0 == before
    else:
        assert l0 == pytest.approx(3, abs=1 / 64)  # 3 x 64 pairs above the quantile
        assert before > 6  # untrained, a penalised SAE fires on far more


@pytest.mark.parametrize("name", SAE_NAMES)
def test_init_unit_norm_decoder_and_tied_encoder(name):
    sae = sae_from_conf(name, D_IN, D_SAE)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # untied after init
    assert torch.count_nonzero(sae.b_dec) == 0


@pytest.mark.parametrize("name", SAE_NAMES)
def test_decoder_rows_unit_norm_and_gradient_projected(name):
    torch.manual_seed(1)
    sae = sae_from_conf(name, D_IN, D_SAE)
    x = _data()
    w_before = sae.W_dec.detach().clone()
    grad = _step(sae, x)
    # The projected gradient has no component along its (pre-step) decoder row.
    row_dot = (grad * w_before).sum(dim=1)
    assert row_dot.abs().max() < 1e-6 * max(1.0, grad.abs().max().item())
    assert grad.abs().sum() > 0  # the projection left something to learn
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", SAE_NAMES)
def test_fold_scale_round_trip(name):
    """An SAE trained on x / c, with c folded in, gives the same outputs on x (1e-5 rel.)."""
    torch.manual_seed(2)
    c = 7.3
    sae = sae_from_conf(name, D_IN, D_SAE, dtype=torch.float64)
    x = _data(dtype=torch.float64) * c
    for _ in range(5):  # a few real steps on the normalised data, so no parameter is trivial
        _step(sae, x / c)
    folded = copy.deepcopy(sae)
    folded.fold_scale(c)
    ref, got = sae(x / c), folded(x)
    torch.testing.assert_close(got.x_hat, c * ref.x_hat, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got.f, c * ref.f, rtol=1e-5, atol=1e-8)
    assert torch.equal(got.f > 0, ref.f > 0)  # same active set: L0 unchanged


@pytest.mark.parametrize("name", SAE_NAMES)
def test_save_and_reload_identical(name, tmp_path):
    torch.manual_seed(3)
    cfg = compose_config([f"sae={name}", "sparsity=l0_10"])
    sae = sae_from_conf(name, D_IN, D_SAE)
    _step(sae, _data())
    node = sae_node(cfg.sae, D_IN, D_SAE)
    if not inspect.isclass(get_object(node["_target_"])):  # a released format's loader: a run
        node = OmegaConf.create(suite_node(sae))  # saves its suite class (benchmark.run)
    save_sae(sae, tmp_path, node)
    again = load_sae(tmp_path)
    assert type(again) is type(sae)
    x = _data(seed=5)
    a, b = sae(x), again(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.f, b.f)


@pytest.mark.parametrize("name", SAE_NAMES)
def test_loss_terms_match_finite_differences(name):
    """Every loss term's gradient equals finite differences for every parameter, except the
    pairs the class declares as surrogate (straight-through or stop-gradient by definition).
    float64, away from the nonlinearities' kinks with probability one."""
    torch.manual_seed(4)
    sae = sae_from_conf(name, 6, 10, dtype=torch.float64)
    for _ in range(3):
        _step(sae, _data(n=5, d=6, seed=9, dtype=torch.float64))
    x = _data(n=5, d=6, dtype=torch.float64)
    masks = [None, torch.arange(10) % 2 == 0] if sae.uses_dead_mask else [None]
    checked = 0
    for dead in masks:
        for term in sae.loss(x, dead_mask=dead):
            # Without a dead mask AuxK is identically 0, so every TopK gradient is a true one.
            no_auxk = sae.uses_dead_mask and dead is None
            skip = () if no_auxk else sae.surrogate_gradients.get(term, ())
            if "*" in skip:
                continue
            params = {k: v.detach() for k, v in sae.named_parameters() if k not in skip}

            def f(*values, term=term, params=params, dead=dead):
                return _term(sae, dict(zip(params, values)), x, dead, term)

            inputs = tuple(v.clone().requires_grad_(True) for v in params.values())
            assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4), term
            checked += 1
    assert checked >= 2  # at least the total and the reconstruction term


def _term(sae, p, x, dead, term):
    """One loss term as a function of the parameters in p (others taken from the module)."""

    class _Loss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.loss(x, coefficient=0.3, dead_mask=dead)[term]

    return functional_call(_Loss(sae), {f"inner.{k}": v for k, v in p.items()}, (x,))


# --- JumpReLU ----------------------------------------------------------------------------------
def _identity_jumprelu(theta=0.5, eps=0.1, param="direct"):
    sae = JumpReLUSAE(
        4, 4, coefficient=0.0, bandwidth=eps, threshold_init=theta, threshold_param=param
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


# pre = x; theta = 0.5, eps = 0.1 -> u = (z - theta) / eps = 0.48, 0.52, -0.48, -0.52:
# just inside, just outside, just inside, just outside the window |u| < 1/2.
X_HAND = torch.tensor([[0.548, 0.552, 0.452, 0.448]])


def test_jumprelu_forward_is_z_times_step():
    torch.manual_seed(5)
    sae = JumpReLUSAE(D_IN, D_SAE, threshold_init=0.05)
    with torch.no_grad():
        sae.raw_threshold.uniform_(0.0, 0.3)
    x = _data()
    out = sae(x)
    z = sae.pre_activations(x)
    torch.testing.assert_close(out.f, z * (z > sae.threshold).float())
    assert 0 < (out.f > 0).float().mean() < 1


def test_jumprelu_threshold_gradients_hand_computed():
    sae = _identity_jumprelu()
    terms = sae.loss(X_HAND)
    # f = (0.548, 0.552, 0, 0); x_hat = f; recon = 0.452^2 + 0.448^2.
    torch.testing.assert_close(terms["mse"], torch.tensor(0.452**2 + 0.448**2))
    assert terms["l0_penalty"].item() == 2.0
    (g_rec,) = torch.autograd.grad(terms["mse"], sae.raw_threshold)
    # d recon / d theta_i = 2 (f_i - x_i) * (-(theta / eps) K(u_i)), theta / eps = 5.
    expected_rec = torch.tensor([0.0, 0.0, 2 * (0 - 0.452) * -5.0, 0.0])
    torch.testing.assert_close(g_rec, expected_rec)
    (g_l0,) = torch.autograd.grad(terms["l0_penalty"], sae.raw_threshold)
    # d L0 / d theta_i = -(1 / eps) K(u_i) = -10 inside the window, 0 outside.
    torch.testing.assert_close(g_l0, torch.tensor([-10.0, 0.0, -10.0, 0.0]))


def test_jumprelu_total_loss_combines_terms_with_lambda():
    sae = _identity_jumprelu()
    terms = sae.loss(X_HAND, coefficient=0.25)
    (g,) = torch.autograd.grad(terms["loss"], sae.raw_threshold)
    torch.testing.assert_close(g, torch.tensor([-2.5, 0.0, 4.52 - 2.5, 0.0]))


def test_jumprelu_log_threshold_chain_rule():
    sae = _identity_jumprelu(param="log")
    torch.testing.assert_close(sae.threshold, torch.full((4,), 0.5))
    (g,) = torch.autograd.grad(sae.loss(X_HAND)["l0_penalty"], sae.raw_threshold)
    torch.testing.assert_close(g, 0.5 * torch.tensor([-10.0, 0.0, -10.0, 0.0]))  # theta * dL/dtheta


def test_jumprelu_l0_term_reaches_only_thresholds():
    torch.manual_seed(6)
    sae = JumpReLUSAE(D_IN, D_SAE, bandwidth=0.5, threshold_init=0.05)
    sae.loss(_data())["l0_penalty"].backward()
    assert sae.raw_threshold.grad is not None and sae.raw_threshold.grad.abs().sum() > 0
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_jumprelu_threshold_stays_positive_after_step():
    sae = _identity_jumprelu(theta=1e-3)
    with torch.no_grad():
        sae.raw_threshold.fill_(-1.0)
    sae.after_optimizer_step()
    assert (sae.threshold >= sae.min_threshold).all()


# --- Gated -------------------------------------------------------------------------------------
def test_gated_weight_sharing_row_by_row():
    torch.manual_seed(7)
    sae = GatedSAE(D_IN, D_SAE)
    with torch.no_grad():
        sae.r_mag.normal_()
    W_gate, W_mag = sae.W_gate.t(), sae.W_mag.t()  # the paper's (d_sae, d_in) layout
    for i in range(D_SAE):
        torch.testing.assert_close(W_mag[i], sae.r_mag[i].exp() * W_gate[i])


def test_gated_forward_and_sparsity_term_hand_formula():
    torch.manual_seed(8)
    sae = GatedSAE(D_IN, D_SAE)
    with torch.no_grad():
        sae.r_mag.normal_(0, 0.3)
        sae.b_gate.normal_(0, 0.1)
        sae.b_mag.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # non-unit rows: the norms must weigh in
    x = _data()
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).float() * torch.relu(pi_mag)
    torch.testing.assert_close(sae(x).f, f)
    terms = sae.loss(x, coefficient=0.1)
    l1 = (torch.relu(pi_gate) * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(terms["l1"], l1)
    aux = ((x - (torch.relu(pi_gate) @ sae.W_dec + sae.b_dec)) ** 2).sum(-1).mean()
    torch.testing.assert_close(terms["aux"], aux)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.1 * l1 + aux)


def test_gated_aux_term_has_stop_gradient_on_decoder():
    torch.manual_seed(9)
    sae = GatedSAE(D_IN, D_SAE)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    x = _data()
    sae.loss(x)["aux"].backward()
    assert sae.W_dec.grad is None or torch.count_nonzero(sae.W_dec.grad) == 0
    # b_dec still centres the encoder input, so it gets exactly the encoder-path gradient and
    # nothing from the (frozen) decoding: -sum_b W_gate g_b with g = d aux / d pi_gate.
    pi_gate = ((x - sae.b_dec) @ sae.W_enc + sae.b_gate).detach()
    resid = torch.relu(pi_gate) @ sae.W_dec.detach() + sae.b_dec.detach() - x
    g = (2 / x.shape[0]) * (resid @ sae.W_dec.detach().t()) * (pi_gate > 0).float()
    torch.testing.assert_close(sae.b_dec.grad, -(g @ sae.W_enc.detach().t()).sum(0))
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_gate.grad.abs().sum() > 0


# --- TopK --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 10])
def test_topk_exactly_k_active(k):
    torch.manual_seed(10)
    sae = TopKSAE(D_IN, D_SAE, k=k)
    f = sae(_data()).f
    assert ((f > 0).sum(dim=-1) == k).all()


def test_topk_rejects_k_larger_than_dictionary():
    with pytest.raises(ValueError, match="k .* must be in"):
        TopKSAE(D_IN, D_SAE, k=D_SAE + 1)


def test_auxk_zero_without_dead_latents():
    sae = TopKSAE(D_IN, D_SAE, k=4)
    x = _data()
    assert sae.loss(x)["auxk"].item() == 0.0
    assert sae.loss(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))["auxk"].item() == 0.0


def test_auxk_value_and_gradient_reach_only_dead_latents():
    torch.manual_seed(11)
    sae = TopKSAE(D_IN, D_SAE, k=4, k_aux=3)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 7, 8, 20, 33]] = True
    x = _data()
    out = sae(x)
    aux = sae.loss(x, dead_mask=dead, out=out)["auxk"]
    # Hand version: keep the 3 largest dead pre-activations per row, ReLU, decode, no bias.
    pre = out.pre.detach().masked_fill(~dead, float("-inf"))
    top = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    e = (x - out.x_hat).detach()
    torch.testing.assert_close(aux, ((e - z @ sae.W_dec.detach()) ** 2).sum(-1).mean())
    sae.zero_grad()
    aux.backward()
    assert torch.count_nonzero(sae.W_enc.grad[:, ~dead]) == 0
    assert torch.count_nonzero(sae.b_enc.grad[~dead]) == 0
    assert torch.count_nonzero(sae.W_dec.grad[~dead]) == 0
    assert torch.count_nonzero(sae.W_enc.grad[:, dead]) > 0


def test_topk_b_pre_initialised_to_geometric_median():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    sae = TopKSAE(2, 4, k=1)
    sae.init_b_pre(x)
    m = sae.b_dec.detach()
    # The geometric median minimises the sum of distances: check it beats the mean and
    # small moves around it.
    cost = lambda p: (x - p).norm(dim=1).sum()  # noqa: E731
    assert cost(m) < cost(x.mean(0))
    for d in torch.eye(2) * 1e-2:
        assert cost(m) <= cost(m + d) + 1e-6 and cost(m) <= cost(m - d) + 1e-6


# --- BatchTopK ---------------------------------------------------------------------------------
def test_batchtopk_keeps_k_per_token_on_average_and_thresholds_at_inference():
    from baselines.batchtopk import BatchTopKSAE

    torch.manual_seed(12)
    sae = BatchTopKSAE(D_IN, D_SAE, k=4, threshold_momentum=0.0)
    x = _data()
    f = sae(x).f  # training mode: top 4 * 64 over the whole batch
    per_token = (f > 0).sum(dim=-1)
    assert per_token.sum() == 4 * 64 and per_token.min() != per_token.max()
    # With momentum 0 the threshold is this batch's smallest kept activation ...
    assert sae.threshold.item() == pytest.approx(f[f > 0].min().item())
    # ... and in eval mode the same batch gives (nearly) the same code, per token alone.
    sae.eval()
    g = sae(x).f
    assert ((g > 0) != (f > 0)).sum() <= 1  # only the threshold element itself (strict >)
    torch.testing.assert_close(sae(x[:1]).f, g[:1])
