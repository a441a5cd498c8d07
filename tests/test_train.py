"""The trainer: schedules, matched-L0 calibration, dead-latent window, resume, NaN guard."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, TrainingDiverged, lr_multiplier, train_sae

D, N_TRUE = 16, 64


def synthetic_batches(batch_size=256, seed=0):
    """Sparse combinations of N_TRUE unit directions: a dictionary an SAE can recover."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N_TRUE, D, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def factory(skip: int):
        gen = torch.Generator().manual_seed(seed + 1)

        def stream():
            while True:
                on = torch.rand(batch_size, N_TRUE, generator=gen) < 4 / N_TRUE
                yield (on * torch.rand(batch_size, N_TRUE, generator=gen)) @ dirs

        return itertools.islice(stream(), skip, None)

    return factory


def cfg(**kw):
    base = dict(n_tokens=256 * 60, batch_size=256, lr=3e-3, lr_warmup_steps=5,
                coefficient_warmup_steps=10, calibration_frac=0.6, calibration_gain=0.1,
                log_every=10, dead_window_tokens=2048)  # fmt: skip
    return TrainConfig(**{**base, **kw})


NODES = {
    "jumprelu": {"_target_": "baselines.jumprelu.JumpReLUSAE", "coefficient": 1e-3,
                 "bandwidth": 0.05, "threshold_init": 0.05},
    "topk": {"_target_": "baselines.topk.TopKSAE", "k": 4},
    "relu": {"_target_": "baselines.relu.ReLUSAE", "coefficient": 1e-2},
}  # fmt: skip


def test_lr_schedule_cosine_warmup_and_linear_decay():
    c = cfg(lr_warmup_steps=10, lr_warmup_start=0.1, lr_decay="linear", lr_decay_frac=0.5,
            n_tokens=256 * 40)  # fmt: skip
    assert lr_multiplier(0, c) == pytest.approx(0.1)
    assert lr_multiplier(5, c) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_multiplier(10, c) == 1.0
    assert lr_multiplier(20, c) == pytest.approx(1.0)  # decay starts at step 20 of 40
    assert lr_multiplier(30, c) == pytest.approx(0.5)


def test_coefficient_warmup_linear_in_coefficient_mode():
    sae = build_sae(NODES["relu"], D, 32)
    seen = []
    sae_loss = sae.loss

    def spy(x, **kw):
        seen.append(kw["coefficient"])
        return sae_loss(x, **kw)

    sae.loss = spy  # type: ignore[method-assign]
    train_sae(sae, synthetic_batches(), cfg(n_tokens=256 * 12), Sparsity("coefficient"),
              progress=False)  # fmt: skip
    assert seen[:3] == pytest.approx([0.0, 1e-3, 2e-3]) and seen[10:] == pytest.approx([1e-2] * 2)


@pytest.mark.parametrize("name", ["jumprelu", "relu"])
def test_target_l0_calibration_reaches_target_then_freezes(name):
    torch.manual_seed(0)
    sae = build_sae(NODES[name], D, 64)
    c = cfg(n_tokens=256 * 150, calibration_frac=0.8, lr_decay="linear", lr_decay_frac=0.2)
    res = train_sae(sae, synthetic_batches(), c, Sparsity("target_l0", 6.0), progress=False)
    assert res.train_l0 == pytest.approx(6.0, rel=0.25)
    assert res.coefficient != NODES[name]["coefficient"]
    calib_end = int(c.calibration_frac * c.total_steps)
    frozen = [r["coefficient"] for r in res.history if r["step"] > calib_end]
    assert len(set(frozen)) == 1  # lambda no longer moves after calibration


def test_resume_gives_identical_weights(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return build_sae(NODES["topk"], D, 64)

    c = cfg(checkpoint_every=7)
    full = fresh()
    train_sae(full, synthetic_batches(), c, Sparsity("target_l0", 4.0), progress=False)
    ckpt = tmp_path / "ckpt.pt"
    part = fresh()
    train_sae(part, synthetic_batches(), c, Sparsity("target_l0", 4.0), checkpoint_path=ckpt,
              stop_after=23, progress=False)  # fmt: skip
    resumed = fresh()  # a new process would start from scratch weights, then load
    res = train_sae(resumed, synthetic_batches(), c, Sparsity("target_l0", 4.0),
                    checkpoint_path=ckpt, progress=False)  # fmt: skip
    assert res.steps == c.total_steps
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_of_calibrating_jumprelu_identical(tmp_path):
    def fresh():
        torch.manual_seed(1)
        return build_sae(NODES["jumprelu"], D, 64)

    c = cfg(checkpoint_every=5)
    full = fresh()
    r_full = train_sae(full, synthetic_batches(), c, Sparsity("target_l0", 6.0), progress=False)
    part = fresh()
    ckpt = tmp_path / "c.pt"
    train_sae(part, synthetic_batches(), c, Sparsity("target_l0", 6.0), checkpoint_path=ckpt,
              stop_after=17, progress=False)  # fmt: skip
    resumed = fresh()
    r = train_sae(resumed, synthetic_batches(), c, Sparsity("target_l0", 6.0),
                  checkpoint_path=ckpt, progress=False)  # fmt: skip
    assert r.coefficient == r_full.coefficient
    assert torch.equal(full.threshold, resumed.threshold)


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(NODES["relu"], D, 32)
    good = synthetic_batches()

    def poisoned(skip):
        it = good(skip)
        for i in itertools.count(skip):
            x = next(it)
            yield x * float("nan") if i == 12 else x

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingDiverged, match="at step 12"):
        train_sae(sae, poisoned, cfg(checkpoint_every=5), Sparsity("coefficient"),
                  checkpoint_path=ckpt, progress=False)  # fmt: skip
    state = torch.load(ckpt, weights_only=False)["state"]
    assert state.step == 10  # the last checkpoint before the bad step
    assert all(
        torch.isfinite(v).all() for v in torch.load(ckpt, weights_only=False)["sae"].values()
    )


def test_dead_window_feeds_auxk_only_after_window():
    torch.manual_seed(0)
    sae = build_sae({**NODES["topk"], "k": 1}, D, 256)  # many latents never win the top-1
    masks = []
    loss = sae.loss

    def spy(x, **kw):
        masks.append(None if kw["dead_mask"] is None else int(kw["dead_mask"].sum()))
        return loss(x, **kw)

    sae.loss = spy  # type: ignore[method-assign]
    c = cfg(n_tokens=256 * 20, dead_window_tokens=256 * 8)
    res = train_sae(sae, synthetic_batches(), c, Sparsity("target_l0", 1.0), progress=False)
    assert masks[:8] == [0] * 8  # nobody can be dead before the window has passed
    assert max(masks[8:]) > 0
    assert any(r["auxk"] > 0 for r in res.history)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr_decay"):
        cfg(lr_decay="exp")
    with pytest.raises(ValueError, match="less than one batch"):
        cfg(n_tokens=10)
    with pytest.raises(ValueError, match="target_l0"):
        Sparsity("target_l0", None)
    assert math.isclose(cfg().total_steps, 60)


def test_param_lr_scale_puts_a_parameter_in_its_own_group():
    from benchmark.train import _param_groups

    sae = build_sae(NODES["jumprelu"], D, 32)
    groups = _param_groups(sae, {"raw_threshold": 0.1, "not_a_param": 5.0})
    scales = {g["lr_scale"]: g["params"] for g in groups}
    assert set(scales) == {1.0, 0.1}
    assert scales[0.1] == [sae.raw_threshold]
    before = sae.raw_threshold.detach().clone()
    c = cfg(n_tokens=256, lr=1e-2, lr_warmup_steps=0, param_lr_scale={"raw_threshold": 0.1})
    train_sae(sae, synthetic_batches(), c, Sparsity("coefficient"), progress=False)
    # Adam's first step moves each element by ~lr (beta1 = 0): here 0.1 x 1e-2, or not at all.
    moved = (sae.raw_threshold.detach() - before).abs()
    assert moved.max() <= 1e-3 * 1.01 and moved.max() > 0
