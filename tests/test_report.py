"""Tests of benchmark.report on synthetic result folders (no model, no torch)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from benchmark.report import (
    interpolate_log_l0,
    load_results,
    matched_l0_table,
    runs_table,
    t_quantile_975,
    to_latex,
    to_markdown,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
LAYER_NAMES = {3: "early", 6: "middle"}


def write_run(
    root: Path,
    *,
    sae: str = "jumprelu",
    l0: float = 40.0,
    delta_lm_loss: float = 0.1,
    seed: int = 0,
    site: str = "residual",
    layer: int = 6,
    target_l0: int | None = 40,
    d_sae: int = 2304,
    **overrides: object,
) -> Path:
    """A run folder as the runner writes it: result.json, firing frequencies, Hydra config."""
    run_dir = root / f"{site}_L{layer}_{sae}_l0{target_l0}_s{seed}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("sae: {}\n")
    rng = np.random.default_rng([seed, zlib.crc32(sae.encode())])
    log_frequency = rng.normal(-3 + math.log10(l0 or 1) / 2, 1.0, d_sae).clip(max=0)
    frequency = 10.0**log_frequency * (rng.random(d_sae) > rng.uniform(0.01, 0.2))  # some dead
    np.save(run_dir / "firing_frequency.npy", frequency)
    clean = 3.0
    result = {
        "run_id": run_dir.name,
        "status": "complete",
        "error": None,
        "time": "2025-01-01T00:00:00+00:00",
        "git_commit": "abc1234",
        "git_dirty": False,
        "package_versions": {"torch": "2.5.0"},
        "device": "cpu",
        "metrics_version": "1",
        "metric_definitions": {"fvu": "whole-set, centred"},
        "config": {"sae": {"_target_": f"baselines.{sae}"}},
        "run_dir": "/elsewhere/" + run_dir.name,
        "experiment": "test",
        "model": "smollm2_135m",
        "layer": layer,
        "layer_name": LAYER_NAMES.get(layer, str(layer)),
        "site": site,
        "sae": sae,
        "sparsity": f"l0_{target_l0}",
        "sparsity_mode": "target_l0",
        "target_l0": target_l0,
        "coefficient": 1e-3,
        "seed": seed,
        "d_in": 576,
        "d_sae": d_sae,
        "l0": l0,
        "fvu": 2 * delta_lm_loss,
        "clean_ce_loss": clean,
        "spliced_ce_loss": clean + delta_lm_loss,
        "zero_ce_loss": clean + 5,
        "delta_lm_loss": delta_lm_loss,
        "ce_loss_recovered": 1 - delta_lm_loss / 5,
        "kl_div": delta_lm_loss * 0.9,
        "frac_dead": float((frequency == 0).mean()),
        "frac_freq_over_10pct": float((frequency > 0.1).mean()),
        "frac_freq_over_1pct": float((frequency > 0.01).mean()),
        "n_eval_tokens": 16384,
        "train_tokens": 276_000,
        "train_seconds": 60.0,
        "train_tokens_per_s": 4600.0,
        "peak_memory_mb": 900.0,
    }
    (run_dir / "result.json").write_text(json.dumps(result | overrides))
    return run_dir


def write_sweep(root: Path, seeds: tuple[int, ...] = (0,)) -> None:
    """Three architectures x two sites x two layers x five L0 levels; JumpReLU the best."""
    quality = {"jumprelu": 1.0, "gated": 1.3, "topk": 1.1}
    for sae, factor in quality.items():
        for site in ("residual", "mlp"):
            for layer in (3, 6):
                for target in (10, 20, 40, 80, 160):
                    for seed in seeds:
                        l0 = target * (1 + 0.02 * (seed - 0.5))  # lands near the target
                        delta = factor * 0.6 / math.sqrt(l0) * (1 + 0.03 * seed)
                        write_run(root, sae=sae, site=site, layer=layer, target_l0=target,
                                  l0=l0, delta_lm_loss=delta, seed=seed)  # fmt: skip


def two_point_curves(root: Path, deltas_at_20_and_80: dict[int, tuple[float, float]]) -> None:
    """One JumpReLU curve per seed, measured at L0 20 and 80."""
    for seed, (at_20, at_80) in deltas_at_20_and_80.items():
        write_run(root, l0=20.0, target_l0=20, delta_lm_loss=at_20, seed=seed)
        write_run(root, l0=80.0, target_l0=80, delta_lm_loss=at_80, seed=seed)


def test_interpolation_is_linear_in_log_l0(tmp_path: Path) -> None:
    # log 40 is the midpoint of log 20 and log 80, so the value is the midpoint of 0.2 and 0.1
    assert interpolate_log_l0([20, 80], [0.2, 0.1], [40]) == pytest.approx([0.15], abs=1e-12)
    two_point_curves(tmp_path, {0: (0.2, 0.1)})
    table = matched_l0_table(load_results(tmp_path)[0], targets=[40])
    assert table.loc[0, "delta_lm_loss"] == pytest.approx(0.15, abs=1e-12)
    assert table.loc[0, "n_seeds"] == 1 and math.isnan(table.loc[0, "delta_lm_loss_ci95"])


def test_no_extrapolation_beyond_the_tolerance() -> None:
    values = interpolate_log_l0([20, 80], [0.2, 0.1], [10, 18.5, 85, 95, 160])
    assert np.isnan(values[[0, 3, 4]]).all()  # more than 10% outside the measured range
    assert values[1] == 0.2 and values[2] == 0.1  # within 10% of an end: that end's value
    strict = interpolate_log_l0([20, 80], [0.2, 0.1], [18.5, 85], tolerance=0.0)
    assert np.isnan(strict).all()


def test_single_point_curve_counts_only_within_ten_percent() -> None:
    assert interpolate_log_l0([38], [0.3], [40]) == pytest.approx([0.3])
    assert np.isnan(interpolate_log_l0([30], [0.3], [40])).all()


def test_t_quantiles() -> None:
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)  # expansion beyond the table
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=2e-4)


@pytest.mark.parametrize(
    ("deltas", "t"),
    [
        ({0: (0.2, 0.1), 1: (0.3, 0.1)}, 12.706),
        ({0: (0.2, 0.1), 1: (0.3, 0.1), 2: (0.4, 0.2)}, 4.303),
    ],
)
def test_seeds_give_mean_and_student_t_interval(
    tmp_path: Path, deltas: dict[int, tuple[float, float]], t: float
) -> None:
    two_point_curves(tmp_path, deltas)
    at_40 = [(a + b) / 2 for a, b in deltas.values()]  # each seed's own interpolation
    n = len(at_40)
    mean = sum(at_40) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in at_40) / (n - 1))
    row = matched_l0_table(load_results(tmp_path)[0], targets=[40]).iloc[0]
    assert row["n_seeds"] == n
    assert row["delta_lm_loss"] == pytest.approx(mean)
    assert row["delta_lm_loss_ci95"] == pytest.approx(t * sd / math.sqrt(n), rel=1e-4)


def test_best_architecture_is_marked(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    table = matched_l0_table(load_results(tmp_path)[0])
    assert sorted(table["target_l0"].unique()) == [10, 20, 40, 80, 160]
    assert len(table) == 3 * 2 * 2 * 5
    assert (table.loc[table["best"], "sae"] == "jumprelu").all()
    assert table["best"].sum() == 2 * 2 * 5  # one per (site, layer, target)
    markdown = to_markdown(table)
    assert markdown.count("**") == 2 * table["best"].sum()
    assert r"\textbf{" in to_latex(table) and r"d\_sae" in to_latex(table)


def test_broken_runs_are_listed_not_fatal(tmp_path: Path) -> None:
    write_run(tmp_path, sae="jumprelu")
    write_run(tmp_path, sae="gated", status="failed", error="CUDA out of memory")
    partial = tmp_path / "multirun" / "3" / ".hydra"
    partial.mkdir(parents=True)
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "result.json").write_text('{"status": "complete", ')
    write_run(tmp_path, sae="topk", l0=None)
    runs, problems = load_results(tmp_path)
    assert runs["sae"].tolist() == ["jumprelu"]
    assert runs.loc[0, "run_dir"] == str(tmp_path / runs.loc[0, "run_id"])  # where found
    assert "config" not in runs and "package_versions" not in runs
    reasons = dict(zip(problems["status"], problems["reason"]))
    assert reasons["failed"] == "CUDA out of memory"
    assert set(reasons) == {"failed", "missing", "malformed", "incomplete"}
    assert reasons["incomplete"] == "missing l0"
    _, written, notes = write_report(runs.iloc[:0], problems, tmp_path / "out")
    assert [path.name for path in written] == ["problems.csv"] and notes  # only problems: fine


def test_report_files_are_written(tmp_path: Path) -> None:
    write_sweep(tmp_path / "runs", seeds=(0, 1))
    runs, problems = load_results(tmp_path / "runs")
    table, written, notes = write_report(runs, problems, tmp_path / "out", latex=True)
    assert (table["n_seeds"] == 2).all() and table["delta_lm_loss_ci95"].notna().all()
    names = {path.name for path in written}
    for stem in ("fig_delta_lm_loss_vs_l0", "fig_fvu_vs_l0", "fig_high_freq_vs_l0"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"fig_firing_histograms.png", "table1_matched_l0.tex", "problems.csv"} <= names
    assert {"table1_matched_l0.csv", "table1_matched_l0.md", "table2_runs.csv"} <= names
    assert all(path.stat().st_size > 0 for path in written) and not notes
    assert (tmp_path / "out" / "fig_fvu_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
    assert len(runs_table(runs)) == len(runs)


def test_cli(tmp_path: Path) -> None:
    two_point_curves(tmp_path / "runs", {0: (0.2, 0.1)})
    write_run(tmp_path / "runs", sae="gated", status="failed", error="diverged")
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path / "runs"), "--targets", "40"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "0.1500" in done.stdout and "diverged" in done.stdout
    assert (tmp_path / "runs" / "report" / "fig_delta_lm_loss_vs_l0.png").stat().st_size > 0


def test_cli_fails_on_an_empty_folder(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and str(tmp_path) in done.stderr
