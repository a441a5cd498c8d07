"""The activation cache on the real bundled model: harvest, reuse, resume, share, batches, errors;
and the streaming store (data.stream=true).

Budgets are tiny (2,000 tokens at layer 2, shards of 4 windows) so a harvest takes ~1 s.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import textwrap
from itertools import islice

import numpy as np
import pytest
import torch

from benchmark import activations, integrity
from benchmark.activations import (
    ActivationStore,
    StreamingStore,
    cache_key,
    get_activation_store,
    get_activation_stores,
    harvest,
)
from benchmark.activations import keys as act_keys
from benchmark.activations import locking as act_locking
from benchmark.activations import stores as act_stores
from benchmark.data import non_special_mask, token_windows
from benchmark.errors import ActivationError, ConfigError
from benchmark.specs import SiteSpec, SourceSpec
from tests.conftest import REPO, compose_config

pytestmark = pytest.mark.integration
SITES = ("residual", "mlp", "attention")
# Layer 2, 2,000 tokens; shard_mb 1.125 gives 4 windows (~500 rows of 576 fp32) per shard.
TINY = [
    "device=cpu",
    "layer.index=2",
    "data.n_train_tokens=2000",
    "data.n_eval_tokens=500",
    "data.harvest.batch_size=4",
    "data.harvest.shard_mb=1.125",
]


def tiny(cache_dir, *overrides) -> SourceSpec:
    return SourceSpec.of(compose_config([f"cache_dir={cache_dir}", *TINY, *overrides]))


def site_cfgs():
    return [SiteSpec.of(compose_config([f"site={s}"]).site) for s in SITES]


def all_rows(store: ActivationStore) -> torch.Tensor:
    return torch.cat(list(store.batches(10**6, seed=0, epochs=1, normalise=False, shuffle=False)))


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture(scope="module")
def three_sites(bundled_model, tmp_path_factory):
    """Residual, MLP and attention of layer 2, harvested together; counts forward passes."""
    calls = []
    read = harvest.read_sites  # looked up there by the harvest

    def counting(*args, **kwargs):
        calls.append(args[3])
        return read(*args, **kwargs)

    harvest.read_sites = counting
    try:
        cfg = tiny(tmp_path_factory.mktemp("three"))
        stores = get_activation_stores(bundled_model, cfg, sites=site_cfgs())
    finally:
        harvest.read_sites = read
    return cfg, stores, calls


def test_one_pass_fills_every_site(three_sites, monkeypatch):
    cfg, stores, calls = three_sites
    assert set(stores) == set(SITES)
    assert len(calls) == 4 and all(len(hooks) == 3 for hooks in calls)  # 4 batches, 3 sites each
    for store in stores.values():
        assert not store.from_cache and store.n_tokens == 2000 and store.d_in == 576
        assert len(store.shards) == 4 and sum(r for _, r in store.shards) == 2000
    monkeypatch.setattr(harvest, "load_model", refuse_to_load)
    for name in SITES:  # each site's cache is now a hit, without loading a model
        hit = get_activation_store(None, tiny(cfg.cache_dir, f"site={name}"))
        assert hit.from_cache and hit.key == stores[name].key


def test_rows_equal_a_full_forward_pass(three_sites, bundled_model):
    """Truncated harvest == a plain run_with_cache without stop_at_layer (first shard)."""
    cfg, stores, _ = three_sites
    tok = bundled_model.tokenizer
    windows = token_windows(cfg.data, tok, "train", 2000)[:4]  # (4, T): shard 0
    mask = non_special_mask(windows, tok).flatten()
    with torch.inference_mode():
        _, cache = bundled_model.run_with_cache(windows)
    for store in stores.values():
        expected = (
            cache[store.hook].flatten(2) if store.hook.endswith("hook_z") else cache[store.hook]
        )
        expected = expected.reshape(mask.shape[0], -1)[mask]  # (rows, d_in)
        got = torch.from_numpy(np.load(store.path / store.shards[0][0]))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * store.norm_scale)


def test_norm_scale_and_stats(three_sites):
    _, stores, _ = three_sites
    for store in stores.values():
        x = all_rows(store).double()
        assert store.norm_scale == pytest.approx(x.square().sum(1).mean().sqrt().item(), rel=1e-9)
        assert set(store.stats) == {"mean_sq_norm", "norm_quantiles", "frac_norm_over_5x_median"}
    # The attention-sink tail of the residual stream (see the activations module docstring).
    assert stores["residual"].stats["frac_norm_over_5x_median"] > 0.005


def test_batches(three_sites):
    store = three_sites[1]["residual"]
    rows = all_rows(store)
    one = list(store.batches(300, seed=1, epochs=1, normalise=False))
    assert [len(b) for b in one] == [300] * 6 + [200]
    assert all(b.dtype == torch.float32 and b.shape[1] == 576 for b in one)
    shuffled = torch.cat(one)
    assert not torch.equal(shuffled, rows)
    assert torch.equal(shuffled[shuffled[:, 0].argsort()], rows[rows[:, 0].argsort()])  # once each
    again = next(store.batches(300, seed=1, epochs=1, normalise=False))
    other = next(store.batches(300, seed=2, epochs=1, normalise=False))
    assert torch.equal(again, one[0]) and not torch.equal(other, one[0])
    assert sum(len(b) for b in store.batches(512, seed=0, epochs=2.5)) == 5000
    endless = list(islice(store.batches(512, seed=0), 20))  # 10,240 rows > 2,000
    assert all(len(b) == 512 for b in endless)
    normalised = torch.cat(list(store.batches(512, seed=0, epochs=1))).double()
    assert normalised.square().sum(1).mean().item() == pytest.approx(1.0, rel=1e-6)
    small = ActivationStore(store.path, buffer_mb=1)  # buffer < one shard: one shard at a time
    chunks = list(islice(small._chunks(np.random.default_rng(0), shuffle=True), 4))
    assert sorted(len(c) for c in chunks) == sorted(r for _, r in store.shards)


def test_changed_key_gives_a_new_cache(three_sites, bundled_model, monkeypatch):
    cfg, stores, _ = three_sites
    base = act_keys.key_spec(cfg, cfg.site, "train", 2000, torch.float32)
    assert cache_key(base) == stores["residual"].key
    changes = [
        ("layer", 3),
        ("site", {"name": "residual", "hook": "hook_resid_pre"}),
        ("split", "eval"),
        ("n_tokens", 2001),
        ("model", {**base["model"], "dtype": "bfloat16"}),
        ("data", {**base["data"], "context_length": 64}),
        ("data", {**base["data"], "eval_fraction": 0.1}),
    ]
    keys = {cache_key({**base, field: value}) for field, value in changes}
    assert len(keys) == len(changes) and cache_key(base) not in keys
    budget_only = tiny(
        cfg.cache_dir,
        *("data.harvest.batch_size=8", "data.n_eval_tokens=7", "data.stream=true"),
        *("data.stream_buffer_tokens=7", "data.stream_norm_tokens=7"),
    )
    same = act_keys.key_spec(budget_only, cfg.site, "train", 2000, torch.float32)
    assert cache_key(same) == cache_key(base)  # harvest settings and other budgets: same cache
    fewer = get_activation_store(bundled_model, tiny(cfg.cache_dir, "data.n_train_tokens=1500"))
    assert not fewer.from_cache and fewer.path != stores["residual"].path
    eval_store = get_activation_store(bundled_model, tiny(cfg.cache_dir), split="eval")
    assert eval_store.n_tokens == 500 and "-eval_" in eval_store.key


def test_killed_harvest_resumes(three_sites, bundled_model, tmp_path, monkeypatch, caplog):
    written = []
    write = harvest.write_shard

    def dies_after_two(path, k, x):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        write(path, k, x)
        written.append(path / act_keys.shard_name(k))

    monkeypatch.setattr(harvest, "write_shard", dies_after_two)
    cfg = tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        get_activation_store(bundled_model, cfg)
    before = {p: p.stat().st_mtime_ns for p in written}
    key_dir = written[0].parent
    assert not (key_dir / "manifest.json").exists()
    assert sorted(p.name for p in key_dir.glob("*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    monkeypatch.setattr(harvest, "write_shard", write)
    with caplog.at_level(logging.INFO, logger="benchmark.activations"):
        store = get_activation_store(bundled_model, cfg)
    assert "resuming after 2 completed shards" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in written} == before  # completed shards kept
    assert torch.equal(all_rows(store), all_rows(three_sites[1]["residual"]))


def test_two_processes_share_one_harvest(tmp_path):
    """Two processes ask for the same key at once: one harvests, the other waits and reads."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from tests.conftest import MODEL_CACHE, compose_config
        from benchmark.activations import get_activation_store
        from benchmark.models import load_model
        from benchmark.specs import SourceSpec
        cfg = SourceSpec.of(compose_config({[f"cache_dir={tmp_path}", *TINY]!r}))
        store = get_activation_store(lambda: load_model(cfg.model, torch.device("cpu"), MODEL_CACHE), cfg)
        print(json.dumps({{"from_cache": store.from_cache, "key": store.key, "c": store.norm_scale}}))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["from_cache"] for r in results) == [False, True]
    assert results[0]["key"] == results[1]["key"] and results[0]["c"] == results[1]["c"]


def test_config_errors_come_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(harvest, "load_model", refuse_to_load)
    with pytest.raises(ConfigError, match=r"layer.index=30 .* valid 0\.\.29"):
        get_activation_store(None, tiny(tmp_path, "layer.index=30"))
    with pytest.raises(ConfigError, match="unknown hook 'hook_mlp'"):
        get_activation_store(None, tiny(tmp_path, "site.hook=hook_mlp"))
    with pytest.raises(ConfigError, match="data.n_train_tokens=0"):
        get_activation_store(None, tiny(tmp_path, "data.n_train_tokens=0"))
    with pytest.raises(ConfigError, match="split='test'"):
        get_activation_store(None, tiny(tmp_path), split="test")
    assert not (tmp_path / "activations").exists()


def test_model_dtype_must_match_the_key(bundled_model, tmp_path):
    with pytest.raises(ConfigError, match="runs in torch.float32 but model.dtype='bfloat16'"):
        get_activation_store(bundled_model, tiny(tmp_path, "model.dtype=bfloat16"))


def test_corpus_errors(bundled_model, tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = tiny(tmp_path, "data=local", f"data.path={tmp_path / 'empty.txt'}")
    with pytest.raises(ConfigError, match="empty corpus"):
        get_activation_store(bundled_model, empty)
    small_file = tmp_path / "small.txt"
    small_file.write_text("\n\n".join(f"Paragraph {i} is about topic {i * 7}." for i in range(100)))
    small = tiny(tmp_path, "data=local", f"data.path={small_file}")
    with pytest.raises(
        ConfigError, match=r"holds \d+ tokens .* 2000 requested \(data.n_train_tokens\)"
    ):
        get_activation_store(bundled_model, small)
    assert not list((tmp_path / "activations").glob("*/manifest.json"))
    with caplog.at_level(logging.WARNING):
        store = get_activation_store(
            bundled_model,
            tiny(tmp_path, "data=local", f"data.path={small_file}", "data.allow_fewer_tokens=true"),
        )
    assert 0 < store.n_tokens < 2000 and "allow_fewer_tokens=true" in caplog.text


def _poison(act, hook):
    """NaN at window 0 of every batch, position 5, in the residual stream after attention: the
    MLP is per-position, so the NaN stays there (before attention it would spread: masked
    scores weigh NaN values by 0 -> NaN)."""
    act = act.clone()
    act[0, 5] = float("nan")
    return act


def test_nan_names_shard_and_position(bundled_model, tmp_path):
    with bundled_model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", _poison)]):
        with pytest.raises(
            ActivationError, match=r"shard 0 .*row 4: window 0 of the harvest, position 5"
        ):
            get_activation_store(bundled_model, tiny(tmp_path, "layer.index=1"))


def test_bfloat16_storage_round_trip():
    x = torch.randn(5, 3).to(torch.bfloat16)
    stored = act_stores.rows_to_numpy(x)
    assert stored.dtype == np.int16
    assert torch.equal(act_stores.rows_to_float32(stored, "bfloat16"), x.float())


# ---- streaming ----

# norm_scale over the first 500 rows (one forward batch of 4 windows); a buffer of 256 rows.
# Each forward batch takes ~1.4 s on 2 CPU cores: the tests read as few as they can.
STREAM = ["data.stream=true", "data.stream_norm_tokens=500", "data.stream_buffer_tokens=256"]


@pytest.fixture(scope="module")
def stream(bundled_model, tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("stream"), *STREAM)
    return cfg, get_activation_store(bundled_model, cfg)


def test_stream_batches(stream):
    _, store = stream
    assert isinstance(store, StreamingStore) and "-train-stream_" in store.key
    assert store.n_tokens == math.inf and store.d_in == 576
    assert (store.path / "norm.json").is_file()
    one = list(islice(store.batches(64, seed=0), 4))  # 256 rows buffered + 256 more read
    assert all(b.shape == (64, 576) and b.dtype == torch.float32 for b in one)
    mean_sq = torch.cat(one).double().square().sum(1).mean().item()
    assert mean_sq == pytest.approx(1.0, rel=0.5)  # 256 random rows; the residual's tail is heavy
    again = list(islice(store.batches(64, seed=0), 2))
    other = next(store.batches(64, seed=1))
    assert torch.equal(again[0], one[0]) and torch.equal(again[1], one[1])
    assert not torch.equal(other, one[0])
    with pytest.raises(ConfigError, match="endless"):
        next(store.batches(64, seed=0, epochs=1))


def test_stream_rows_equal_the_cache(stream, three_sites):
    """shuffle=False: the stream's first rows are the cache's rows for the same windows (same
    forward batches), and norm_scale is sqrt(mean ||x||^2) over the first 500 of them."""
    _, store = stream
    cached = all_rows(three_sites[1]["residual"])[:500].double()
    assert store.norm_scale == pytest.approx(cached.square().sum(1).mean().sqrt().item(), rel=1e-9)
    unit = next(store.batches(500, seed=0, shuffle=False)).double()
    torch.testing.assert_close(unit, cached / store.norm_scale, rtol=1e-6, atol=1e-6)
    assert unit.square().sum(1).mean().item() == pytest.approx(1.0, rel=1e-6)


def test_stream_norm_scale_is_cached(stream, monkeypatch):
    cfg, store = stream

    def refuse(*args, **kwargs):
        raise AssertionError("norm_scale estimated again")

    monkeypatch.setattr(activations, "estimate_norm", refuse)
    monkeypatch.setattr(harvest, "load_model", refuse_to_load)
    again = get_activation_store(None, cfg)  # a hit: no estimate, no model until a batch
    assert again.norm_scale == store.norm_scale and again.key == store.key


def test_stream_eval_split_is_cached(bundled_model, tmp_path):
    store = get_activation_store(bundled_model, tiny(tmp_path, *STREAM), split="eval")
    assert isinstance(store, ActivationStore) and store.n_tokens == 500


def test_stream_starts_over_and_errors(bundled_model, tmp_path, caplog):
    small_file = tmp_path / "small.txt"
    small_file.write_text("\n\n".join(f"Paragraph {i} is about topic {i * 7}." for i in range(30)))
    small = [*STREAM, "data=local", f"data.path={small_file}"]  # ~350 tokens < 500
    with caplog.at_level(logging.WARNING):
        store = get_activation_store(bundled_model, tiny(tmp_path, *small))
    assert "the stream starts over" in caplog.text and store.norm_scale > 0
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = [*STREAM, "data=local", f"data.path={tmp_path / 'empty.txt'}"]
    with pytest.raises(ConfigError, match="holds no full window"):
        get_activation_store(bundled_model, tiny(tmp_path, *empty))


def test_stream_nan_names_window_and_position(bundled_model, tmp_path):
    with bundled_model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", _poison)]):
        with pytest.raises(
            ActivationError, match=r"streamed, row 4: window 0 of the stream, position 5"
        ):
            get_activation_store(bundled_model, tiny(tmp_path, "layer.index=1", *STREAM))


# ---- integrity (benchmark/integrity.py) ----


@pytest.fixture(scope="module")
def pristine(bundled_model, tmp_path_factory):
    """A residual cache (4 shards) and its rows, harvested once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("pristine")
    store = get_activation_store(bundled_model, tiny(root))
    return root, store.key, all_rows(store)


def copy_cache(pristine, tmp_path):
    root, key, rows = pristine
    shutil.copytree(root / "activations" / key, tmp_path / "activations" / key)
    return tmp_path / "activations" / key, rows


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def predates_checksums(manifest):
    """A manifest as written before the integrity checks: no sizes, checksums or self_crc32."""
    old = json.loads(manifest.read_text())
    old.pop("self_crc32")
    old["shards"] = [{"file": s["file"], "rows": s["rows"]} for s in old["shards"]]
    manifest.write_text(json.dumps(old))


def double_norm_scale(manifest):
    """Valid JSON, sizes and shards intact: only the stored norm_scale changed."""
    m = json.loads(manifest.read_text())
    m["norm_scale"] *= 2
    manifest.write_text(json.dumps(m, indent=1))


FAULTS = {
    # name: (damage(cache folder), text the warning must hold)
    "flipped shard bytes": (
        lambda d: flip(d / "shard_00001.npy", 50_000),
        "shard_00001.npy has checksum",
    ),
    "truncated shard": (
        lambda d: truncate(d / "shard_00002.npy", 1000),
        "shard_00002.npy has 1000 bytes",
    ),
    "truncated manifest": (
        lambda d: truncate(d / "manifest.json", 300),
        "manifest.json is unreadable",
    ),
    "missing shard": (lambda d: (d / "shard_00003.npy").unlink(), "shard_00003.npy is missing"),
    "changed norm_scale": (lambda d: double_norm_scale(d / "manifest.json"), "self_crc32"),
    "old manifest, truncated shard": (
        lambda d: (predates_checksums(d / "manifest.json"), truncate(d / "shard_00001.npy", 900)),
        "shard_00001.npy does not hold its",
    ),
}
REBUILT = ("flipped shard bytes", "truncated shard", "truncated manifest")  # end to end


def one_warning(caplog, expected, folder):
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert str(folder) in warnings[0] and "harvesting it again" in warnings[0]


@pytest.mark.parametrize("fault", REBUILT)
def test_damaged_cache_warns_and_is_rebuilt(fault, pristine, bundled_model, tmp_path, caplog):
    """One warning naming the file and the fault, a fresh harvest (with progress lines off a
    terminal: tokens done/total, tokens/s, ETA), the same rows; then a plain hit."""
    folder, rows = copy_cache(pristine, tmp_path)
    damage, expected = FAULTS[fault]
    damage(folder)
    with caplog.at_level(logging.INFO, logger="benchmark"):
        store = get_activation_store(bundled_model, tiny(tmp_path))
    one_warning(caplog, expected, folder)
    assert not store.from_cache and store.path == folder
    assert torch.equal(all_rows(store), rows)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # nothing left aside
    lines = [r.getMessage() for r in caplog.records if r.name == "benchmark.progress"]
    assert lines[-1].startswith("harvest layer 2: 2,000/2,000 tok (100%), ")
    assert all(" tok/s" in line for line in lines) and any("ETA" in line for line in lines)
    caplog.clear()
    again = get_activation_store(None, tiny(tmp_path))  # intact now: a hit, no warning
    assert again.from_cache and not caplog.records


@pytest.mark.parametrize("fault", [f for f in FAULTS if f not in REBUILT])
def test_damaged_cache_is_discarded(fault, pristine, tmp_path, caplog):
    """The other faults, up to the point where the harvest would start again."""
    folder, _ = copy_cache(pristine, tmp_path)
    damage, expected = FAULTS[fault]
    damage(folder)
    assert not act_locking.cache_usable(folder)  # outside the lock: noticed, nothing changed
    assert folder.is_dir() and not caplog.records
    with caplog.at_level(logging.WARNING, logger="benchmark.activations"):
        assert not act_locking.cache_usable(folder, repair=True)  # under the lock: discarded
    one_warning(caplog, expected, folder)
    assert list(folder.parent.iterdir()) == []


def test_old_manifest_is_upgraded(pristine, tmp_path, monkeypatch, caplog):
    """A manifest from before the checks, shards intact: sealed in place with a warning."""
    folder, rows = copy_cache(pristine, tmp_path)
    predates_checksums(folder / "manifest.json")
    monkeypatch.setattr(harvest, "load_model", refuse_to_load)
    with caplog.at_level(logging.WARNING, logger="benchmark.activations"):
        store = get_activation_store(None, tiny(tmp_path))
    assert "manifest predates the integrity checks; recorded the sizes" in caplog.text
    assert store.from_cache and torch.equal(all_rows(store), rows)
    sealed = json.loads((pristine[0] / "activations" / pristine[1] / "manifest.json").read_text())
    assert json.loads((folder / "manifest.json").read_text())["shards"] == sealed["shards"]
    assert act_locking.cache_damage(folder) is None


def test_checksums_once_per_process(pristine, tmp_path, monkeypatch):
    """Sizes on every read; the shards' checksums on the first read in a process only."""
    folder, _ = copy_cache(pristine, tmp_path)
    hashed = []
    checksum = integrity.checksum
    monkeypatch.setattr(integrity, "checksum", lambda p: hashed.append(p.name) or checksum(p))
    monkeypatch.setattr(harvest, "load_model", refuse_to_load)
    get_activation_store(None, tiny(tmp_path))
    assert sorted(hashed) == [f"shard_{k:05d}.npy" for k in range(4)]
    get_activation_store(None, tiny(tmp_path))
    assert len(hashed) == 4  # not hashed again
    # A change of size is still noticed (a stat per shard on every read).
    truncate(folder / "shard_00000.npy", 500)
    assert act_locking.cache_damage(folder) == (
        f"{folder / 'shard_00000.npy'} has 500 bytes, "
        f"{json.loads((folder / 'manifest.json').read_text())['shards'][0]['bytes']} "
        "recorded (truncated or rewritten)"
    )


def test_content_checks_can_be_skipped(pristine, tmp_path, monkeypatch):
    """BENCHMARK_VERIFY_CACHE=size: no checksums on read (changed bytes then go unnoticed)."""
    folder, _ = copy_cache(pristine, tmp_path)
    monkeypatch.setenv(integrity.VERIFY_ENV, "size")
    monkeypatch.setattr(integrity, "checksum", refuse_to_load)
    flip(folder / "shard_00001.npy", 50_000)
    assert act_locking.cache_damage(folder) is None


def test_resume_redoes_a_truncated_shard(pristine, tmp_path):
    """A harvest killed before its manifest: shards that do not hold their planned rows (and
    every one after them) are redone; the others are kept."""
    folder, _ = copy_cache(pristine, tmp_path)
    (folder / "manifest.json").unlink()
    truncate(folder / "shard_00002.npy", 1000)
    plan = json.loads((folder / "harvest.json").read_text())
    target = act_keys.HarvestTarget("residual", "unused", folder, {})
    assert harvest.resume_point(target, plan) == 2
    assert sorted(p.name for p in folder.glob("*.npy")) == ["shard_00000.npy", "shard_00001.npy"]


def test_harvest_progress_can_be_turned_off(monkeypatch, tmp_path):
    """`progress: false` reaches the harvest's display (no model is run here)."""
    shown = []

    def fake_harvest(bridge, windows, layer, targets, opts, show):
        shown.append(show)
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "harvest_sites", fake_harvest)
    monkeypatch.setattr(activations, "load_bridge", lambda *a: None)
    monkeypatch.setattr(activations, "split_windows", lambda *a: None)
    monkeypatch.setattr(activations, "hook_name", lambda *a: "blocks.2.hook_resid_post")
    for flag in ("true", "false"):
        with pytest.raises(KeyboardInterrupt):
            get_activation_store(None, tiny(tmp_path, f"progress={flag}"))
    assert shown == [True, False]


def test_damaged_stream_norm_is_estimated_again(stream, tmp_path, bundled_model, caplog):
    cfg, store = stream
    copy = tmp_path / "activations" / store.path.name
    shutil.copytree(store.path, copy)
    truncate(copy / "norm.json", 40)
    with caplog.at_level(logging.WARNING, logger="benchmark.activations"):
        again = get_activation_store(bundled_model, tiny(tmp_path, *STREAM))
    assert "norm.json is unreadable" in caplog.text and str(copy) in caplog.text
    assert again.norm_scale == store.norm_scale
