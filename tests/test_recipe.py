"""Per-architecture training recipes (conf/recipe/<train>_<sae>.yaml, merged over `train` and
`sae` by conf/config.yaml's defaults when both choices match) and their agreement with the tuning protocol's committed choice
(results/reference/tuning_cpu/tuning.csv, written by scripts/tune_cpu_recipe.py)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pandas as pd
import pytest
from omegaconf import OmegaConf

from benchmark.train import TrainConfig
from tests.helpers import CONF, ROOT, compose_config

RECIPES = sorted((CONF / "recipe").glob("*.yaml"))
TUNING = ROOT / "results" / "reference" / "tuning_cpu" / "tuning.csv"
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_names_a_train_and_an_sae_and_sets_only_their_keys(path) -> None:
    train, sae = path.stem.split("_", 1)
    assert (CONF / "train" / f"{train}.yaml").exists() and (CONF / "sae" / f"{sae}.yaml").exists()
    recipe = OmegaConf.load(path)
    assert set(recipe.keys()) <= {"train", "sae"} and len(recipe) > 0
    assert set(recipe.get("train", {}).keys()) <= FIELDS
    assert set(recipe.get("sae", {}).keys()) <= set(OmegaConf.load(CONF / "sae" / f"{sae}.yaml"))


def test_a_recipe_applies_to_its_architecture_on_its_train_only() -> None:
    for path in RECIPES:
        train, sae = path.stem.split("_", 1)
        recipe = OmegaConf.load(path)
        base_lr = compose_config([f"train={train}", "sae=relu"]).train.lr  # no recipe: the train's
        want = recipe.get("train", {}).get("lr", base_lr)
        cfg = compose_config([f"train={train}", f"sae={sae}"])
        assert cfg.train.lr == want, path.stem
        for key, value in recipe.get("sae", {}).items():
            assert cfg.sae[key] == value, (path.stem, key)
        if train == "cpu":
            assert compose_config(["+experiment=quickstart", f"sae={sae}"]).train.lr == want
        paper = compose_config(["train=paper", f"sae={sae}"])  # no paper_* recipe: the paper's
        assert paper.train.lr == pytest.approx(7e-5)
        own = OmegaConf.load(CONF / "sae" / f"{sae}.yaml")  # the SAE config's own values
        for key in recipe.get("sae", {}):
            assert paper.sae[key] == own[key], (path.stem, key)
        assert compose_config([f"sae={sae}", "train.lr=0.0123"]).train.lr == 0.0123  # CLI wins
    assert compose_config(["sae=relu"]).train.lr == pytest.approx(1.0e-3)  # train/cpu.yaml's


def test_no_sae_config_reads_the_trainers() -> None:
    """An architecture's values live in its SAE config (a recipe's in conf/recipe/), never in
    `train`: no conf/sae/*.yaml interpolates ${train.*}."""
    for path in sorted((CONF / "sae").glob("*.yaml")):
        assert "${train." not in path.read_text(), path.name


def test_the_cpu_recipes_are_the_tuning_protocols_choice() -> None:
    table = pd.read_csv(TUNING, dtype={"value": str})
    chosen = table[table["chosen"]]
    assert set(chosen["sae"]) >= {"jumprelu", "gated", "topk"}
    for row in chosen.itertuples():
        cfg = compose_config(["+experiment=quickstart", f"sae={row.sae}"])
        assert cfg.train.lr == pytest.approx(row.lr), row.sae
        # the knob: each architecture's chosen value is its config's value
        # a value is the knob's, optionally "+ adam beta1 0.9" (round 2's alternative to the
        # paper's beta1 = 0), e.g. "constant + adam beta1 0.9"
        value, *extra = row.value.split(" + ")
        beta1 = 0.9 if "adam beta1 0.9" in extra else 0.0
        assert cfg.train.adam_betas[0] == pytest.approx(beta1), row.sae
        if row.sae.startswith("jumprelu"):
            assert cfg.sae.get("threshold_init_mode", "constant") == value
        elif row.sae == "gated":
            assert cfg.sae.coefficient == pytest.approx(float(value))
        elif row.sae == "topk":
            assert cfg.sae.aux_coefficient == pytest.approx(float(Fraction(value)))
    # every chosen recipe reached its targets: held-out L0 within 5% at each
    assert (chosen["max_l0_off"] <= 0.05).all() and chosen["eligible"].all()
