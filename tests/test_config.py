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
NEEDS = {"coefficient": ["sparsity.coefficient=0.001", "sae=jumprelu"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}", *NEEDS.get(option, [])])
    check_run(cfg)
    d_in = site_width(cfg)
    if group in ("sae", "sparsity", "train", "site"):  # the SAE is built for real
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
