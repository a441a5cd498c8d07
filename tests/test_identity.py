"""Run identity (benchmark/identity.py, benchmark/run.py): a run is its config.

Two configs that can give different numbers never share a folder or a hash; bookkeeping keys
never change it; the curve hash ignores only the swept sparsity value and the seed; a folder
holding another config's run is refused; a finished record is never replaced by a failure."""

from __future__ import annotations

import itertools
import json

import pytest
from omegaconf import OmegaConf

from benchmark import identity
from benchmark.errors import ConfigError
from benchmark.results import read_result, write_result
from benchmark.run import check_folder, record_failure
from tests.helpers import CONF, ROOT, compose_config

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _grid(preset: str) -> list[list[str]]:
    cfg = compose_config([f"+experiment={preset}"])
    params = cfg.hydra.sweeper.params if "hydra" in cfg else {}
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in (params or {}).items()]
    return [list(combo) for combo in itertools.product(*axes)]


def _name(overrides: list[str]) -> str:
    cfg = compose_config(overrides)
    sae = next((o.split("=")[1] for o in overrides if o.startswith("sae=")), "jumprelu")
    return identity.run_name(cfg, sae)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_grid_maps_to_distinct_folders(preset):
    grid = _grid(preset)
    names = [_name([f"+experiment={preset}", *combo]) for combo in grid]
    assert len(names) == len(set(names)) == len(grid)


def test_a_coefficient_sweep_maps_to_distinct_folders_and_one_curve():
    """The issue's example: three coefficients used to share one folder ("coefficient")."""
    base = ["sae=jumprelu", "sparsity=coefficient"]
    cfgs = [compose_config([*base, f"sparsity.coefficient={c}"]) for c in (1e-4, 3e-4, 1e-3)]
    names = [identity.run_name(c, "jumprelu") for c in cfgs]
    assert len(set(names)) == 3
    assert "c0.0003" in names[1]  # readable: the coefficient is in the name
    assert len({identity.curve_hash(c) for c in cfgs}) == 1


@pytest.mark.parametrize(
    "override",
    ["train.n_tokens=300000", "train=paper", "data.context_length=64", "model=gpt2_small",
     "train.width_factor=4", "train.lr=0.003", "eval.n_activation_tokens=50000", "seed=1",
     "sae.bandwidth=0.01", "data.n_train_tokens=100000", "model.dtype=bfloat16"],
)  # fmt: skip
def test_anything_that_can_change_a_number_changes_the_hash(override):
    assert identity.config_hash(compose_config([override])) != identity.config_hash(
        compose_config([])
    )


@pytest.mark.parametrize(
    "override",
    ["results_dir=/elsewhere", "cache_dir=/elsewhere", "progress=false", "rerun=true",
     "experiment_name=other", "logger=wandb", "train.checkpoint_every=7", "train.log_every=3",
     "data.harvest.batch_size=4"],
)  # fmt: skip
def test_bookkeeping_does_not_change_the_hash(override):
    assert identity.config_hash(compose_config([override])) == identity.config_hash(
        compose_config([])
    )


def test_curve_hash_ignores_only_sparsity_value_and_seed():
    a = compose_config(["sae=topk", "sparsity=l0_20"])
    same_curve = [compose_config(["sae=topk", "sparsity=l0_80", "seed=3"])]
    other = [
        compose_config(["sae=topk", "sparsity=l0_20", "train.n_tokens=300000"]),
        compose_config(["sae=gated", "sparsity=l0_20"]),
        compose_config(["sae=topk", "sparsity=l0_20", "train=paper"]),
    ]
    assert all(identity.curve_hash(c) == identity.curve_hash(a) for c in same_curve)
    assert all(identity.curve_hash(c) != identity.curve_hash(a) for c in other)


def test_a_folder_of_another_config_is_refused_and_the_same_config_is_skipped(tmp_path):
    cfg = compose_config(["sae=topk", "sparsity=l0_20"])
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert check_folder(cfg, tmp_path) is None  # a checkpoint-only folder: run (resume) it
    write_result(tmp_path, {"status": "complete", "config_hash": identity.config_hash(cfg)})
    assert check_folder(cfg, tmp_path)["status"] == "complete"  # skipped
    other = compose_config(["sae=topk", "sparsity=l0_20", "train.n_tokens=300000"])
    with pytest.raises(ConfigError, match=r"different config \(train\.n_tokens: 600000 -> 300000"):
        check_folder(other, tmp_path)
    rerun = compose_config(["sae=topk", "sparsity=l0_20", "rerun=true"])
    assert check_folder(rerun, tmp_path) is None


def test_a_complete_record_is_never_replaced_by_a_failed_one(tmp_path):
    cfg = compose_config([])
    write_result(tmp_path, {"status": "complete", "delta_lm_loss": 0.25})
    record_failure(tmp_path, RuntimeError("logger.finish broke"), {}, cfg)
    assert read_result(tmp_path)["status"] == "complete"
    assert list(tmp_path.glob("result.*.json")) == []  # nothing was moved aside either
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    record_failure(fresh, RuntimeError("boom"), {}, cfg)
    r = json.loads((fresh / "result.json").read_text())
    assert r["status"] == "failed" and "boom" in r["error"]


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "smoke"])
def test_frequencies_are_measured_on_at_least_100k_held_out_tokens(preset):
    """frac_dead and the firing frequencies read on 2,048 tokens called a latent that fires
    once in 3,000 tokens dead; every preset but the smoke test measures them on >= 100k."""
    cfg = compose_config([f"+experiment={preset}"])
    assert cfg.eval.n_activation_tokens >= 100_000
    assert cfg.data.n_eval_tokens >= 8192  # the LM set: >= 64 windows (L0 within ~1%)


# Hashes computed before JumpReLU's bandwidth and threshold_init moved from `train.jumprelu` to
# the SAE and recipe configs (commit 684ce53's code): the move must not rename any folder.
# The paper_cpu one names a committed record (results/reference/paper_cpu/runs/).
HASHES_BEFORE_THE_MOVE = {
    "train=cpu sae=jumprelu sparsity=l0_40": ("5222ea6da8a55f1f", "b245b52755708327"),
    "train=cpu sae=gated sparsity=l0_40": ("51ab238290d9c4f8", "286b5707085bafbb"),
    "train=paper sae=jumprelu sparsity=l0_40": ("d7ff13955046bb81", "a53a389ba916f1b7"),
    "train=paper sae=topk sparsity=l0_40": ("2c09852b95e897fa", "d8cc52dbc6a4327f"),
    "train=smoke sae=jumprelu_tanh sparsity=l0_40": ("de30c8d3062510f2", "0b060a6bdf4ffc99"),
    "train=cpu sae=jumprelu_target_l0 sparsity=l0_40": ("5dd24c1ef30f15a0", "a57db81900462a74"),
    "+experiment=paper_cpu sae=jumprelu layer=middle seed=2": ("9d48b42078d7de36",
                                                               "cca844910bd9f927"),
    "sae=jumprelu sae.bandwidth=0.01": ("6fb327c72ebffcc7", "46f3b0eb2292f968"),
}  # fmt: skip


@pytest.mark.parametrize("overrides", sorted(HASHES_BEFORE_THE_MOVE))
def test_moving_jumprelus_values_out_of_train_kept_every_hash(overrides):
    cfg = compose_config(overrides.split())
    assert (identity.config_hash(cfg), identity.curve_hash(cfg)) == HASHES_BEFORE_THE_MOVE[overrides]
    assert "jumprelu" not in cfg.train  # the composed config no longer has the block ...
    assert identity.identity_dict(cfg)["train"]["jumprelu"]  # ... its hashed view still does


def test_a_config_saved_before_the_move_is_the_same_run(tmp_path):
    """A run folder written before the move (its config.yaml has train.jumprelu) is found and
    skipped by today's composition of the same run, not refused as another config."""
    record = ROOT / "results" / "reference" / "paper_cpu" / "runs" / (
        "residual-L14_jumprelu_l0_40_s2_9d48b420")  # fmt: skip
    saved = OmegaConf.load(record / "config.yaml")
    assert saved.train.jumprelu.bandwidth == 0.03
    cfg = compose_config("+experiment=paper_cpu sae=jumprelu layer=middle seed=2".split())
    assert identity.identity_dict(saved) == identity.identity_dict(cfg)
    assert identity.config_hash(saved) == "9d48b42078d7de36"
