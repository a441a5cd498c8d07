"""Run identity: a run is its config.

Owns the two hashes every result carries and the run folder's name:
- `config_hash`: a hash of the resolved config with bookkeeping removed (where results and
  caches go, progress display, logger, `rerun`, checkpoint and log intervals, harvest batch
  sizes: nothing that can change a number). Two configs that can give different numbers never
  share a hash, hence never a folder, a skip decision or a table cell. The code version is not
  in it: it is recorded beside it (`git_commit`), and a result from other code is re-used only
  with a warning (see `benchmark.run`).
- `curve_hash`: the same with the swept sparsity value (target L0 or coefficient, and every SAE
  key that interpolates it, such as TopK's k) and the seed blanked: the runs of one curve in the
  report. Recipes, budgets, widths, data and models never mix in one curve.
- `run_name`: `<site>-L<layer>_<sae>_<sparsity>_s<seed>_<config_hash[:8]>`, readable first and
  unique by its hash; `<sparsity>` is the sparsity choice (`l0_40`) or `c<coefficient>` in
  coefficient mode. Registered as the OmegaConf resolver `${run_name:<sae choice>}`, which
  conf/config.yaml uses for both single runs and sweep jobs, so the same command always maps
  to the same folder (and so resumes there).

Must not know the model, data, trainer or evaluator.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

import benchmark.massive  # noqa: F401  (registers ${model_norm_rule:}, which data configs read)

# Top-level keys that never change a number.
BOOKKEEPING = (
    "hydra",
    "results_dir",
    "cache_dir",
    "progress",
    "rerun",
    "experiment_name",
    "logger",
)
# Nested keys that never change a number (checkpoint/resume is bit-exact; log rows are extra).
BOOKKEEPING_NESTED = (("train", "checkpoint_every"), ("train", "log_every"), ("data", "harvest"))
# Nested keys whose whole effect is another key's resolved value: the model's massive-activation
# rule acts only through data.max_norm_multiple (benchmark/massive.py), which is hashed.
DERIVED_NESTED = (("model", "massive_activations"),)
# Until 2026-12 every train config held JumpReLU's bandwidth and threshold_init
# (train.jumprelu, read by conf/sae/jumprelu*.yaml), so every config hash, JumpReLU or not,
# hashed that block. The values now belong to the SAE config (and a recipe's own to
# conf/recipe/<train>_<sae>.yaml); the hashed view still carries the block each train recipe
# held, so that every earlier hash, folder, cache entry and committed result keeps its name.
# A train config not named here (a user's own, written after the move) hashes without it.
FORMER_TRAIN_JUMPRELU: dict[str, dict[str, float]] = {
    "paper": {"bandwidth": 0.001, "threshold_init": 0.001},
    "none": {"bandwidth": 0.001, "threshold_init": 0.001},
    "cpu": {"bandwidth": 0.03, "threshold_init": 0.05},
    "smoke": {"bandwidth": 0.03, "threshold_init": 0.05},  # inherited from cpu
}
HASH_CHARS = 16
# The Hydra config groups whose chosen option each result records (`choices`).
CHOICE_GROUPS = ("model", "layer", "site", "sae", "sparsity", "data", "train", "eval")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    keep = [str(k) for k in cfg.keys() if k not in BOOKKEEPING]
    node = OmegaConf.masked_copy(cfg, keep) if len(keep) != len(cfg) else cfg
    out: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    for group, key in BOOKKEEPING_NESTED + DERIVED_NESTED:
        if isinstance(out.get(group), dict):
            out[group].pop(key, None)
    # train.precision (tf32/bf16 change numbers) hashes only when it is not the default fp32,
    # so runs from before the option keep their hashes, folders and results.
    if isinstance(out.get("train"), dict) and out["train"].get("precision") == "fp32":
        del out["train"]["precision"]
    # Likewise data.max_norm_multiple (null: every token kept) hashes only when it is set.
    if isinstance(out.get("data"), dict) and out["data"].get("max_norm_multiple", 0) is None:
        del out["data"]["max_norm_multiple"]
    train = out.get("train")
    if isinstance(train, dict) and "jumprelu" not in train:  # a config saved before has it
        former = FORMER_TRAIN_JUMPRELU.get(str(train.get("name")))
        if former is not None:
            train["jumprelu"] = dict(former)
    return out


def identity_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as hashed by `config_hash` (bookkeeping removed)."""
    return _plain(cfg)


def digest(obj: Any, chars: int = HASH_CHARS) -> str:
    """The first `chars` hex characters of the SHA-256 of obj as sorted-key JSON: config hashes
    (HASH_CHARS) and the activation cache's keys (`benchmark.activations.keys`, 10)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def config_hash(cfg: DictConfig) -> str:
    return digest(identity_dict(cfg))


def curve_hash(cfg: DictConfig) -> str:
    """config_hash of `cfg` with the sparsity value and the seed blanked (mode kept)."""
    blank = OmegaConf.masked_copy(cfg, [str(k) for k in cfg.keys() if k not in BOOKKEEPING])
    OmegaConf.set_struct(blank, False)
    blank.seed = None
    blank.sparsity = {"mode": cfg.sparsity.mode, "target_l0": None, "coefficient": None}
    return digest(_plain(blank))


def sparsity_label(cfg: DictConfig) -> str:
    if cfg.train.get("name") == "none":  # evaluate-only: the SAE's sparsity is the file's
        return "given"
    sp = cfg.sparsity
    if sp.mode == "coefficient" and not OmegaConf.is_missing(sp, "coefficient"):
        return f"c{float(sp.coefficient):g}"
    return str(sp.get("name") or sp.mode)


def run_name(cfg: DictConfig, sae_choice: str | None = None) -> str:
    sae = sae_choice or str(cfg.sae.get("_target_", "sae")).rsplit(".", 1)[-1]
    return (
        f"{cfg.site.name}-L{cfg.layer.index}_{sae}_{sparsity_label(cfg)}_s{cfg.seed}"
        f"_{config_hash(cfg)[:8]}"
    )


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb, name = a.get(key), b.get(key), f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{name}.")
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def _run_name_resolver(sae_choice: str | None = None, *, _root_: DictConfig) -> str:
    return run_name(_root_, sae_choice)


if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", _run_name_resolver)


# What a fan-out group shares (benchmark/fanout.py): one model, one layer, one data config and
# one batch stream (seed, batch size, step count), one evaluation config. The SAE, its sparsity
# target, the site and the rest of the training recipe (lr, schedules: each SAE has its own
# optimiser) may differ between the members of a group.
GROUP_FREE = ("sae", "sparsity", "site")
GROUP_TRAIN_KEYS = ("batch_size", "n_tokens")


def group_key(cfg: DictConfig) -> str:
    """A hash of what the jobs of one fan-out group must share (see GROUP_FREE), plus the
    cache folder they read and write. Jobs with equal keys can train in lockstep on the same
    batches and share the model's clean evaluation pass."""
    plain = {k: v for k, v in identity_dict(cfg).items() if k not in GROUP_FREE}
    train = plain.get("train") or {}
    plain["train"] = {k: train.get(k) for k in GROUP_TRAIN_KEYS}
    plain["cache_dir"] = str(cfg.get("cache_dir"))
    return digest(plain)
