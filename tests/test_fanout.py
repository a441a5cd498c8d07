"""Fan-out (benchmark/fanout.py, benchmark.run.run_group, benchmark.train.train_group,
benchmark.evaluate.evaluate_group): grouping changes no number.

- start-at-layer: the spliced pass that starts at the hooked layer from the cached residual
  gives the logits of the full spliced pass, for every site;
- shared evaluation: each member's LM metrics equal an independent full-pass computation;
- lockstep training: a group of 3 SAEs on real activations of the bundled model ends with
  exactly the weights of 3 separate runs fed the same batches, and a group killed midway
  resumes to the same weights;
- grouping: which jobs of a sweep share a group.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark import identity
from benchmark.evaluate import evaluate_group, residual_at, run_from
from benchmark.fanout import plan_groups
from benchmark.train import Sparsity, TrainConfig, Trainer, train_group, train_sae
from tests.helpers import compose_config, sae_from_conf

SITES = ["hook_resid_post", "hook_mlp_out", "attn.hook_z"]


def _tokens(model, n: int = 4, t: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(200, 20_000, (n, t), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


def _edit(act: torch.Tensor, hook=None) -> torch.Tensor:
    return act * 0.7 + 0.05  # any change that moves the logits


@pytest.mark.integration
@pytest.mark.parametrize(
    "layer,site", [(6, s) for s in SITES] + [(0, "hook_resid_post"), (29, "attn.hook_z")]
)
def test_a_pass_started_at_the_hooked_layer_gives_the_full_spliced_logits(
    bundled_model, layer, site
):
    tokens = _tokens(bundled_model)
    hook = f"blocks.{layer}.{site}"
    with torch.no_grad():
        full = bundled_model.run_with_hooks(tokens, fwd_hooks=[(hook, _edit)], return_type="logits")
        clean = bundled_model(tokens, return_type="logits")
        resid = residual_at(bundled_model, tokens, layer)
        part = run_from(bundled_model, resid, layer, [(hook, _edit)])
        part_clean = run_from(bundled_model, resid, layer, [])
    assert (full - clean).abs().max() > 1e-2  # the edit matters
    torch.testing.assert_close(part, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(part_clean, clean, rtol=0, atol=1e-5)
    # the skipped blocks are restored: a plain pass afterwards is the clean pass again
    with torch.no_grad():
        torch.testing.assert_close(bundled_model(tokens, return_type="logits"), clean)


def _reference(model, sae, hook, tokens, mask):
    """Spliced CE, clean CE and KL by separate full passes, written independently of
    benchmark.evaluate: the SAE replaces the activation at every position that counts."""

    def splice(act, hook=None):
        x = act.reshape(*act.shape[:2], -1)
        out = x.clone()
        out[mask] = sae(x[mask]).x_hat
        return out.view_as(act)

    with torch.no_grad():
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)], return_type="logits")
        clean = model(tokens, return_type="logits")
    scored = mask[:, :-1] & mask[:, 1:]
    targets = tokens[:, 1:][scored]
    ce = lambda logits: F.cross_entropy(logits[:, :-1][scored].double(), targets).item()  # noqa: E731
    lp_c = F.log_softmax(clean[:, :-1][scored].double(), -1)
    lp_s = F.log_softmax(spliced[:, :-1][scored].double(), -1)
    kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean().item()
    return ce(spliced), ce(clean), kl


@pytest.mark.integration
def test_group_evaluation_matches_separate_full_passes(bundled_model):
    torch.manual_seed(0)
    layer = 6
    members = [
        (sae_from_conf("topk", 576, 256), f"blocks.{layer}.hook_resid_post"),
        (sae_from_conf("relu", 576, 256), f"blocks.{layer}.hook_mlp_out"),
        (sae_from_conf("topk", 576, 256), f"blocks.{layer}.attn.hook_z"),
    ]
    for sae, _ in members:
        sae.eval()
    tokens = _tokens(bundled_model, n=6, t=40, seed=1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False  # BOS does not count
    got = evaluate_group(bundled_model, members, tokens, mask, batch_size=4, kl_div=True)
    for (sae, hook), metrics in zip(members, got, strict=True):
        spliced, clean, kl = _reference(bundled_model, sae, hook, tokens, mask)
        assert metrics["spliced_ce_loss"] == pytest.approx(spliced, rel=1e-5)
        assert metrics["clean_ce_loss"] == pytest.approx(clean, rel=1e-5)
        assert metrics["delta_lm_loss"] == pytest.approx(spliced - clean, abs=1e-4)
        assert metrics["kl_div"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
        assert metrics["n_lm_tokens"] == 6 * 38


@pytest.fixture(scope="module")
def real_acts(bundled_model):
    """Residual activations of layer 2 of the bundled model on 1,536 positions, normalised."""
    tokens = _tokens(bundled_model, n=16, t=97, seed=2)
    with torch.no_grad():
        x = residual_at(bundled_model, tokens, 3)[:, 1:].reshape(-1, 576)  # block 2's output
    return x / x.pow(2).sum(-1).mean().sqrt()


def _batches(x: torch.Tensor, batch: int):
    def factory(skip: int):
        def gen():
            i = skip
            while True:
                g = torch.Generator().manual_seed(i)
                yield x[torch.randint(0, len(x), (batch,), generator=g)]
                i += 1

        return gen()

    return factory


def _group(tmp_path=None):
    torch.manual_seed(0)
    specs = [("jumprelu", Sparsity("target_l0", 20.0)), ("gated", Sparsity("target_l0", 20.0)),
             ("topk", Sparsity("target_l0", 10.0))]  # fmt: skip
    saes = [sae_from_conf(name, 576, 512) for name, _ in specs]
    cfg = TrainConfig(n_tokens=256 * 24, batch_size=256, lr=4e-4, lr_warmup_steps=4,
                      checkpoint_every=0, dead_window_tokens=1024, log_every=8)  # fmt: skip
    return saes, [sp for _, sp in specs], cfg


@pytest.mark.integration
def test_a_lockstep_group_ends_with_the_weights_of_separate_runs(real_acts, tmp_path):
    batches = _batches(real_acts, 256)
    saes, sparsities, cfg = _group()
    separate = [train_sae(s, batches, cfg, sp, progress=False)
                for s, sp in zip(saes, sparsities, strict=True)]  # fmt: skip
    grouped_saes, _, _ = _group()
    trainers = [Trainer(s, cfg, sp, progress=False)
                for s, sp in zip(grouped_saes, sparsities, strict=True)]  # fmt: skip
    grouped = train_group(trainers, ["residual"] * 3, {"residual": batches}, progress=False)
    for a, b, ra, rb in zip(saes, grouped_saes, separate, grouped, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
        assert ra.coefficient == rb.coefficient and ra.train_l0 == rb.train_l0
        assert [r["loss"] for r in ra.history] == [r["loss"] for r in rb.history]
    assert any(not math.isclose(r.train_l0, grouped[0].train_l0) for r in grouped[1:])

    # killed after 10 steps (each trainer checkpoints in its own file), then resumed
    killed, _, _ = _group()
    ckpts = [tmp_path / f"{i}.pt" for i in range(3)]
    trainers = [Trainer(s, cfg, sp, checkpoint_path=c, progress=False)
                for s, sp, c in zip(killed, sparsities, ckpts, strict=True)]  # fmt: skip
    train_group(trainers, ["residual"] * 3, {"residual": batches}, progress=False, stop_after=10)
    resumed, _, _ = _group()
    trainers = [Trainer(s, cfg, sp, checkpoint_path=c, progress=False)
                for s, sp, c in zip(resumed, sparsities, ckpts, strict=True)]  # fmt: skip
    assert [t.state.step for t in trainers] == [10, 10, 10]
    results = train_group(trainers, ["residual"] * 3, {"residual": batches}, progress=False)
    assert [r.resumed_from_step for r in results] == [10, 10, 10]
    for a, b in zip(saes, resumed, strict=True):
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q)


def test_trainers_of_one_group_must_share_the_batch_stream():
    saes, sparsities, cfg = _group()
    other = TrainConfig(n_tokens=cfg.n_tokens, batch_size=128, lr=cfg.lr)
    trainers = [Trainer(saes[0], cfg, sparsities[0], progress=False),
                Trainer(saes[1], other, sparsities[1], progress=False)]  # fmt: skip
    with pytest.raises(ValueError, match="batch_size or n_tokens"):
        train_group(trainers, ["a", "a"], {"a": _batches(torch.randn(64, 576), 256)})


def _jobs(*overrides_list):
    from pathlib import Path

    return [(compose_config(list(o)), Path(f"/tmp/{i}"), {}) for i, o in enumerate(overrides_list)]


def test_jobs_that_share_an_activation_source_share_a_group():
    saes = [(f"sae={a}", f"sparsity={s}") for a in ("jumprelu", "gated", "topk")
            for s in ("l0_20", "l0_40", "l0_80")]  # fmt: skip
    assert [len(g.members) for g in plan_groups(_jobs(*saes))] == [9]
    sites = [(f"site={s}", "sae=topk") for s in ("residual", "mlp", "attention")]
    assert [len(g.members) for g in plan_groups(_jobs(*sites))] == [3]
    # another seed is another batch stream, another layer another model pass: other groups
    apart = [("seed=0",), ("seed=1",), ("layer=middle",), ("train.batch_size=512",),
             ("data.n_train_tokens=50000",), ("eval.kl_div=false",)]  # fmt: skip
    assert [len(g.members) for g in plan_groups(_jobs(*apart))] == [1] * 6
    # the rest of the recipe is per SAE (each has its own optimiser)
    same = [("train.lr=1e-4",), ("train.lr=3e-4",), ("train.width_factor=4",)]
    assert [len(g.members) for g in plan_groups(_jobs(*same))] == [3]
    assert identity.group_key(compose_config(["cache_dir=/a"])) != identity.group_key(
        compose_config(["cache_dir=/b"])
    )


def test_groups_can_be_kept_to_one_site_and_capped_in_size():
    jobs = _jobs(*[(f"site={s}", f"sae={a}") for s in ("residual", "mlp", "attention")
                   for a in ("topk", "gated")])  # fmt: skip
    by_site = plan_groups(jobs, split_sites=True)
    assert [[m.cfg.site.name for m in g.members] for g in by_site] == [
        ["residual"] * 2,
        ["mlp"] * 2,
        ["attention"] * 2,
    ]
    capped = plan_groups(jobs, max_saes=4)
    assert [len(g.members) for g in capped] == [4, 2]
    assert len({g.key for g in capped}) == 2  # each chunk is its own group
    assert [m.out for g in capped for m in g.members] == [out for _, out, _ in jobs]


@pytest.mark.slow
@pytest.mark.integration
def test_the_submitit_fanout_launcher_runs_a_group_as_one_task(tmp_path):
    """slurm_local_fanout: the SLURM fan-out code path through submitit's local executor."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    cmd = [sys.executable, "-m", "benchmark.run", "-m", "+experiment=smoke", "progress=false",
           f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}",
           "hydra/launcher=slurm_local_fanout"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "4 jobs in 1 submitit tasks" in run.stdout + run.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "smoke").glob("*/result.json")]
    assert len(records) == 4 and all(r["status"] == "complete" for r in records)
    assert len({r["trained_in_group"] for r in records}) == 1
