"""The trainer: schedules, matched-L0 calibration, dead-latent window, resume, NaN guard."""

from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from benchmark.errors import ConfigError
from benchmark.saes import build_sae
from benchmark.train import (
    NON_TRAINER_KEYS,
    Sparsity,
    TrainConfig,
    TrainingDiverged,
    lr_multiplier,
    read_checkpoint,
    train_sae,
    write_history,
)
from tests.helpers import compose_config

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
    r_full = train_sae(full, synthetic_batches(), c, Sparsity("target_l0", 4.0), progress=False)
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
    assert res.history == r_full.history  # the rows before the interruption came back too


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
    saved = read_checkpoint(ckpt)
    assert saved["state"]["step"] == 10  # the last checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in saved["sae"].values())


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


# --- strict config ------------------------------------------------------------------------


def test_from_dict_rejects_an_unknown_key_naming_it_and_the_valid_keys():
    d = {"n_tokens": 1024, "batch_size": 256, "lr": 1e-3, "name": "cpu", "width": None,
         "width_factor": 8}  # fmt: skip
    assert set(NON_TRAINER_KEYS) <= set(d) and TrainConfig.from_dict(d).lr == 1e-3
    # JumpReLU's values belong to its SAE config now: a train block of them is a stray key
    with pytest.raises(ConfigError, match=r"train\.jumprelu\b"):
        TrainConfig.from_dict({**d, "jumprelu": {"bandwidth": 0.03, "threshold_init": 0.05}})
    with pytest.raises(ConfigError, match=r"train\.dead_window_token\b") as err:
        TrainConfig.from_dict({**d, "dead_window_token": 5000})  # typo: silently ignored before
    assert "valid keys:" in str(err.value)
    assert all(k in str(err.value) for k in ("dead_window_tokens", "dead_window_frac", "lr"))


@pytest.mark.parametrize(
    "key,value",
    [("lr", "abc"), ("lr", float("nan")), ("lr", 0.0), ("batch_size", 0), ("batch_size", 2.5),
     ("adam_betas", (0.9, 1.0)), ("adam_eps", 0.0), ("lr_warmup_steps", -1),
     ("lr_decay_frac", 1.5), ("calibration_frac", -0.1), ("calibration_gain", float("inf")),
     ("dead_window_tokens", 0), ("dead_window_frac", 0.0), ("checkpoint_every", -1),
     ("log_every", 0), ("grad_clip", 0.0), ("param_lr_scale", {"raw_threshold": float("nan")})],
)  # fmt: skip
def test_bad_values_raise_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^train\.{key}\S* must be .*got"):
        TrainConfig.from_dict({"n_tokens": 4096, "batch_size": 256, key: value})


def test_lr_abc_fails_with_one_clear_message():
    with pytest.raises(ConfigError) as err:
        cfg(lr="abc")
    assert str(err.value) == "train.lr must be a finite number > 0, got 'abc'"


@pytest.mark.parametrize(
    "overrides,window",
    [(["train=paper"], 10_000_000), (["train=cpu"], 150_000), (["train=smoke"], 2048),
     (["+experiment=quickstart"], 40_000)],
)  # fmt: skip
def test_every_recipe_passes_from_dict_with_its_documented_dead_window(overrides, window):
    train = OmegaConf.to_container(compose_config(overrides).train, resolve=True)
    assert TrainConfig.from_dict(train).dead_window == window  # type: ignore[arg-type]


# --- dead-latent window -------------------------------------------------------------------


def test_dead_window_scales_with_the_run_capped_and_at_least_one_batch():
    quickstart = TrainConfig(n_tokens=160_000, batch_size=512, dead_window_tokens=200_000,
                             dead_window_frac=0.25)  # fmt: skip
    assert quickstart.dead_window == 40_000
    assert TrainConfig(n_tokens=160_000, batch_size=512, dead_window_tokens=200_000).dead_window \
        == 200_000  # fmt: skip
    assert cfg(dead_window_tokens=1000, dead_window_frac=0.5).dead_window == 1000  # the cap
    assert cfg(dead_window_frac=1e-6).dead_window == 256  # one batch at least


def test_dead_window_frac_switches_auxk_on_in_a_run_shorter_than_the_cap():
    torch.manual_seed(0)
    sae = build_sae(NODES["topk"], D, 64)
    with torch.no_grad():  # latent 0 can never reach the top-k: it is dead by construction
        sae.W_enc[:, 0] = 0.0
        sae.b_enc[0] = -100.0
    masks = []
    loss = sae.loss

    def spy(x, **kw):
        masks.append(kw["dead_mask"].clone())
        return loss(x, **kw)

    sae.loss = spy  # type: ignore[method-assign]
    # The cap alone (200k tokens) is longer than the run (10k): AuxK would never switch on.
    c = cfg(n_tokens=256 * 40, dead_window_tokens=200_000, dead_window_frac=0.25)
    res = train_sae(sae, synthetic_batches(), c, Sparsity("target_l0", 4.0), progress=False)
    assert res.dead_window_tokens == c.dead_window == 2560  # 10 steps of 256
    assert not any(m.any() for m in masks[:10])
    assert all(m[0] for m in masks[10:])  # dead from the first step after the window
    assert res.final_frac_dead >= 1 / 64
    assert all(r["auxk"] > 0 for r in res.history if r["step"] > 10)


# --- NaN guard on gradients and parameters ------------------------------------------------


def test_inf_gradient_with_finite_loss_stops_before_the_step(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(NODES["relu"], D, 32)
    ckpt = tmp_path / "ckpt.pt"
    calls, seen = itertools.count(), {}

    def poison(grad):  # a tensor hook on W_enc: its gradient at step 14 holds an inf
        if next(calls) != 14:
            return grad
        seen["ckpt"] = ckpt.read_bytes()  # the step-10 checkpoint
        seen["weights"] = {k: v.clone() for k, v in sae.state_dict().items()}
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    sae.W_enc.register_hook(poison)
    with pytest.raises(TrainingDiverged, match="non-finite gradient of W_enc at step 14"):
        train_sae(sae, synthetic_batches(), cfg(checkpoint_every=5), Sparsity("coefficient"),
                  checkpoint_path=ckpt, progress=False)  # fmt: skip
    # Before: Adam turned the inf into NaN weights, saved by the step-15 checkpoint.
    assert ckpt.read_bytes() == seen["ckpt"]
    assert read_checkpoint(ckpt)["state"]["step"] == 10
    for k, v in sae.state_dict().items():
        assert torch.equal(v, seen["weights"][k]), k  # no step was taken


def test_non_finite_parameter_after_a_step_is_never_checkpointed(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(NODES["relu"], D, 32)
    ckpt = tmp_path / "ckpt.pt"
    calls = itertools.count()
    after = sae.after_optimizer_step

    def corrupt():  # stands in for a projection that divides by zero
        after()
        if next(calls) == 9:
            sae.b_enc.data[3] = float("nan")

    sae.after_optimizer_step = corrupt  # type: ignore[method-assign]
    with pytest.raises(TrainingDiverged, match="non-finite parameter b_enc at step 9"):
        train_sae(sae, synthetic_batches(), cfg(checkpoint_every=5), Sparsity("coefficient"),
                  checkpoint_path=ckpt, progress=False)  # fmt: skip
    saved = read_checkpoint(ckpt)
    assert saved["state"]["step"] == 5  # before: the step-10 checkpoint held the NaN
    assert all(torch.isfinite(v).all() for v in saved["sae"].values())


# --- history ------------------------------------------------------------------------------


def test_history_csv_has_every_column_and_monotone_tokens(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(NODES["topk"], D, 64)
    c = cfg(n_tokens=256 * 25, log_every=10, dead_window_frac=0.25)
    res = train_sae(sae, synthetic_batches(), c, Sparsity("target_l0", 4.0), progress=False)
    path = write_history(tmp_path / "history.csv", res.history)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"step", "tokens", "lr", "coefficient", "l0", "l0_ema", "mse", "fvu",
                            "loss", "auxk", "frac_dead"}  # fmt: skip
    assert [int(r["step"]) for r in rows] == [1, 10, 20, 25]  # step 1 too: short runs get rows
    assert [int(r["tokens"]) for r in rows] == [256, 2560, 5120, 6400]
    assert float(rows[0]["lr"]) == pytest.approx(c.lr * lr_multiplier(0, c))
    assert float(rows[-1]["frac_dead"]) == res.final_frac_dead
    assert res.dead_window_tokens == 1600


def test_history_coefficient_is_the_lambda_used_in_the_step():
    sae = build_sae(NODES["relu"], D, 32)
    c = cfg(n_tokens=256 * 20, log_every=5)
    res = train_sae(sae, synthetic_batches(), c, Sparsity("coefficient"), progress=False)
    # Linear warm-up over 10 steps: the row of step s used lambda at step index s - 1.
    assert [r["coefficient"] for r in res.history] == pytest.approx([0.0, 4e-3, 9e-3, 1e-2, 1e-2])


def test_spike_watch_by_hand():
    """The loss-spike watch: the EMA (0.9) of the batch FVU, the largest ratio of a batch's FVU
    to the EMA before it from the lr warm-up's end, the first step over SPIKE_JUMP."""
    from benchmark.train import SPIKE_JUMP, TrainState, spike_watch

    state = TrainState()
    for step, fvu in enumerate([1.0, 0.5, 9.0, 0.2, 0.2, 5.0]):
        spike_watch(state, fvu, step, warmup_steps=3)
    # EMA: 1.0, 0.95, 1.755 (step 2 is in the warm-up: 9.0 is not judged), then step 3:
    # 0.2 / 1.755; EMA 1.5995; step 4: 0.2 / 1.5995; EMA 1.45955; step 5: 5.0 / 1.45955
    assert state.max_fvu_jump == pytest.approx(5.0 / 1.45955, rel=1e-9)
    assert state.spike_step == -1 and 5.0 / 1.45955 < SPIKE_JUMP
    spike_watch(state, 100.0, 6, warmup_steps=3)  # 100 / 1.813595: a spike
    assert state.spike_step == 6 and state.max_fvu_jump == pytest.approx(100 / 1.813595)
    spike_watch(state, 1000.0, 7, warmup_steps=3)
    assert state.spike_step == 6  # the first one is kept
    spike_watch(state, float("nan"), 8, warmup_steps=3)  # a NaN FVU (zero variance) is skipped
    assert math.isfinite(state.fvu_ema)
