"""Long and accelerator tests: off in the default run (`make test-all` runs the slow ones).

- slow: the issue-level acceptance run: every penalised architecture trained with train=cpu on
  the bundled model (early layer, residual, target L0 40) lands within 10% of the target L0 and
  keeps at least half of its latents alive (~15 min on 2 cores).
- gpu: the training step on CUDA matches the CPU step; train.precision=bf16 (autocast) and
  tf32 keep parameters and Adam state fp32 with a loss close to fp32's; the evaluation's
  chunked log-softmax keeps memory bounded at Gemma's 256k vocabulary. Run them on a CUDA
  machine with `pytest -m gpu` (skipped without CUDA).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from benchmark import evaluate
from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, Trainer, train_sae
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


# The committed reference run re-run here must give the same metrics within the measured
# run-to-run spread. Re-runs on one machine are identical; `make quickstart` on another 2-core
# CPU (same config hashes, clean CE equal to 1e-4) moved delta LM loss by up to 6.3% (TopK
# L0 40: 0.382 -> 0.358) and the dead fraction by up to 1.8 points (JumpReLU L0 80: 5.0% ->
# 3.2%): float summation order differs, and 312 steps of Adam amplify it. The tolerances sit
# just above that spread (the report's --resolution 0.07 in the Makefile is the same figure).
GOLDEN = {"l0": 0.02, "fvu": 0.03, "delta_lm_loss": 0.07, "frac_dead": 0.02}  # relative
GOLDEN_ABS = {"frac_dead": 0.02, "delta_lm_loss": 0.01}  # absolute floor where values are small


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


# ---- train.precision and evaluation memory on CUDA (`pytest -m gpu`) ----
# Tolerances: one step from the same initial weights on the same batch; bf16 rounds each
# matmul input to an 8-bit mantissa (~0.4%), TF32 to a 10-bit one (~0.1%); the summed loss
# averages those errors, so its relative gap stays well below them.
PRECISION_LOSS_RTOL = {"bf16": 1e-2, "tf32": 2e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("name", ["jumprelu", "gated", "topk", "relu"])
def test_cuda_precision_step_keeps_fp32_state_and_is_close_to_fp32(name, precision):
    cfg = compose_config([f"sae={name}", "sparsity=l0_10"])
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1024, 256, generator=g) / 16 for _ in range(4)]
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    runs, autocast_seen = {}, []
    for p in ("fp32", precision):
        torch.manual_seed(0)
        sae = build_sae(cfg.sae, 256, 2048).cuda()
        loss = sae.loss

        def spy(x, _loss=loss, **kw):
            autocast_seen.append(torch.is_autocast_enabled("cuda"))
            return _loss(x, **kw)

        sae.loss = spy  # type: ignore[method-assign]
        tc = TrainConfig(n_tokens=1024 * 4, batch_size=1024, lr=1e-3, lr_warmup_steps=1,
                         log_every=1, precision=p)  # fmt: skip
        trainer = Trainer(sae, tc, Sparsity("target_l0", 10), progress=False)
        for x in xs:
            trainer.step(x)
        runs[p] = trainer
    assert autocast_seen == [False] * 4 + [precision == "bf16"] * 4
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    t = runs[precision]
    assert all(p.dtype == torch.float32 for p in t.sae.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in t.sae.parameters())
    moments = [v for s in t.opt.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    first = [r.state.history[0]["loss"] for r in (runs["fp32"], t)]
    assert first[1] == pytest.approx(first[0], rel=PRECISION_LOSS_RTOL[precision])
    assert all(math.isfinite(row["loss"]) for row in t.state.history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_memory_is_bounded_at_a_256k_vocabulary():
    """Gemma's vocabulary: next_token_losses on (8, 1024, 256000) bf16 logits (4.2 GB) takes
    at most the logits plus four chunk-sized fp32 buffers (the chunk's rows, its log-softmax,
    the previous chunk's and slack: ~1 GB at LOGPROB_CHUNK 256), not an fp32 copy of the batch
    (8.4 GB); _kl_sum of two such logits likewise, with a few more chunk buffers."""
    B, T, V = 8, 1024, 256_000
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g)
    tokens = torch.randint(0, V, (B, T), device="cuda", generator=g)
    chunk = evaluate.LOGPROB_CHUNK * V * 4  # one fp32 chunk of log-probabilities, bytes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses = evaluate.next_token_losses(logits, tokens)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * chunk + 64 * 2**20, f"{extra / 2**20:.0f} MiB over the logits"
    rows = logits[:2, :-1].reshape(-1, V).float()  # a few rows against the plain computation
    want = torch.nn.functional.cross_entropy(rows, tokens[:2, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(losses[:2].reshape(-1), want, rtol=0, atol=1e-5)
    del rows, want
    other = logits.roll(1, dims=0)  # a second (B, T, V) bf16 batch
    pm = torch.ones(B, T - 1, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    evaluate._kl_sum(logits, other, pm)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * chunk + 64 * 2**20, f"{extra / 2**20:.0f} MiB over the logits"
