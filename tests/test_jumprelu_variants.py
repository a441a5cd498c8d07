"""The JumpReLU variants of baselines/jumprelu.py: Anthropic's tanh + pre-activation losses, the
quadratic target-L0 penalty and the quantile threshold init.

Hand-computed values (float64, 1e-6), finite differences where a term is an ordinary function of
a parameter, the straight-through pseudo-gradients against their formulas, and the configs.
(Every conf/sae/*.yaml, these two included, also runs the generic tests of test_baselines.py.)
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call

from baselines.jumprelu import JumpReLUSAE
from benchmark import identity
from benchmark.errors import ConfigError
from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, train_sae
from tests.helpers import compose_config

# pre = x (identity encoder, zero biases); theta = 0.5, eps = 0.1 -> u = (pre - theta) / eps =
# 0.48, 0.52, -0.48, -0.52: inside, outside, inside, outside the window |u| < 1/2.
X_HAND = torch.tensor([[0.548, 0.552, 0.452, 0.448]], dtype=torch.float64)
NORMS = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)  # ||d_i||, not all unit


def _hand_sae(**kw) -> JumpReLUSAE:
    sae = JumpReLUSAE(4, 4, bandwidth=0.1, threshold_init=0.5, sparse=False, **kw).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.diag(NORMS))
    return sae


def _random_sae(seed=0, d_in=6, d_sae=20, **kw) -> JumpReLUSAE:
    """float64, every parameter off its init, decoder rows of norms in [0.5, 1.5]."""
    torch.manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.2, threshold_init=0.1, **kw).double()
    with torch.no_grad():
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.3)
        sae.W_dec.mul_(torch.rand(d_sae, 1, dtype=torch.float64) + 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.raw_threshold.uniform_(0.05, 0.3)
    return sae


def _x(n=32, d=6, seed=1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- Anthropic: tanh sparsity term and pre-activation term --------------------------------------
def test_tanh_term_hand_computed_value_and_threshold_pseudo_gradient():
    sae = _hand_sae(sparsity_loss="tanh", tanh_scale=4.0)
    terms = sae.loss(X_HAND, coefficient=0.25)
    # f = (0.548, 0.552, 0, 0): sum_i tanh(c f_i ||d_i||) = tanh(4 * 0.548 * 1) + tanh(4 * 0.552 * 2).
    want = math.tanh(4 * 0.548) + math.tanh(4 * 0.552 * 2)
    assert terms["tanh_penalty"].item() == pytest.approx(want, abs=1e-6)
    assert "l0_penalty" not in terms and "pre_act" not in terms  # lambda_p = 0: no term
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.25 * terms["tanh_penalty"])
    (g,) = torch.autograd.grad(terms["tanh_penalty"], sae.raw_threshold)
    # d/dtheta_i = c ||d_i|| sech^2(c f_i ||d_i||) * (-(theta / eps) K(u_i)), theta / eps = 5;
    # latent 2 is inside the window with f = 0: sech^2(0) = 1.
    sech2 = 1 - math.tanh(4 * 0.548) ** 2
    want_g = torch.tensor([4 * 1.0 * sech2 * -5, 0.0, 4 * 0.5 * 1.0 * -5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(g, want_g, rtol=0, atol=1e-6)


def test_pre_act_term_hand_computed_value_and_gradients():
    sae = _hand_sae(sparsity_loss="tanh", pre_act_coefficient=0.1)
    x = torch.cat([X_HAND, torch.full((1, 4), 0.6, dtype=torch.float64)])  # row 2: all above
    terms = sae.loss(x, coefficient=0.25)
    # Row 1: ReLU(0.5 - pre) = (0, 0, 0.048, 0.052), weighted by ||d_i|| = (1, 2, 0.5, 1);
    # row 2: 0. Mean over the two rows.
    want = (0.048 * 0.5 + 0.052 * 1.0) / 2
    assert terms["pre_act"].item() == pytest.approx(want, abs=1e-6)
    want_loss = terms["mse"] + 0.25 * terms["tanh_penalty"] + 0.1 * terms["pre_act"]
    torch.testing.assert_close(terms["loss"], want_loss)
    g_theta, g_b_enc = torch.autograd.grad(terms["pre_act"], [sae.raw_threshold, sae.b_enc])
    # d/dtheta_i = mean_b 1[pre_bi < theta_i] ||d_i||; d/db_enc_i is its negative.
    want_g = torch.tensor([0.0, 0.0, 0.5 / 2, 1.0 / 2], dtype=torch.float64)
    torch.testing.assert_close(g_theta, want_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_b_enc, -want_g, rtol=0, atol=1e-12)


def test_anthropic_units_give_the_same_loss_up_to_the_factor_d_in():
    """An SAE at Anthropic's scale (inputs s x, s = sqrt(d_in), c and lambda_p as published,
    lambda_S) has d_in times the loss of the suite's SAE on x with anthropic_units (lambda_S /
    d_in): the conversion c sqrt(d_in), lambda_p / sqrt(d_in) is exact."""
    d_in = 9
    s = math.sqrt(d_in)
    opts = dict(sparsity_loss="tanh", tanh_scale=4.0, pre_act_coefficient=3e-3, sparse=False)
    ours = _random_sae(d_in=d_in, anthropic_units=True, **opts)
    assert ours.c == pytest.approx(4.0 * s) and ours.lambda_p == pytest.approx(3e-3 / s)
    theirs = JumpReLUSAE(d_in, ours.d_sae, anthropic_units=False, **opts).double()
    theirs.load_state_dict(ours.state_dict())
    theirs.fold_scale(s)  # biases and thresholds in Anthropic's units
    x = _x(d=d_in) * 0.3
    a = theirs.loss(x * s, coefficient=0.7)
    b = ours.loss(x, coefficient=0.7 / d_in)
    for name in ("loss", "mse"):
        torch.testing.assert_close(a[name], d_in * b[name], rtol=1e-10, atol=0)
    torch.testing.assert_close(a["tanh_penalty"], b["tanh_penalty"], rtol=1e-10, atol=0)
    assert b["tanh_penalty"] > 0 and b["pre_act"] > 0


# --- quadratic target-L0 term -------------------------------------------------------------------
def test_target_l0_term_hand_computed_value_and_threshold_pseudo_gradient():
    sae = _hand_sae(sparsity_loss="target_l0", target_l0=4.0)
    assert sae.aims_at_target_l0
    terms = sae.loss(X_HAND, coefficient=0.3)
    assert terms["l0_penalty"].item() == 2.0  # latents 0 and 1 fire
    assert terms["target_l0_penalty"].item() == pytest.approx((2 / 4 - 1) ** 2, abs=1e-12)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.3 * 0.25)
    (g,) = torch.autograd.grad(terms["target_l0_penalty"], sae.raw_threshold, retain_graph=True)
    # 2 (L0 / T - 1) / T * dL0/dtheta_i, dL0/dtheta_i = -(1 / eps) K(u_i) = -10 inside.
    torch.testing.assert_close(g, -0.25 * torch.tensor([-10.0, 0, -10.0, 0], dtype=torch.float64))
    # It trains the thresholds alone, like the paper's L0 term.
    sae.zero_grad()
    terms["target_l0_penalty"].backward()
    assert all(p.grad is None or not p.grad.any() for n, p in sae.named_parameters()
               if n != "raw_threshold")  # fmt: skip


# --- finite differences where the terms are ordinary functions ----------------------------------
def _term_of(sae, name, term, x, coefficient=0.3):
    """term as a function of one parameter's value (the others from the module)."""

    class _Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = sae

        def forward(self, x):
            return self.inner.loss(x, coefficient=coefficient)[term]

    wrap = _Wrap()
    return lambda value: functional_call(wrap, {f"inner.{name}": value}, (x,))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("param", ["W_enc", "b_enc", "b_dec", "W_dec", "raw_threshold"])
def test_pre_act_term_matches_finite_differences(param, sparse):
    sae = _random_sae(sparsity_loss="tanh", pre_act_coefficient=0.1, sparse=sparse)
    x = _x(n=8)
    f = _term_of(sae, param, "pre_act", x)
    value = getattr(sae, param).detach().clone().requires_grad_(True)
    assert f(value) > 0
    assert torch.autograd.gradcheck(f, (value,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("param", ["W_dec", "W_enc", "b_enc"])
def test_tanh_term_matches_finite_differences_off_the_threshold(param, sparse):
    """W_dec enters through ||d_i|| only; the encoder through f (d f / d pre = H)."""
    sae = _random_sae(sparsity_loss="tanh", tanh_scale=2.0, sparse=sparse)
    x = _x(n=8)
    f = _term_of(sae, param, "tanh_penalty", x)
    value = getattr(sae, param).detach().clone().requires_grad_(True)
    assert f(value) > 0
    assert torch.autograd.gradcheck(f, (value,), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- the threshold pseudo-gradients against their formulas on a random batch -------------------
def _window(sae, pre):
    """K((pre - theta) / eps), (B, d_sae)."""
    return ((pre - sae.threshold.detach()) / sae.bandwidth).abs().lt(0.5).double()


@pytest.mark.parametrize("sparse", [False, True])
def test_tanh_threshold_pseudo_gradient_matches_formula(sparse):
    sae = _random_sae(sparsity_loss="tanh", tanh_scale=3.0, sparse=sparse)
    x = _x(n=64)
    out = sae(x)
    (g,) = torch.autograd.grad(sae.loss(x, out=out)["tanh_penalty"], sae.raw_threshold)
    pre, theta, n = out.pre.detach(), sae.threshold.detach(), sae.W_dec.detach().norm(dim=1)
    f = pre * (pre > theta)
    dtanh = sae.c * n * (1 - torch.tanh(sae.c * f * n) ** 2)  # d tanh / d f_i, (B, d_sae)
    want = (dtanh * -(theta / sae.bandwidth) * _window(sae, pre)).mean(dim=0)
    assert want.abs().sum() > 0  # the window was hit
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_target_l0_threshold_pseudo_gradient_matches_formula(sparse):
    sae = _random_sae(sparsity_loss="target_l0", target_l0=3.0, sparse=sparse)
    x = _x(n=64)
    out = sae(x)
    (g,) = torch.autograd.grad(sae.loss(x, out=out)["target_l0_penalty"], sae.raw_threshold)
    pre, theta = out.pre.detach(), sae.threshold.detach()
    l0 = (pre > theta).double().sum(dim=-1).mean()
    want = 2 * (l0 / 3.0 - 1) / 3.0 * (-(1 / sae.bandwidth) * _window(sae, pre)).mean(dim=0)
    assert want.abs().sum() > 0
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


# --- quantile threshold init --------------------------------------------------------------------
def _gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("param", ["direct", "log"])
def test_quantile_init_gives_the_target_l0(param):
    d_in, d_sae, B, target = 16, 256, 2048, 8.0
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, threshold_param=param, target_l0=target,
                      threshold_init_mode="quantile", sparse=False)  # fmt: skip
    x = _gaussian(B, d_in, seed=1)
    sae.init_b_pre(x)
    assert (sae.threshold > sae.min_threshold).all()  # a 97th percentile: no clamping here
    k = round((B + 1) * (1 - target / d_sae))
    # On the batch itself exactly B - k tokens exceed each threshold (log storage: exp(log
    # theta) may round theta down by an ulp, and the k-th token itself fire too) ...
    extra = (sae(x).f > 0).sum(dim=0) - (B - k)
    assert (extra == 0).all() if param == "direct" else ((extra == 0) | (extra == 1)).all()
    # ... and on new tokens the expected L0 is the target (order-statistic quantile).
    l0_new = (sae(_gaussian(8192, d_in, seed=2)).f > 0).sum(dim=-1).float().mean().item()
    assert l0_new == pytest.approx(target, rel=0.05)
    assert d_sae * (B + 1 - k) / (B + 1) == pytest.approx(target, abs=d_sae / (2 * (B + 1)))


def test_quantile_init_clamps_to_min_threshold_and_constant_mode_does_nothing():
    sae = JumpReLUSAE(4, 8, target_l0=7.5, threshold_init_mode="quantile", sparse=False)
    sae.init_b_pre(_gaussian(100, 4, seed=3))  # 6th percentiles: mostly below 0
    assert (sae.threshold >= sae.min_threshold).all()
    assert (sae.threshold == sae.min_threshold).any()
    plain = JumpReLUSAE(4, 8, threshold_init=0.05)
    plain.init_b_pre(_gaussian(100, 4, seed=3))
    assert torch.equal(plain.threshold, torch.full((8,), 0.05))


def test_the_trainer_runs_the_quantile_init_on_the_first_batch():
    d_in, d_sae, B = 8, 64, 512
    sae = JumpReLUSAE(d_in, d_sae, coefficient=1e-3, target_l0=4.0,
                      threshold_init_mode="quantile").double()  # fmt: skip
    data = [_gaussian(B, d_in, seed=s).double() for s in range(2)]
    expected = JumpReLUSAE(d_in, d_sae, target_l0=4.0, threshold_init_mode="quantile").double()
    expected.load_state_dict(sae.state_dict())
    expected.init_b_pre(data[0])
    cfg = TrainConfig(n_tokens=B, batch_size=B, lr=1e-9, lr_warmup_steps=0)
    train_sae(sae, lambda skip: itertools.islice(iter(data), skip, None), cfg,
              Sparsity("coefficient"), progress=False)  # fmt: skip
    torch.testing.assert_close(sae.threshold, expected.threshold, rtol=0, atol=1e-8)


# --- validation and configs ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sparsity_loss="l1"), "sparsity_loss"),
        (dict(sparsity_loss="target_l0"), "needs target_l0"),
        (dict(threshold_init_mode="quantile"), "needs target_l0"),
        (dict(threshold_init_mode="median", target_l0=2), "threshold_init_mode"),
        (dict(sparsity_loss="target_l0", target_l0=9), r"target_l0=9 must be in \(0, d_sae=8\]"),
        (dict(sparsity_loss="target_l0", target_l0=float("nan")), "target_l0"),
        (dict(pre_act_coefficient=-1.0), "pre_act_coefficient"),
        (dict(tanh_scale=float("inf")), "tanh_scale"),
    ],
)
def test_bad_variant_options_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        JumpReLUSAE(4, 8, **kw)


def test_variant_configs_build_with_their_options():
    tanh = build_sae(compose_config(["sae=jumprelu_tanh", "sparsity=l0_40"]).sae, 576, 4608)
    assert tanh.sparsity_loss == "tanh" and not tanh.aims_at_target_l0
    assert tanh.c == pytest.approx(4.0 * 24) and tanh.lambda_p == pytest.approx(3e-6 / 24)
    target = build_sae(compose_config(["sae=jumprelu_target_l0", "sparsity=l0_40"]).sae, 576, 4608)
    assert target.sparsity_loss == "target_l0" and target.target_l0 == 40
    assert target.aims_at_target_l0 and target.threshold_init_mode == "constant"
    # The paper's JumpReLU is unchanged by the new options.
    paper = build_sae(compose_config(["sae=jumprelu", "sparsity=l0_40"]).sae, 576, 4608)
    assert (paper.sparsity_loss, paper.lambda_p, paper.threshold_init_mode) == ("l0", 0.0,
                                                                                 "constant")  # fmt: skip
    assert not paper.aims_at_target_l0


def test_target_l0_variant_needs_a_target_entry():
    cfg = compose_config(["sae=jumprelu_target_l0", "sparsity=coefficient",
                          "sparsity.coefficient=0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match="needs target_l0"):
        build_sae(cfg.sae, 64, 256)


def test_interpolated_target_is_the_swept_value_in_the_curve_identity():
    """target_l0 interpolates ${sparsity.target_l0}: runs at two targets are one curve."""
    a = compose_config(["sae=jumprelu_target_l0", "sparsity=l0_20"])
    b = compose_config(["sae=jumprelu_target_l0", "sparsity=l0_40"])
    assert identity.config_hash(a) != identity.config_hash(b)
    assert identity.curve_hash(a) == identity.curve_hash(b)
