"""data.max_norm_multiple: rows with a massive activation norm left out of training, of the
activation metrics and of the LM splice (benchmark.stages.without_outliers and what it calls)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from baselines.base import SAEOutput
from benchmark import identity, integrity
from benchmark.activations.keys import MANIFEST
from benchmark.activations.stores import ActivationStore
from benchmark.data import data_identity, non_special_mask, token_windows
from benchmark.errors import ConfigError
from benchmark.evaluate import evaluate_sae
from benchmark.run import reevaluate
from benchmark.specs import DataSpec
from benchmark.validate import check_run
from tests.helpers import ROOT, compose_config


def write_cache(path, shards: list[np.ndarray]) -> ActivationStore:
    """A cache folder with these float32 shards, its manifest's median norm computed here."""
    path.mkdir()
    shards = [s.astype(np.float32) for s in shards]
    for k, rows in enumerate(shards):
        np.save(path / f"shard_{k:05d}.npy", rows)
    norms = np.linalg.norm(np.concatenate(shards).astype(np.float64), axis=1)
    manifest = {
        "key": path.name, "hook": "blocks.0.hook_resid_post", "d_in": shards[0].shape[1],
        "n_tokens": int(len(norms)), "dtype": "float32",
        "norm_scale": math.sqrt(float(np.mean(norms**2))), "spec": {},
        "stats": {"norm_quantiles": {"q50": float(np.median(norms))}},
        "shards": [{"file": f"shard_{k:05d}.npy", "rows": len(s)} for k, s in enumerate(shards)],
    }  # fmt: skip
    (path / MANIFEST).write_text(json.dumps(integrity.seal(manifest)))
    return ActivationStore(path)


@pytest.fixture
def outliers(tmp_path):
    """90 rows of norm ~1-2 in 3 shards, 6 of them scaled by 50 (norm > 25 x the median)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(90, 8)) / math.sqrt(8) * rng.uniform(1, 2, size=(90, 1))
    big = [3, 17, 40, 41, 66, 89]
    rows[big] *= 50
    store = write_cache(tmp_path / "cache", [rows[:30], rows[30:60], rows[60:]])
    return store, rows.astype(np.float32), big


def test_rows_over_the_limit_are_left_out(outliers):
    store, rows, big = outliers
    assert store.without_outliers(None) is store
    kept = store.without_outliers(10)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert kept.max_norm == pytest.approx(10 * np.median(norms), rel=1e-12)
    assert (kept.n_tokens, kept.n_excluded) == (84, 6)
    # E||x||^2 = 1 for the rows the SAE sees: the scale is the kept rows' RMS norm.
    expected_scale = math.sqrt(np.mean(np.delete(norms, big) ** 2))
    assert kept.norm_scale == pytest.approx(expected_scale, rel=1e-12)
    assert store.norm_scale > 5 * kept.norm_scale and store.n_tokens == 90  # the original
    # One epoch in order: exactly the kept rows, nothing else.
    got = torch.cat(list(kept.batches(16, seed=0, epochs=1, normalise=False, shuffle=False)))
    assert torch.equal(got, torch.from_numpy(np.delete(rows, big, axis=0)))
    # Shuffled and endless (training): never a row over the limit, scaled by the kept RMS.
    it = kept.batches(32, seed=3)
    seen = torch.cat([next(it) for _ in range(20)])
    assert seen.norm(dim=1).max().item() <= kept.max_norm / kept.norm_scale
    assert len(seen) == 640


def test_a_multiple_that_keeps_nothing_is_an_error(tmp_path):
    store = write_cache(tmp_path / "cache", [np.ones((4, 2)), np.ones((4, 2)) * 3])
    with pytest.raises(ConfigError, match="max_norm_multiple=0.1 leaves no row of cache"):
        store.without_outliers(0.1)


def test_values_and_stream_are_checked():
    for bad in (1, 0.5, "ten", True):
        cfg = compose_config([f"data.max_norm_multiple={bad}"])
        with pytest.raises(ConfigError, match=r"data\.max_norm_multiple=.* must be null .* > 1"):
            check_run(cfg)
    check_run(compose_config(["data.max_norm_multiple=10"]))
    check_run(compose_config([]))  # null
    with pytest.raises(ConfigError, match="needs cached activations: set data.stream=false"):
        check_run(compose_config(["data.max_norm_multiple=10", "data.stream=true"]))


def test_identity():
    off, on = compose_config([]), compose_config(["data.max_norm_multiple=10"])
    assert off.data.max_norm_multiple is None
    # null hashes as if the key did not exist: runs from before the option keep their folders.
    before = off.copy()
    OmegaConf.set_struct(before, False)
    del before.data["max_norm_multiple"]
    assert identity.config_hash(off) == identity.config_hash(before)
    assert identity.config_hash(on) != identity.config_hash(off)
    assert identity.group_key(on) != identity.group_key(off)  # never trained in one group
    # Applied when a cache is read: the cached activations (and their key) are the same.
    assert data_identity(DataSpec.of(on.data)) == data_identity(DataSpec.of(off.data))


def test_the_model_config_sets_the_rule_where_it_measured_massive_activations():
    """data.max_norm_multiple defaults to the model's rule (conf/model/smollm2_135m.yaml:
    massive_activations): 10 at the (site, layer) pairs it names, null elsewhere and for a
    model without the block; an explicit value or null overrides it."""

    def multiple(*overrides: str):
        return compose_config(list(overrides)).data.max_norm_multiple

    assert multiple() is None  # the quickstart's layer 6 residual: 9.6x at most
    assert multiple("layer=middle") == 10 and multiple("layer=late") == 10  # 14, 22 residual
    assert multiple("layer.index=11", "site=mlp") == 10  # where SmolLM2 writes them
    assert multiple("layer=middle", "site=mlp") is None
    assert multiple("layer=middle", "site=attention") is None
    assert multiple("layer=middle", "data.max_norm_multiple=null") is None
    assert multiple("layer=middle", "data.max_norm_multiple=20") == 20
    assert multiple("model=gpt2_small", "layer.index=8") is None  # no rule: the paper's recipe
    bad = compose_config(["layer=middle", "model.massive_activations.max_norm_multiple=0.5"])
    with pytest.raises(ConfigError, match=r"^model\.massive_activations=.* is not valid"):
        check_run(bad)


def test_the_rule_keeps_the_hashes_of_the_committed_runs():
    """A run the rule does not touch keeps its hash (the model block is not hashed, only the
    resolved data.max_norm_multiple), and a run it touches has the hash of the same run with
    the multiple set by hand: the folders of results/reference/paper_cpu_round1 (layer 6, run
    before the rule) and results/reference/paper_cpu_maxnorm (layers 14 and 22, run with
    data.max_norm_multiple=10); and the three-seed grid of results/reference/paper_cpu, run with
    the rule as the default, names its runs with today's hashes, touched or not."""
    # train.lr=0.004: Gated's recipe when those grids ran (round 1 of the tuning protocol)
    base = ["+experiment=paper_cpu", "sae=gated", "sparsity=l0_20", "seed=0", "train.lr=0.004"]
    for folder, extra in (("paper_cpu_round1", ["layer=early"]),
                          ("paper_cpu_round1", ["layer=early", "site=mlp"]),
                          ("paper_cpu_maxnorm", ["layer=middle"])):  # fmt: skip
        name = identity.run_name(compose_config([*base, *extra]), "gated")
        assert (ROOT / "results" / "reference" / folder / "runs" / name / "result.json").is_file()
    today = ["+experiment=paper_cpu", "sae=topk", "sparsity=l0_40", "seed=2"]
    for extra in (["layer=early"], ["layer=middle"], ["layer=late", "site=mlp"]):
        name = identity.run_name(compose_config([*today, *extra]), "topk")
        assert (ROOT / "results" / "reference" / "paper_cpu" / "runs" / name / "result.json").is_file()
    by_hand = compose_config([*base, "layer=middle", "data.max_norm_multiple=10",
                              "~model.massive_activations"])  # fmt: skip
    assert identity.config_hash(by_hand) == identity.config_hash(
        compose_config([*base, "layer=middle"])
    )


def test_streaming_where_the_model_rule_applies_says_so():
    cfg = compose_config(["layer=middle", "data.stream=true"])
    with pytest.raises(ConfigError, match=r"\(model\.massive_activations sets it at residual "
                       r"layer 14\): set data\.stream=false or data\.max_norm_multiple=null"):  # fmt: skip
        check_run(cfg)


class Recorder(nn.Module):
    """x_hat = 0 (zero ablation through the SAE path); remembers the rows it was given."""

    def __init__(self):
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def forward(self, x):
        self.rows.append(x.detach().clone())
        return SAEOutput(torch.zeros_like(x), torch.ones(len(x), 2), x)


HOOK = "blocks.2.hook_resid_post"


@pytest.mark.integration
def test_splice_keeps_positions_over_the_limit(bundled_model, tmp_path):
    cfg = compose_config(["data.context_length=32"])
    tokens = token_windows(DataSpec.of(cfg.data), bundled_model.tokenizer, "eval", 100)[:4]
    mask = non_special_mask(tokens, bundled_model.tokenizer)
    _, cache = bundled_model.run_with_cache(tokens, names_filter=[HOOK])
    norms = cache[HOOK].norm(dim=-1)
    limit = float(norms[mask].median())  # half of the positions over it
    within = mask & (norms <= limit)
    assert 0 < within.sum() < mask.sum()
    kw = dict(batch_size=4, kl_div=False, cache_dir=tmp_path, model_key="smollm2")
    sae = Recorder()
    limited = evaluate_sae(bundled_model, sae, tokens, mask, HOOK, max_norms={HOOK: limit}, **kw)
    seen = torch.cat(sae.rows)
    assert len(seen) == within.sum() and seen.norm(dim=1).max() <= limit
    assert limited["splice_l0"] == 2.0  # the Recorder's f has 2 active latents per row it saw
    # Zero ablation through the SAE equals the limited zero-ablation loss: the same positions.
    assert limited["spliced_ce_loss"] == pytest.approx(limited["zero_ce_loss"], abs=1e-6)
    full = evaluate_sae(bundled_model, Recorder(), tokens, mask, HOOK, **kw)
    assert full["spliced_ce_loss"] == pytest.approx(full["zero_ce_loss"], abs=1e-6)
    assert full["zero_ce_loss"] > limited["zero_ce_loss"] + 0.05  # more positions ablated
    # The same positions are scored either way; the clean loss is shared; the two zero-ablation
    # losses are cached under different keys.
    assert limited["n_lm_tokens"] == full["n_lm_tokens"]
    assert limited["clean_ce_loss"] == full["clean_ce_loss"]
    assert len(list((tmp_path / "losses").glob("zero-*.json"))) == 2


@pytest.mark.integration
def test_a_run_records_what_it_left_out_and_reevaluates_exactly(tmp_path):
    """One smoke run with the filter (layer 2 residual: norms within ~3x of the median, so a
    multiple of 1.5 leaves out a few % of the rows): the record says how many, the held-out
    count is the rest, and reloading the SAE gives the same metrics."""
    cmd = [sys.executable, "-m", "benchmark.run", "+experiment=smoke", "hydra.mode=RUN",
           "sae=topk", "sparsity=l0_10", "data.max_norm_multiple=1.5", "progress=false",
           f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("smoke/*/result.json")
    saved = json.loads(path.read_text())
    nf = saved["norm_filter"]
    assert nf["max_norm_multiple"] == 1.5
    assert 0 < nf["held_out_excluded"] < 2048 * 0.5 and 0 < nf["train_excluded"] < 4096 * 0.5
    assert saved["n_activation_tokens"] == 2048 - nf["held_out_excluded"]
    assert saved["config"]["data"]["max_norm_multiple"] == 1.5
    again = reevaluate(path.parent, device="cpu")
    for key in ("l0", "fvu", "frac_dead", "n_activation_tokens", "delta_lm_loss", "splice_l0"):
        assert again[key] == saved[key], key
