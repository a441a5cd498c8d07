"""benchmark.plan: the sweep it composes (jobs and fan-out groups, the same job lists as Hydra's
own sweeper), the activation volume and FLOP arithmetic against hand computations, the CLI's
one-line errors, and the paper-scale plan naming its volume in TB. Offline, no model, no data;
~30 s (the gemma2_9b_full preset composes 135 jobs)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from benchmark import identity, plan
from tests.helpers import ROOT

# No matmul measurement and no SAE timing: deterministic and fast.
FIXED = plan.Options(timing=False, tflops=1.0)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "benchmark.plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


# ---- the sweep ----


def test_quickstart_is_nine_jobs_in_one_fan_out_group(tmp_path):
    sweep = plan.compose_jobs(["+experiment=quickstart", f"results_dir={tmp_path}"])
    assert sweep.multirun  # the preset's hydra.mode, no -m needed
    assert len(sweep.jobs) == 9
    assert {(j.sae, j.sparsity) for j in sweep.jobs} == set(
        itertools.product(("jumprelu", "gated", "topk"), ("l0_20", "l0_40", "l0_80"))
    )
    keys = {identity.group_key(j.cfg) for j in sweep.jobs}
    groups = plan.groups_of(sweep.jobs)
    assert len(groups) == len(keys) == 1 and len(groups[0]) == 9
    assert {
        (j.layer, j.site, j.d_in, j.d_sae, j.batch_size, j.train_tokens) for j in sweep.jobs
    } == {(6, "residual", 576, 4 * 576, 512, 160_000)}
    assert all(j.run_dir.startswith(f"{tmp_path}/quickstart/residual-L6_") for j in sweep.jobs)


@pytest.mark.parametrize(
    ("overrides", "multirun", "n_jobs", "n_groups"),
    [
        (["sae=jumprelu,topk", "sparsity=l0_20,l0_40", "site=residual,mlp"], True, 8, 1),
        (["layer=early,middle", "sae=topk"], True, 2, 2),  # the layer splits groups
        (["train.batch_size=256,512"], True, 2, 2),  # so does the batch stream
        (["+experiment=quickstart", "sae=topk"], False, 3, 1),  # replaces the preset's sae sweep
        (["+experiment=smoke", "hydra.mode=RUN"], False, 1, 1),  # one run of a sweep preset
        ([], False, 1, 1),
    ],
)  # fmt: skip
def test_sweeps_expand_as_the_basic_sweeper(overrides, multirun, n_jobs, n_groups):
    sweep = plan.compose_jobs(overrides, multirun=multirun)
    assert len(sweep.jobs) == n_jobs
    assert len(plan.groups_of(sweep.jobs)) == n_groups
    assert len(plan.groups_of(sweep.jobs, grouped=False)) == n_jobs


@pytest.mark.parametrize(
    ("launcher", "n_groups"),
    [
        ([], 1),  # fanout: one group of 6
        (["hydra.launcher.max_saes=2"], 3),
        (
            ["hydra/launcher=slurm_fanout", "hydra.launcher.max_saes=null"],
            2,
        ),  # split_sites: one group of 3 per site
        (["hydra/launcher=slurm_fanout", "hydra.launcher.max_saes=2"], 4),  # 2 + 1 per site
    ],
)
def test_groups_are_those_the_fan_out_launcher_makes(launcher, n_groups):
    """The plan's groups (split_sites, max_saes) are benchmark.fanout.plan_groups' groups."""
    from pathlib import Path

    from benchmark import fanout

    overrides = ["-m", "site=residual,mlp", "sae=jumprelu,topk,gated", *launcher]
    sweep = plan.compose_jobs(overrides[1:], multirun=True)
    assert sweep.grouped
    ours = plan.groups_of(sweep.jobs, True, sweep.max_saes, sweep.split_sites)
    theirs = fanout.plan_groups([(j.cfg, Path(j.run_dir), {}) for j in sweep.jobs],
                                max_saes=sweep.max_saes, split_sites=sweep.split_sites)  # fmt: skip
    assert [[j.run_dir for j in g] for g in ours] == [
        [str(m.out) for m in g.members] for g in theirs
    ]
    assert len(ours) == n_groups


def test_the_jobs_are_those_hydra_launches(tmp_path):
    """Hydra's own multirun (basic launcher, a task that only records its overrides) launches
    exactly the job override lists the plan composes."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from benchmark.compose import CONF_DIR

    overrides = ["+experiment=quickstart", "sparsity=l0_20,l0_80", "seed=0,1",
                 f"results_dir={tmp_path}", "hydra/launcher=basic"]  # fmt: skip
    launched: list[list[str]] = []

    def task(cfg):
        launched.append(list(HydraConfig.get().overrides.task))

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        hydra.multirun(config_name="config", task_function=task, overrides=overrides,
                       with_log_configuration=False)  # fmt: skip
    sweep = plan.compose_jobs(overrides)
    ours = [[o for o in j.overrides if not o.startswith("hydra")] for j in sweep.jobs]
    assert len(launched) == 12
    assert sorted(map(sorted, ours)) == sorted(map(sorted, launched))


# ---- arithmetic ----


def tiny_model() -> plan.ModelShape:
    return plan.ModelShape(name="tiny", n_layers=2, d_model=4, n_heads=2, d_head=2, n_kv_heads=1,
                           d_mlp=8, d_vocab=10, gated_mlp=True, tied_embeddings=True)  # fmt: skip


def test_model_flops_by_hand():
    m = tiny_model()
    # attention: Q and O 4 x (2 x 2) each = 32, K and V 4 x (1 x 2) each = 16; MLP 3 x 4 x 8 = 96
    assert m.block_params == 32 + 16 + 96 == 144
    assert m.params == 2 * 144 + 10 * 4 == 328
    # F(n) = 2 n P_block + 2 n ctx d_attn (+ 2 d_model d_vocab): ctx 3, d_attn 4
    assert m.flops(1, ctx=3) == 2 * 144 + 2 * 3 * 4 == 312
    assert m.flops(2, ctx=3) == 2 * 2 * 144 + 2 * 2 * 3 * 4 == 624
    assert m.full(ctx=3) == 624 + 2 * 4 * 10 == 704


def test_gemma2_9b_shape():
    cfg = OmegaConf.load(ROOT / "conf/model/gemma2_9b.yaml")
    m = plan.ModelShape.from_config(cfg)
    assert 9.2e9 < m.params < 9.3e9  # Gemma 2 9B: 9.24B parameters
    assert "d_mlp=14336" in m.assumed and "d_vocab=256000" in m.assumed


def job(site: str, d_sae: int = 5, done: bool = False, layer: int = 0) -> plan.Job:
    cfg = OmegaConf.create({
        "model": {"name": "tiny"}, "layer": {"index": layer}, "site": {"name": site},
        "cache_dir": "/nonexistent",
        "data": {"name": "d", "context_length": 3, "n_eval_tokens": 6, "n_train_tokens": 9,
                 "eval_pool_tokens": 6},
        "eval": {"n_activation_tokens": 4, "kl_div": False},
    })  # fmt: skip
    return plan.Job(overrides=[], sae="topk", sparsity="l0_1", site=site, layer=layer, d_in=3,
                    d_sae=d_sae, batch_size=1, train_tokens=7, target_l0=1, stream=False,
                    group="g", run_dir="", done=done, cfg=cfg)  # fmt: skip


def test_model_work_by_hand():
    """Two SAEs of two sites at layer 1 of the tiny model; ctx 3, so 3/2 positions per token.
    Truncated pass F(2) = 624; the LM set's prefix F(1) = 312, a pass from block 1 704 - 312 =
    392; the LM set 6 tokens -> 9 positions, no KL, nothing cached."""
    m, jobs = tiny_model(), [job("a", layer=1), job("b", layer=1)]
    sets = plan.activation_sets(jobs, 4, "float32")
    harvest_one = 624 * (4 + 9) * 1.5  # held-out 4 + training 9 tokens, both sites in one pass
    (fan,) = plan.model_work([jobs], sets, m)
    assert fan.harvest == harvest_one
    # prefix once; from block 1: 2 spliced + 1 clean + 2 zero ablations
    assert fan.lm_eval == 9 * (312 + 392 * 5)
    alone = plan.model_work([[j] for j in jobs], sets, m)
    assert [w.harvest for w in alone] == [harvest_one, harvest_one]  # each site on its own
    # job a: prefix + spliced, clean, zero; job b: prefix + spliced, zero (clean cached)
    assert [w.lm_eval for w in alone] == [9 * (312 + 392 * 3), 9 * (312 + 392 * 2)]
    done = plan.model_work([[job("a", done=True)]], sets, m)
    assert done[0].harvest == done[0].lm_eval == 0  # a complete job is skipped
    assert plan.sae_flops(job("a")) == 12 * 3 * 5 * 7  # 6 x d_in x d_sae x 2 x tokens


def test_activation_volume_by_hand(tmp_path):
    p = plan.build_plan(
        ["+experiment=quickstart", f"cache_dir={tmp_path}", f"results_dir={tmp_path}"], FIXED
    )
    (a,) = p["activations"]
    assert (a["layer"], a["site"], a["d_in"]) == (6, "residual", 576)
    assert a["train_bytes"] == 100_000 * 576 * 4  # data.n_train_tokens x d_model x fp32
    assert a["eval_bytes"] == 100_000 * 576 * 4  # eval.n_activation_tokens
    assert p["cache_bytes"] == 2 * 100_000 * 576 * 4
    assert not a["train_cached"] and not a["eval_cached"]
    assert (p["n_jobs"], len(p["groups"]), p["groups"][0]["n_saes"]) == (9, 1, 9)
    assert p["flops"]["sae_training_total"] == 9 * 12 * 576 * 2304 * 160_000
    assert p["wall_seconds_fanout"] < p["wall_seconds_independent"]
    json.dumps(plan._jsonable(p))  # the --json file


# ---- paper scale ----


@pytest.fixture(scope="module")
def gemma():
    p = plan.build_plan(["+experiment=gemma2_9b_full", "device=cuda"], FIXED)
    return p, plan.render(p)


def test_gemma2_9b_full_plan(gemma):
    p, text = gemma
    assert (p["n_jobs"], len(p["groups"])) == (135, 3)
    assert {g["n_saes"] for g in p["groups"]} == {45}
    by_site = {(a["layer"], a["site"]): a for a in p["activations"]}
    assert len(by_site) == 9
    # Streamed: train.n_tokens (8B) x d_in x bfloat16 (dtype auto on cuda), in TB.
    assert by_site[(20, "residual")]["train_bytes"] == 8e9 * 3584 * 2
    assert by_site[(20, "attention")]["train_bytes"] == 8e9 * 4096 * 2
    assert "57.3 TB" in text and "65.5 TB" in text
    assert "stream (data.stream=true)" in text  # hundreds of TB over any default budget


def test_the_cli_prints_a_plan_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = cli("+experiment=smoke", f"cache_dir={tmp_path}", "--no-timing", "--tflops", "1",
               "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Jobs: 4" in proc.stdout and "## Recommendations" in proc.stdout
    assert json.loads(out.read_text())["n_jobs"] == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sae=nope"], "error: sae=nope: no such option; valid: "),
        (["sae=jumprelu,topk"], "error: sae=jumprelu,topk: a comma-separated value sweeps only with -m"),
        (["train.lrr=1"], "error: train.lrr=1: no such key 'train.lrr'"),
        (["sparsity.target_l0=99999"], "error: sparsity.target_l0=99999 must be in [1, d_sae="),
        (["--tflops", "fast"], "error: argument --tflops: invalid float value: 'fast'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(args, expected):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-2000:]
