"""Long and accelerator tests: off in the default run (`make test-all` runs the slow ones).

- slow: the issue-level acceptance run: every penalised architecture trained with train=cpu on
  the bundled model (early layer, residual, target L0 40) lands within 10% of the target L0 and
  keeps at least half of its latents alive (~15 min on 2 cores).
- gpu: the training step on CUDA matches the CPU step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, train_sae
from tests.helpers import ROOT, compose_config


@pytest.mark.slow
@pytest.mark.integration
def test_train_cpu_recipe_hits_target_l0(tmp_path):
    cmd = [sys.executable, "-m", "benchmark.run", "-m", "sae=jumprelu,gated,relu,topk",
           "sparsity=l0_40", "train=cpu", "experiment_name=acceptance", "progress=false",
           f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("acceptance/*/result.json")]
    assert len(results) == 4
    for r in results:
        assert r["frac_dead"] <= 0.5, r["sae"]
        if r["sae"] != "topk":
            assert abs(r["l0"] - 40) <= 4, (r["sae"], r["l0"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["jumprelu", "gated", "topk", "relu"])
def test_cuda_training_matches_cpu(name):
    cfg = compose_config([f"sae={name}", "sparsity=l0_10"])
    x = torch.randn(64 * 8, 32) / 32**0.5
    tc = TrainConfig(n_tokens=64 * 8, batch_size=64, lr=1e-3, lr_warmup_steps=1, log_every=8)
    outs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        sae = build_sae(cfg.sae, 32, 128).to(device)
        train_sae(sae, lambda s: iter(x.split(64)), tc, Sparsity("target_l0", 10), progress=False)
        outs.append(sae.cpu()(x[:64]).x_hat)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-4)


# The committed reference run re-run here must give the same metrics. Tolerances: the same
# code, seed and corpus on another CPU differ only by float summation order, which moves a
# 312-step run's numbers by well under these (measured: re-runs on this machine are identical).
GOLDEN = {"l0": 0.01, "fvu": 0.02, "delta_lm_loss": 0.03, "frac_dead": 0.02}  # relative
GOLDEN_ABS = {"frac_dead": 0.005, "delta_lm_loss": 0.01}  # absolute floor where values are small


@pytest.mark.slow
@pytest.mark.integration
def test_reference_quickstart_job_is_reproduced(tmp_path):
    """Re-run the quickstart's TopK L0-40 job and compare it with its committed record in
    results/reference/quickstart/runs/ (same folder name, i.e. the same config hash)."""
    ref_dir = ROOT / "results" / "reference" / "quickstart" / "runs"
    (ref,) = [p for p in ref_dir.glob("*/result.json") if "_topk_l0_40_" in p.parent.name]
    saved = json.loads(ref.read_text())
    cmd = [sys.executable, "-m", "benchmark.run", "+experiment=quickstart", "sae=topk",
           "sparsity=l0_40", f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    (new_path,) = tmp_path.glob("quickstart/*/result.json")
    new = json.loads(new_path.read_text())
    assert new["config_hash"] == saved["config_hash"] and new_path.parent.name == ref.parent.name
    for key, rel in GOLDEN.items():
        assert new[key] == pytest.approx(saved[key], rel=rel, abs=GOLDEN_ABS.get(key, 0)), key
