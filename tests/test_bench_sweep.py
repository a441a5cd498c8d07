"""scripts/bench_sweep.py's stage-against-bound arithmetic on a hand-made plan: FLOPs per stage
from the plan (as the mode runs it), training split per architecture, bound = FLOPs / rate."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "scripts" / "bench_sweep.py")
assert spec is not None and spec.loader is not None
bench_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_sweep)

PLAN = {
    "flops": {
        "harvest_independent": 4e11, "harvest_fanout": 2e11,
        "lm_eval_independent": 9e11, "lm_eval_fanout": 6e11,
        "sae_training_per_sae": {"a_jumprelu": 1e10, "b_jumprelu": 3e10, "c_topk": 2e10},
        "sae_training_total": 6e10, "sae_activation_metrics": 5e9,
    },
    "jobs": [{"run_dir": "results/x/a_jumprelu", "sae": "jumprelu"},
             {"run_dir": "results/x/b_jumprelu", "sae": "jumprelu"},
             {"run_dir": "results/x/c_topk", "sae": "topk"}],
    "throughput": {"matmul_flops_per_s": {"float32": 5e10}},
}  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "harvest", "lm"), [("fanout", 2e11, 6e11), ("separate", 4e11, 9e11)]
)
def test_stage_flops_follow_the_mode_and_sum_training_per_architecture(mode, harvest, lm):
    rate, stages, per_arch = bench_sweep.stage_bounds(PLAN, mode)
    assert rate == 5e10
    assert stages == {"harvest": harvest, "train": 6e10, "activation_metrics": 5e9, "lm_eval": lm}
    assert per_arch == {"jumprelu": 4e10, "topk": 2e10}


def test_bound_is_flops_over_rate_and_ratio_is_measured_over_bound():
    rate, stages, per_arch = bench_sweep.stage_bounds(PLAN, "fanout")
    measured = {"harvest": 8.0, "train": 3.0, "activation_metrics": 0.5, "lm_eval": 24.0}
    df = bench_sweep.bound_table(rate, stages, per_arch, measured, {"jumprelu": 2.4})
    assert list(df.index) == ["harvest", "train", "  train jumprelu", "  train topk",
                              "activation_metrics", "lm_eval"]  # fmt: skip
    assert df.loc["harvest", "bound s"] == pytest.approx(4.0)  # 2e11 / 5e10
    assert df.loc["harvest", "x bound"] == pytest.approx(2.0)
    assert df.loc["lm_eval", "x bound"] == pytest.approx(24.0 / 12.0)
    assert df.loc["  train jumprelu", "bound s"] == pytest.approx(0.8)
    assert df.loc["  train jumprelu", "x bound"] == pytest.approx(3.0)  # 2.4 / 0.8
    assert math.isnan(df.loc["  train topk", "x bound"])  # not measured: no ratio
