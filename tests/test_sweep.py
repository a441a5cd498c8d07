"""End to end through the Hydra entry point and the report, on the real bundled model:
a smoke multirun in which one architecture is a new baseline added by config alone (a class
and a YAML in a temporary folder: no package file is edited), then `benchmark.report`."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from benchmark.run import reevaluate
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

NEW_BASELINE = '''
"""A baseline that lives outside the package: ReLU SAE with a learned per-latent offset."""
import torch
from torch import nn

from baselines.relu import ReLUSAE


class ShiftedReLUSAE(ReLUSAE):
    def __init__(self, d_in, d_sae, coefficient=0.0, shift_init=0.0):
        super().__init__(d_in, d_sae, coefficient)
        self.shift = nn.Parameter(torch.full((d_sae,), float(shift_init)))

    def activate(self, pre):
        return torch.relu(pre - self.shift)
'''
NEW_YAML = """
# A new baseline: one class (my_saes/shifted.py) and this file; nothing else is registered.
_target_: my_saes.shifted.ShiftedReLUSAE
coefficient: ${oc.select:sparsity.coefficient,0.01}
shift_init: 0.0
"""
RESULT_KEYS = {
    "run_id", "status", "time", "git_commit", "package_versions", "device", "metrics_version",
    "metric_definitions", "config", "choices", "model", "layer", "site", "sae", "sparsity",
    "sparsity_mode", "target_l0", "coefficient", "seed", "d_in", "d_sae", "l0", "fvu",
    "clean_ce_loss", "spliced_ce_loss", "zero_ce_loss", "delta_lm_loss", "ce_loss_recovered",
    "kl_div", "frac_dead", "frac_freq_over_10pct", "frac_freq_over_1pct", "n_activation_tokens",
    "n_lm_tokens", "splice_l0", "config_hash", "curve_hash", "train_frac_dead",
    "dead_window_tokens", "history_file", "eval_activation_cache", "train_tokens", "train_seconds", "train_tokens_per_s", "peak_memory_mb",
}  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "my_saes").mkdir()
    (tmp / "my_saes" / "__init__.py").write_text("")
    (tmp / "my_saes" / "shifted.py").write_text(textwrap.dedent(NEW_BASELINE))
    (tmp / "conf" / "sae").mkdir(parents=True)
    (tmp / "conf" / "sae" / "shifted_relu.yaml").write_text(NEW_YAML)
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable, "-m", "benchmark.run", "-m", "+experiment=smoke",
        f"hydra.searchpath=[file://{tmp / 'conf'}]", "sae=shifted_relu,topk",
        "sparsity=l0_10,l0_20", f"results_dir={tmp / 'results'}", f"cache_dir={ROOT / '.cache'}",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "benchmark.report", str(tmp / "results" / "smoke"),
         "--out", str(tmp / "report")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return tmp, run.stdout + run.stderr, report.stdout


def test_every_job_writes_a_complete_result_with_the_schema(sweep):
    tmp, log, _ = sweep
    results = sorted((tmp / "results" / "smoke").glob("*/result.json"))
    assert len(results) == 4
    for path in results:
        r = json.loads(path.read_text())
        assert r["status"] == "complete", r.get("error")
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["metrics_version"] and r["metric_definitions"]["fvu"]
        assert r["sae"] in ("shifted_relu", "topk") and r["layer"] == 2
        for f in ("sae.safetensors", "sae_config.yaml", "config.yaml", "firing_frequency.npy",
                  "history.csv", "lm_windows.npy"):  # fmt: skip
            assert (path.parent / f).exists(), f
        # The LM windows' sums are what delta LM loss was computed from.
        w = np.load(path.parent / "lm_windows.npy", allow_pickle=False)
        assert w.shape == (r["n_lm_windows"], 3) and w[:, 2].sum() == r["n_lm_tokens"]
        assert (w[:, 1] - w[:, 0]).sum() / w[:, 2].sum() == pytest.approx(r["delta_lm_loss"])
        # The folder is the config: readable choices, then the config hash.
        assert path.parent.name == r["run_id"] and r["run_id"].endswith(r["config_hash"][:8])
        # The smoke preset's held-out set is 2048 positions; at residual layer 2 the bundled
        # model's outlier rule (conf/model/smollm2_135m.yaml) leaves out a few delimiter sinks.
        nf = r["norm_filter"]
        assert nf["max_norm_multiple"] == 10.0 and 0 < nf["held_out_excluded"] < 20
        assert r["n_activation_tokens"] + nf["held_out_excluded"] == 2048
        assert not (path.parent / "checkpoint.pt").exists()
    # the sweep's progress lines: one start and one end per job, then the summary
    assert log.count("[sweep] job") == 8 and "[sweep] finished" in log
    # the default launcher ran the 4 jobs as one fan-out group: one model pass, one harvest
    groups = {json.loads(p.read_text())["trained_in_group"] for p in results}
    assert len(groups) == 1 and None not in groups, groups
    assert "fan-out group" in log and log.count("] activations") == 1


def test_topk_hits_its_target_exactly_and_the_new_baseline_is_calibrated(sweep):
    tmp, _, _ = sweep
    runs = pd.read_csv(tmp / "report" / "table2_runs.csv")
    topk = runs[runs.sae == "topk"].set_index("target_l0")
    assert topk.loc[10, "l0"] == pytest.approx(10, abs=0.01)
    assert topk.loc[20, "l0"] == pytest.approx(20, abs=0.01)
    shifted = runs[runs.sae == "shifted_relu"]
    assert len(shifted) == 2 and shifted.coefficient.notna().all()


def test_matched_l0_table_interpolates_the_runs(sweep):
    tmp, _, stdout = sweep
    table = pd.read_csv(tmp / "report" / "table1_matched_l0.csv")
    runs = pd.read_csv(tmp / "report" / "table2_runs.csv")
    # TopK sits exactly at its targets, so the matched value is that run's own metric.
    for target in (10, 20):
        row = table[(table.sae == "topk") & (table.target_l0 == target)].iloc[0]
        run = runs[(runs.sae == "topk") & (runs.target_l0 == target)].iloc[0]
        assert row.delta_lm_loss == pytest.approx(run.delta_lm_loss, rel=1e-9)
        assert row.fvu == pytest.approx(run.fvu, rel=1e-9)
    assert set(table.sae) == {"shifted_relu", "topk"}
    assert "delta_lm_loss" in stdout and re.search(r"\|\s*topk\s*\|", stdout)
    for fig in ("fig_delta_lm_loss_vs_l0", "fig_fvu_vs_l0", "fig_high_freq_vs_l0"):
        assert (tmp / "report" / f"{fig}.png").stat().st_size > 10_000
        assert (tmp / "report" / f"{fig}.pdf").exists()


def test_reloaded_sae_reproduces_its_metrics_exactly(sweep):
    tmp, _, _ = sweep
    path = sorted((tmp / "results" / "smoke").glob("*topk_l0_10*/result.json"))[0]
    saved = json.loads(path.read_text())
    again = reevaluate(path.parent, device="cpu")
    for key, value in again.items():
        if isinstance(value, float) and math.isnan(value):
            assert saved[key] is None
        else:
            assert value == saved[key], key


def test_a_second_launch_skips_finished_jobs(sweep):
    tmp, _, _ = sweep
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    cmd = [sys.executable, "-m", "benchmark.run", "-m", "+experiment=smoke", "sae=topk",
           "sparsity=l0_10", f"results_dir={tmp / 'results'}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "already complete" in out, out[-2000:]
    assert " train " not in out  # nothing was trained again


def test_an_exported_sae_evaluated_back_gives_its_metrics_and_joins_the_report(sweep):
    """export (SAE-Lens layout) -> `train=none sae=saelens sae.path=...` (evaluate-only) gives
    the trained run's metrics, and lands in the same report as the trained runs."""
    tmp, _, _ = sweep
    run_dir = sorted((tmp / "results" / "smoke").glob("*topk_l0_10*"))[0]
    saved = json.loads((run_dir / "result.json").read_text())
    out = tmp / "exported"
    export = subprocess.run(
        [sys.executable, "-m", "benchmark.export", str(run_dir), "--format", "saelens",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    cmd = [sys.executable, "-m", "benchmark.run", "+experiment=smoke", "hydra.mode=RUN",
           "train=none", "sae=saelens", f"sae.path={out}", f"results_dir={tmp / 'results'}",
           f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # A single run (no -m) used to print a SweepProgress warning about hydra.job.num.
    assert "MissingMandatoryValue" not in run.stdout + run.stderr
    (path,) = (tmp / "results" / "smoke").glob("*_saelens_given_*/result.json")
    given = json.loads(path.read_text())
    assert given["sae_source"]["format"] == "saelens" and given["train_tokens"] == 0
    for key in ("l0", "fvu", "frac_dead", "delta_lm_loss", "spliced_ce_loss"):
        assert given[key] == pytest.approx(saved[key], rel=1e-4, abs=1e-6), key
    report = subprocess.run(
        [sys.executable, "-m", "benchmark.report", str(tmp / "results" / "smoke"), "--out",
         str(tmp / "report2")], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    runs = pd.read_csv(tmp / "report2" / "table2_runs.csv")
    assert set(runs.sae) >= {"saelens", "topk", "shifted_relu"}


def test_evaluate_only_runs_of_each_foreign_format_join_the_report(sweep):
    """A TopK SAE written in dictionary_learning's layout (AutoEncoderTopK: encoder.weight is
    (d_sae, d_in), decoder.weight (d_in, d_sae)) evaluates to exactly the trained run's
    metrics; a JumpReLU written in Gemma Scope's params.npz (its weights, a threshold) is
    evaluated and reported beside the trained runs."""
    import torch

    from baselines.jumprelu import JumpReLUSAE
    from benchmark.saes import load_sae
    from interop.gemma_scope import write_gemma_scope

    tmp, _, _ = sweep
    run_dir = sorted((tmp / "results" / "smoke").glob("*topk_l0_10*"))[0]
    saved = json.loads((run_dir / "result.json").read_text())
    topk = load_sae(run_dir)
    w = {k: v.detach() for k, v in topk.state_dict().items()}
    dl = tmp / "dl_topk"
    dl.mkdir()
    torch.save({"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"],
                "decoder.weight": w["W_dec"].t().contiguous(), "b_dec": w["b_dec"],
                "k": torch.tensor(topk.k), "threshold": torch.tensor(-1.0)}, dl / "ae.pt")  # fmt: skip
    trainer = {"dict_class": "AutoEncoderTopK", "activation_dim": topk.d_in,
               "dict_size": topk.d_sae, "k": topk.k, "layer": 2}  # fmt: skip
    (dl / "config.json").write_text(json.dumps({"trainer": trainer}))
    jr = JumpReLUSAE(topk.d_in, topk.d_sae, threshold_init=0.5)
    jr.load_state_dict({**w, "raw_threshold": jr.state_dict()["raw_threshold"]})
    gs = write_gemma_scope(jr, tmp / "gs" / "params.npz")
    base = [sys.executable, "-m", "benchmark.run", "+experiment=smoke", "hydra.mode=RUN",
            "train=none", f"results_dir={tmp / 'results'}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    for fmt, path in (("dictionary_learning", dl), ("gemma_scope", gs)):
        run = subprocess.run([*base, f"sae={fmt}", f"sae.path={path}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (dl_result,) = (tmp / "results" / "smoke").glob("*_dictionary_learning_given_*/result.json")
    got = json.loads(dl_result.read_text())
    for key in ("l0", "fvu", "frac_dead", "delta_lm_loss"):
        assert got[key] == pytest.approx(saved[key], rel=1e-4, abs=1e-6), key
    (gs_result,) = (tmp / "results" / "smoke").glob("*_gemma_scope_given_*/result.json")
    assert json.loads(gs_result.read_text())["sae_source"]["format"] == "gemma_scope"
    report = subprocess.run(
        [sys.executable, "-m", "benchmark.report", str(tmp / "results" / "smoke"), "--out",
         str(tmp / "report3")], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    runs = pd.read_csv(tmp / "report3" / "table2_runs.csv")
    assert {"dictionary_learning", "gemma_scope", "topk"} <= set(runs.sae)
