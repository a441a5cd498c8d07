"""Every config group option and every experiment preset composes, validates and instantiates;
typos and impossible combinations fail in a second with a message naming the bad value."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from benchmark.errors import ConfigError
from benchmark.saes import build_sae
from benchmark.validate import check_run, check_targets, dictionary_size, site_width
from tests.helpers import CONF, compose_config

GROUPS = ["model", "layer", "site", "sae", "sparsity", "data", "train", "eval", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
NEEDS = {
    "coefficient": ["sparsity.coefficient=0.001", "sae=jumprelu"],
    "none": ["sae=gemma_scope", "sae.path=/some/params.npz"],  # evaluate-only: a given SAE
    "local": ["data.path=/some/corpus.txt"],  # data=local needs a path (checked up front)
}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}", *NEEDS.get(option, [])])
    check_run(cfg)
    d_in = site_width(cfg)
    if group in ("sae", "sparsity", "train", "site") and option != "none":  # built for real
        sae = build_sae(cfg.sae, d_in, min(dictionary_size(cfg, d_in), 4096))
        assert sae.d_in == d_in
    if group == "logger":
        assert hasattr(instantiate(cfg.logger), "log")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_with_its_sweep(preset):
    cfg = compose_config([f"+experiment={preset}"])
    assert cfg.experiment_name == preset
    check_run(cfg)
    params = cfg.hydra.sweeper.params if "hydra" in cfg else None
    # Each sweep value composes and validates too (the grid is the preset's point).
    for key, values in (params or {}).items():
        for value in str(values).split(","):
            check_run(compose_config([f"+experiment={preset}", f"{key}={value}"]))


def test_all_target_nodes_are_checked():
    assert check_targets(compose_config()) >= 2  # sae and logger at least


def test_typo_in_sae_key_names_the_key_and_valid_ones():
    cfg = compose_config(["sae=jumprelu", "+sae.bandwith=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bandwith'\].*bandwidth"):
        check_run(cfg)


def test_unimportable_target_is_reported():
    cfg = compose_config(["sae=jumprelu", "sae._target_=baselines.jumprelu.JumpReLUSAEE"])
    with pytest.raises(ConfigError, match="JumpReLUSAEE"):
        check_run(cfg)


def test_target_l0_larger_than_dictionary():
    cfg = compose_config(["sae=topk", "sparsity=l0_160", "train.width=100"])
    with pytest.raises(ConfigError, match=r"target_l0=160 must be in \[1, d_sae=100\]"):
        check_run(cfg)


def test_topk_with_a_coefficient_is_rejected():
    cfg = compose_config(["sae=topk", "sparsity=coefficient", "sparsity.coefficient=0.1"])
    with pytest.raises(ConfigError, match="k"):
        check_run(cfg)


def test_coefficient_mode_needs_a_coefficient():
    with pytest.raises(ConfigError, match="sparsity.coefficient"):
        check_run(compose_config(["sparsity=coefficient"]))


def test_layer_index_override_and_named_layers():
    assert compose_config(["layer=middle"]).layer.index == 14
    assert compose_config(["model=gemma2_9b", "layer=late"]).layer.index == 31
    assert compose_config(["layer.index=3"]).layer.index == 3


def test_sparsity_coefficient_flows_into_the_sae():
    cfg = compose_config(["sae=jumprelu", "sparsity=coefficient", "sparsity.coefficient=0.02"])
    assert build_sae(cfg.sae, 8, 16).coefficient == 0.02
    cfg = compose_config(["sae=topk", "sparsity=l0_20"])
    assert build_sae(cfg.sae, 8, 64).k == 20


@pytest.mark.parametrize(
    "override,message",
    [
        ("+data.n_eval_tokes=100", r"unknown key\(s\) data\.n_eval_tokes; valid keys: .*n_eval_tokens"),
        ("data.n_eval_tokens=0", r"data\.n_eval_tokens=0 is invalid: must be a positive integer"),
        ("data.eval_fraction=1.5", r"data\.eval_fraction=1\.5 .* in \(0, 1\)"),
        ("data.stream=maybe", r"data\.stream='maybe' .* true or false"),
        ("+eval.kl=true", r"unknown key\(s\) eval\.kl; valid keys: .*kl_div"),
        ("eval.batch_size=0", r"eval\.batch_size=0 is invalid"),
        ("eval.n_activation_tokens=-5", r"eval\.n_activation_tokens=-5 is invalid"),
        ("seed=-1", r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
        ("sparsity.target_l0=abc", r"sparsity\.target_l0=abc must be in \[1, d_sae="),
        ("model.dtype=float8", r"model\.dtype='float8' is not one of auto, float32"),
        ("layer.index=99", r"layer\.index=99 is out of range for model=smollm2_135m: valid 0\.\.29"),
        ("+foo=1", r"unknown top-level key\(s\) foo; valid: "),
        ("train.width=0", r"train\.width=0 must be a positive integer"),
    ],
)  # fmt: skip
def test_data_eval_seed_and_sparsity_values_are_checked_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        check_run(compose_config([override]))


def test_a_nan_coefficient_is_rejected_before_training():
    cfg = compose_config(["sparsity=coefficient", "sparsity.coefficient=nan"])
    with pytest.raises(ConfigError, match=r"sparsity\.coefficient=nan must be a finite number"):
        check_run(cfg)


def test_batchtopk_typo_is_caught_by_its_explicit_signature():
    cfg = compose_config(["sae=batchtopk", "sparsity=l0_20", "+sae.threshold_momentun=0.9"])
    with pytest.raises(ConfigError, match=r"\['threshold_momentun'\].*threshold_momentum"):
        check_run(cfg)


def test_bad_train_value_fails_before_any_model_or_data_work(tmp_path, monkeypatch):
    """plan_run builds TrainConfig and the SAE first: a bad recipe value never waits for a
    harvest (the model loader and the activation store are booby-trapped here)."""
    from benchmark import activations, models, run

    def trap(*a, **k):
        raise AssertionError("heavy work started before validation")

    monkeypatch.setattr(models, "load_model", trap)
    monkeypatch.setattr(activations, "get_activation_store", trap)
    for bad in ("train.calibration_frac=2", "train.n_tokens=100", "train.lr=abc"):
        with pytest.raises(ConfigError, match=r"train\."):
            run.run(compose_config([bad, f"results_dir={tmp_path}"]), tmp_path / "x", {})


def test_the_sae_gets_the_same_initial_weights_whatever_ran_before():
    """The seed is set right before the SAE is built (plan_run), so a run that harvested (and
    drew random numbers doing it) starts from the same weights as one that hit the cache."""
    import torch

    from benchmark.run import plan_run

    cfg = compose_config(["sae=jumprelu", "train=smoke"])
    first = plan_run(cfg).sae.state_dict()
    torch.rand(1000)  # what a harvest or anything else might draw
    second = plan_run(cfg).sae.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    run = subprocess.run(
        [sys.executable, "-m", "benchmark.run", "train.lr=abc", f"results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.lr" in errors[0] and "abc" in errors[0]
    assert "Traceback" not in run.stderr


def test_local_data_without_a_path_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"data=local needs data.path="):
        check_run(compose_config(["data=local"]))


def test_evaluate_only_needs_a_given_sae():
    with pytest.raises(ConfigError, match=r"train=none evaluates a given SAE: use sae=gemma_scope"):
        check_run(compose_config(["train=none"]))
    check_run(compose_config(["train=none", "sae=saelens", "sae.path=/x"]))  # sizes: the file's
