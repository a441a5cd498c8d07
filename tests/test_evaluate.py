"""Metric definitions (benchmark/evaluate.py) on hand-made cases where the answer is known."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from baselines.base import SAEOutput
from benchmark import evaluate as ev
from benchmark.activations import model_key
from benchmark.data import non_special_mask, token_windows
from benchmark.evaluate import (
    WINDOW_COLUMNS,
    SpliceStats,
    activation_metrics,
    activation_metrics_group,
    evaluate_group,
    evaluate_sae,
    next_token_losses,
)
from benchmark.metrics import CE_RECOVERED_MIN_GAP
from benchmark.specs import DataSpec, SourceSpec
from tests.helpers import compose_config


class Identity(nn.Module):
    def forward(self, x):
        return SAEOutput(x, x, x)


class Constant(nn.Module):
    """x_hat = a fixed vector (zeros: the zero SAE; the dataset mean: the mean SAE); f = 0."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return SAEOutput(self.value.expand_as(x).to(x.dtype), torch.zeros(len(x), 3), x)


def test_fvu_uses_whole_set_mean_not_batch_means():
    # Two batches whose own means differ: per-batch centring would give a different answer.
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[11.0, 2.0], [13.0, 2.0]])
    s = SpliceStats()
    for x in (a, b):
        s.add(x, x + 0.5, torch.ones(2, 1))
    x = torch.cat([a, b])
    expected = (0.5**2 * 2 * 4) / ((x - x.mean(0)) ** 2).sum().item()
    assert s.fvu() == pytest.approx(expected, rel=1e-12)


def test_l0_and_firing_counts():
    s = SpliceStats()
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    s.add(torch.zeros(4, 2), torch.zeros(4, 2), f)
    assert s.active / s.n == pytest.approx(6 / 4)
    assert s.fired.tolist() == [3, 0, 3]


def test_next_token_losses_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 2.0  # position 0 predicts token 1
    tokens = torch.tensor([[0, 2, 1]])
    ce = next_token_losses(logits, tokens)
    z = torch.logsumexp(torch.tensor([0.0, 0.0, 2.0, 0.0]), 0)
    assert ce[0, 0].item() == pytest.approx((z - 2.0).item())
    assert ce[0, 1].item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_ratio_se_by_hand():
    """The LM set's SE: the linearised SE of sum(d) / sum(n) over windows."""
    # R = 6 / 4 = 1.5; residuals d - R n = -0.5, 0.5, 0; sqrt(3/2 * 0.5) / 4
    d, n = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0])
    assert ev.ratio_se(d, n) == pytest.approx((1.5 * 0.5) ** 0.5 / 4, rel=1e-12)
    # equal window sizes: the plain standard error of the windows' means (sd 1 / sqrt(3))
    assert ev.ratio_se(d, torch.ones(3)) == pytest.approx(3**-0.5, rel=1e-12)
    assert ev.ratio_se(torch.tensor([1.0]), torch.tensor([2.0])) != ev.ratio_se(d, n)  # NaN


# --- on the real bundled model -----------------------------------------------------------------
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def eval_set(bundled_model):
    """4 windows of 32 real evaluation-split tokens; BOS first (and between documents)."""
    cfg = compose_config(["data.context_length=32"])
    tokens = token_windows(DataSpec.of(cfg.data), bundled_model.tokenizer, "eval", 100)[:4]
    mask = non_special_mask(tokens, bundled_model.tokenizer)
    assert not mask[:, 0].any()
    _, cache = bundled_model.run_with_cache(tokens, names_filter=[HOOK])
    acts = cache[HOOK][mask].double()  # (n, d) the positions that count
    return tokens, mask, acts


def _metrics(model, sae, tokens, mask, hook=HOOK, **kw):
    """LM metrics + the activation-set metrics computed on the same positions' activations."""
    lm = evaluate_sae(model, sae, tokens, mask, hook, **kw)
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook].reshape(*tokens.shape, -1)[mask]
    act, freq = activation_metrics(sae, acts.split(7))
    return {**act, **lm}, freq


@pytest.mark.integration
def test_identity_sae_is_perfect(bundled_model, eval_set):
    tokens, mask, acts = eval_set
    m, freq = _metrics(bundled_model, Identity(), tokens, mask, batch_size=2)
    assert m["fvu"] == 0.0
    assert m["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["n_activation_tokens"] == mask.sum().item() == len(acts)  # BOS never counted
    # Scored CE positions: input and target both non-special.
    assert m["n_lm_tokens"] == (mask[:, :-1] & mask[:, 1:]).sum().item()


@pytest.mark.integration
def test_zero_sae_recovers_nothing(bundled_model, eval_set, tmp_path):
    tokens, mask, acts = eval_set
    zero = Constant(torch.zeros(acts.shape[1]))
    m, freq = _metrics(bundled_model, zero, tokens, mask, batch_size=2,
                       cache_dir=tmp_path, model_key="smollm2")  # fmt: skip
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["spliced_ce_loss"] == pytest.approx(m["zero_ce_loss"], abs=1e-6)
    assert m["l0"] == 0 and m["frac_dead"] == 1.0 and m["splice_l0"] == 0
    # FVU is centred on the dataset mean, so zeros give sum||x||^2 / sum||x - mean||^2 > 1.
    centred = ((acts - acts.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(((acts**2).sum() / centred).item(), rel=1e-6)
    # The zero-ablation and clean losses are cached and reused by the next SAE.
    assert len(list((tmp_path / "losses").glob("*.json"))) == 2


@pytest.mark.integration
def test_mean_sae_has_fvu_one(bundled_model, eval_set):
    tokens, mask, acts = eval_set
    mean = Constant(acts.mean(0).float())
    m, _ = _metrics(bundled_model, mean, tokens, mask, batch_size=4, kl_div=False)
    assert m["fvu"] == pytest.approx(1.0, rel=1e-5)
    assert m["delta_lm_loss"] > 0


@pytest.mark.integration
def test_cached_losses_are_reused(bundled_model, eval_set, tmp_path, monkeypatch):
    tokens, mask, _ = eval_set
    first = evaluate_sae(bundled_model, Identity(), tokens, mask, HOOK, batch_size=4,
                         cache_dir=tmp_path, model_key="m")  # fmt: skip

    passes = []
    real = ev.run_from
    monkeypatch.setattr(ev, "run_from", lambda *a, **k: passes.append(a[3]) or real(*a, **k))
    again = evaluate_sae(bundled_model, Identity(), tokens, mask, HOOK, batch_size=4,
                         cache_dir=tmp_path, model_key="m", kl_div=False)  # fmt: skip
    n_batches = -(-len(tokens) // 4)
    assert len(passes) == n_batches  # the spliced pass only: no clean, no zero-ablation pass
    assert again["clean_ce_loss"] == first["clean_ce_loss"]
    assert again["zero_ce_loss"] == first["zero_ce_loss"]
    # the clean cache keeps the per-window sums the SE needs (a cache without them is
    # recomputed): one [CE sum, count] per window
    (clean,) = (tmp_path / "losses").glob("clean-*.json")
    assert len(json.loads(clean.read_text())["windows"]) == len(tokens)
    assert again["delta_lm_loss_se"] == first["delta_lm_loss_se"]


@pytest.mark.integration
def test_delta_lm_loss_se_by_hand(bundled_model, eval_set):
    """delta_lm_loss_se: windows are the sampling units; checked against full passes computed
    here (clean, and with the mean spliced in at every counted position), in batches of 3
    windows so that the per-window sums cross a batch boundary; the per-window sums handed out
    (windows_out, a run's lm_windows.npy) are the same by-hand sums."""
    tokens, mask, acts = eval_set
    mean = acts.mean(0).float()
    windows: list[torch.Tensor] = []
    (m,) = evaluate_group(bundled_model, [(Constant(mean), HOOK)], tokens, mask, batch_size=3,
                          kl_div=False, windows_out=windows)  # fmt: skip

    def splice(act, hook):
        return torch.where(mask[..., None], mean.to(act.dtype), act)

    clean = next_token_losses(bundled_model(tokens), tokens).double()
    spliced = next_token_losses(bundled_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice)]),
                                tokens).double()  # fmt: skip
    scored = (mask[:, :-1] & mask[:, 1:]).double()
    d, n = ((spliced - clean) * scored).sum(-1), scored.sum(-1)
    r = d.sum() / n.sum()
    w = len(d)
    by_hand = ((w / (w - 1) * ((d - r * n) ** 2).sum()) ** 0.5 / n.sum()).item()
    assert m["n_lm_windows"] == 4
    assert m["delta_lm_loss"] == pytest.approx(r.item(), rel=1e-5)
    assert m["delta_lm_loss_se"] == pytest.approx(by_hand, rel=1e-4)
    assert m["delta_lm_loss_se"] > 0
    by_window = torch.stack([(clean * scored).sum(-1), (spliced * scored).sum(-1), n], dim=1)
    assert len(windows) == 1 and windows[0].shape == (4, len(WINDOW_COLUMNS))
    torch.testing.assert_close(windows[0], by_window, rtol=1e-5, atol=1e-3)
    assert torch.equal(windows[0][:, 2], n)  # scored positions: exact counts


@pytest.mark.integration
def test_ce_skips_positions_whose_target_is_bos(bundled_model):
    """Real eval windows with a document boundary inside: the CE counts position t only when
    tokens t and t+1 are both ordinary, and that changes the number (a BOS target costs ~11
    nats)."""
    cfg = compose_config(["data.context_length=128"])
    tokens = token_windows(DataSpec.of(cfg.data), bundled_model.tokenizer, "eval", 700)
    mask = non_special_mask(tokens, bundled_model.tokenizer)
    assert (mask[:, :-1] != (mask[:, :-1] & mask[:, 1:])).any(), "no BOS target in the sample"
    m = evaluate_sae(bundled_model, Identity(), tokens, mask, HOOK, batch_size=8, kl_div=False)
    ce = next_token_losses(bundled_model(tokens, return_type="logits"), tokens).double()
    new = ce[mask[:, :-1] & mask[:, 1:]].mean().item()
    old = ce[mask[:, :-1]].mean().item()
    assert m["clean_ce_loss"] == pytest.approx(new, rel=1e-6)
    assert abs(new - old) > 0.01  # the old rule (input-only mask) gave a different loss
    targets_bos = ce[mask[:, :-1] & ~mask[:, 1:]]
    assert targets_bos.mean() > 5.0  # predicting the separator is far from language modelling


@pytest.mark.integration
@pytest.mark.parametrize("site_hook", ["attn.hook_z", "hook_mlp_out", "hook_resid_post"])
def test_splice_changes_the_loss_at_every_site(bundled_model, eval_set, site_hook):
    """A zero SAE spliced at each site's hook changes the loss and equals zero ablation: the
    splice really writes at attention (per-head z, flattened), MLP and residual hooks."""
    tokens, mask, _ = eval_set
    hook = f"blocks.2.{site_hook}"
    _, cache = bundled_model.run_with_cache(tokens[:1], names_filter=[hook])
    width = cache[hook].reshape(1, tokens.shape[1], -1).shape[-1]
    m = evaluate_sae(bundled_model, Constant(torch.zeros(width)), tokens, mask, hook,
                     batch_size=4)  # fmt: skip
    assert m["spliced_ce_loss"] - m["clean_ce_loss"] > 0.01
    assert m["spliced_ce_loss"] == pytest.approx(m["zero_ce_loss"], abs=1e-6)


class _LogitsIgnoreActivations:
    """A stand-in LM whose logits do not depend on the hooked activation: zero ablation
    costs nothing, so CE recovered has a zero denominator."""

    blocks: list = []

    def __call__(self, tokens, stop_at_layer=None):  # the residual entering block 0
        return tokens

    def run_with_hooks(self, tokens, fwd_hooks, return_type="logits", start_at_layer=None):
        act = torch.ones(*tokens.shape, 3)
        for _, fn in fwd_hooks:
            fn(act)
        return torch.zeros(*tokens.shape, 5)


def test_ce_recovered_is_null_when_zero_ablation_costs_nothing():
    tokens = torch.tensor([[0, 1, 2, 3], [0, 3, 2, 1]])
    mask = tokens != 0
    m = evaluate_sae(_LogitsIgnoreActivations(), Identity(), tokens, mask, "blocks.0.h",
                     batch_size=1)  # fmt: skip
    assert m["zero_ce_loss"] - m["clean_ce_loss"] < CE_RECOVERED_MIN_GAP
    assert m["ce_loss_recovered"] is None
    assert m["delta_lm_loss"] == 0.0


def test_activation_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 1.0]])

    class Halve(nn.Module):  # x_hat = x / 2, f = x (latent 0 fires on 3 of 4 tokens)
        def forward(self, x):
            return SAEOutput(x / 2, x, x)

    m, freq = activation_metrics(Halve(), [x[:3], x[3:]])
    assert freq.tolist() == [0.75, 0.75]
    assert m["l0"] == pytest.approx(6 / 4)
    sse = ((x / 2) ** 2).sum().item()
    assert m["fvu"] == pytest.approx(sse / ((x - x.mean(0)) ** 2).sum().item())
    assert m["frac_dead"] == 0.0 and m["frac_freq_over_10pct"] == 1.0
    assert m["n_activation_tokens"] == 4


def test_loss_cache_key_names_the_whole_model_spec():
    """Clean/zero losses are cached per model spec: dtype, source, path and BOS all count."""
    base = SourceSpec.of(compose_config([]))
    keys = {model_key(base)}
    for o in ("model.dtype=bfloat16", "model.bos_token=null", "model.source=local",
              "model.path=/x"):  # fmt: skip
        keys.add(model_key(SourceSpec.of(compose_config([o]))))
    assert len(keys) == 5
    assert model_key(SourceSpec.of(compose_config(["model.dtype=float32"]))) == model_key(base)


def test_activation_metrics_group_reads_once_and_equals_separate_passes():
    """One pass for a group of SAEs at one site: each SAE's metrics and frequencies are those of
    its own pass (exactly), and the batches are read once."""
    from baselines.relu import ReLUSAE
    from baselines.topk import TopKSAE

    torch.manual_seed(0)
    saes = [TopKSAE(8, 32, k=3), ReLUSAE(8, 32), TopKSAE(8, 32, k=5)]
    data = [torch.randn(16, 8) for _ in range(4)]
    reads = []

    def batches():
        for x in data:
            reads.append(1)
            yield x

    grouped = activation_metrics_group(saes, batches())
    assert len(reads) == len(data)
    for sae, (metrics, freq) in zip(saes, grouped, strict=True):
        alone, alone_freq = activation_metrics(sae, data)
        assert metrics == alone and torch.equal(freq, alone_freq)
    assert grouped[0][0]["l0"] == pytest.approx(3.0)
