"""GPU precision on the CPU: the chunked log-probabilities equal a full-vocabulary computation,
train.precision is validated (tf32/bf16 need CUDA), fp32 stays the exact default (weights and
config hashes), and the bf16 autocast step keeps fp32 parameters, Adam state and loss (run on
the CPU's autocast at a tiny size, by bypassing the CUDA check). The CUDA versions of the last
checks are in tests/test_slow_gpu.py (`pytest -m gpu`)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmark import evaluate, identity
from benchmark.errors import ConfigError
from benchmark.saes import build_sae
from benchmark.train import PRECISIONS, Sparsity, TrainConfig, Trainer, matmul_precision
from benchmark.validate import check_run
from tests.helpers import compose_config, sae_from_conf

B, T, V = 3, 11, 37  # 3 x 10 = 30 predictor rows: 10 chunks of 3


def _logits(dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, T, V, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_next_token_losses_equal_full_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(evaluate, "LOGPROB_CHUNK", 3)
    logits = _logits(dtype, 0)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    got = evaluate.next_token_losses(logits, tokens)  # (B, T-1)
    want = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(B, T - 1)
    assert got.dtype == torch.float32 and got.shape == (B, T - 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_sum_equals_full_kl(monkeypatch, dtype):
    monkeypatch.setattr(evaluate, "LOGPROB_CHUNK", 3)
    clean, spliced = _logits(dtype, 2), _logits(dtype, 3)
    pm = torch.rand(B, T - 1, generator=torch.Generator().manual_seed(4)) < 0.6  # scored rows
    pm[0, -1] = pm[-1, 0] = True  # row ends and starts included
    lp_clean = F.log_softmax(clean[:, :-1][pm].float(), dim=-1)  # (n, V) all at once
    lp = F.log_softmax(spliced[:, :-1][pm].float(), dim=-1)
    want = F.kl_div(lp, lp_clean, log_target=True, reduction="sum").item()
    assert evaluate._kl_sum(clean, spliced, pm) == pytest.approx(want, rel=1e-6, abs=1e-6)
    # every chunk size gives the same rows in the same order
    for chunk in (1, 7, 1000):
        monkeypatch.setattr(evaluate, "LOGPROB_CHUNK", chunk)
        rows = torch.cat([c for _, c in evaluate._log_probs_chunks(clean, pm)])
        torch.testing.assert_close(rows, lp_clean, rtol=0, atol=1e-6)


# ---- train.precision: values and devices ----


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.precision must be one of fp32, tf32, bf16"):
        TrainConfig(n_tokens=64, batch_size=64, precision="fp16")
    with pytest.raises(ConfigError, match=r"train\.precision"):
        TrainConfig.from_dict({"n_tokens": 64, "batch_size": 64, "precision": "bfloat16"})


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_precision_on_a_cpu_sae_fails_when_the_trainer_is_built(precision):
    sae = build_sae({"_target_": "baselines.relu.ReLUSAE", "coefficient": 1e-2}, 8, 16)
    tc = TrainConfig(n_tokens=64, batch_size=64, precision=precision)
    with pytest.raises(ConfigError, match=rf"train\.precision={precision} needs CUDA"):
        Trainer(sae, tc, Sparsity("coefficient"), progress=False)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_precision_with_device_cpu_fails_up_front(precision):
    cfg = compose_config([f"train.precision={precision}", "device=cpu"])
    with pytest.raises(ConfigError, match=rf"train\.precision={precision} needs CUDA"):
        check_run(cfg)
    check_run(compose_config([f"train.precision={precision}", "device=cuda"]))  # a GPU: fine


def test_fp32_is_every_recipes_default_and_passes():
    for recipe in ("paper", "cpu", "smoke"):
        cfg = compose_config([f"train={recipe}", "device=cpu"])
        assert cfg.train.precision == "fp32"
        check_run(cfg)
        assert TrainConfig.from_dict(OmegaConf.to_container(cfg.train)).precision == "fp32"  # type: ignore[arg-type]
    assert PRECISIONS == ("fp32", "tf32", "bf16")


def test_fp32_keeps_the_config_hash_of_a_config_without_the_key():
    """Runs from before the option keep their folders; tf32/bf16 change numbers: new hashes."""
    cfg = compose_config([])
    without = OmegaConf.create(OmegaConf.to_container(cfg))
    del without.train["precision"]
    assert identity.config_hash(cfg) == identity.config_hash(without)
    assert identity.curve_hash(cfg) == identity.curve_hash(without)
    others = {identity.config_hash(compose_config([f"train.precision={p}"])) for p in PRECISIONS}
    assert len(others) == 3


# ---- the training step ----


def _batches(d_in: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g) / d_in**0.5 for _ in range(6)]


def _train(sae, tc: TrainConfig, xs, *, bypass: str | None = None) -> Trainer:
    trainer = Trainer(sae, tc, Sparsity("target_l0", 8), progress=False)
    if bypass is not None:  # the CUDA-only precision on the CPU's autocast (tests only)
        trainer.cfg.precision = bypass
    for x in xs:
        trainer.step(x)
    return trainer


@pytest.mark.parametrize("name", ["jumprelu", "gated", "topk", "relu"])
def test_fp32_step_is_unchanged_by_the_option(name):
    """precision=fp32 and a recipe without the key give bit-identical weights and state."""
    xs = _batches(16, 64)
    base = dict(n_tokens=64 * 6, batch_size=64, lr=1e-2, lr_warmup_steps=1, log_every=1)
    trainers = []
    for tc in (TrainConfig(**base, precision="fp32"), TrainConfig.from_dict(base)):
        torch.manual_seed(0)
        trainers.append(_train(sae_from_conf(name, 16, 64), tc, xs))
    a, b = (t.sae.state_dict() for t in trainers)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainers[0].state.history == trainers[1].state.history
    sa, sb = (t.opt.state_dict()["state"] for t in trainers)
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_fp32_and_tf32_contexts_leave_the_flags_as_they_were():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with matmul_precision("fp32", "cuda"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    for backward in (False, True):
        with matmul_precision("tf32", "cuda", backward=backward):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    with matmul_precision("bf16", "cpu", backward=True):  # backward: outside autocast
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("jumprelu", []), ("jumprelu", ["+sae.sparse=true"]), ("gated", []), ("topk", []),
     ("topk", ["+sae.sparse=false"]), ("relu", []), ("batchtopk", []),
     ("matryoshka_batchtopk", [])],
)  # fmt: skip
def test_bf16_autocast_step_keeps_fp32_state(name, overrides):
    """On the CPU's autocast (tiny sizes): forward and loss run under autocast, the parameters, gradients,
    Adam moments and logged loss stay fp32; the first loss is within 2% of the fp32 one (bf16
    has an 8-bit mantissa: ~0.4% per product)."""
    xs = _batches(32, 64)
    tc = dict(n_tokens=64 * 6, batch_size=64, lr=1e-3, lr_warmup_steps=1, log_every=1)
    seen: list[bool] = []
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        sae = sae_from_conf(name, 32, 128, overrides)
        loss = sae.loss

        def spy(x, _loss=loss, **kw):
            seen.append(torch.is_autocast_enabled("cpu"))
            return _loss(x, **kw)

        sae.loss = spy  # type: ignore[method-assign]
        bypass = None if precision == "fp32" else precision
        runs[precision] = _train(sae, TrainConfig(**tc), xs, bypass=bypass)
    assert seen == [False] * 6 + [True] * 6  # the loss (and forward) under autocast for bf16
    bf16 = runs["bf16"]
    assert all(p.dtype == torch.float32 for p in bf16.sae.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.sae.parameters())
    moments = [v for s in bf16.opt.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    first = [r.state.history[0] for r in (runs["fp32"], runs["bf16"])]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=2e-2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16.state.history)


def test_bf16_step_feeds_the_loss_as_fp32(monkeypatch):
    """Whatever dtype a loss term comes out of autocast in, the step's loss and terms are fp32."""
    sae = build_sae({"_target_": "baselines.relu.ReLUSAE", "coefficient": 1e-2}, 16, 32)
    loss = sae.loss
    sae.loss = lambda x, **kw: {k: v.bfloat16() for k, v in loss(x, **kw).items()}  # type: ignore[method-assign]
    rows = []
    tc = TrainConfig(n_tokens=128, batch_size=64, log_every=1)
    trainer = Trainer(sae, tc, Sparsity("coefficient"), progress=False,
                      log=lambda row, step: rows.append(row))  # fmt: skip
    trainer.cfg.precision = "bf16"
    backward = torch.Tensor.backward
    dtypes = []

    def spy_backward(t, *a, **kw):
        dtypes.append(t.dtype)
        return backward(t, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    for x in itertools.islice(_batches(16, 64), 2):
        trainer.step(x)
    assert dtypes == [torch.float32, torch.float32] and len(rows) == 2
