"""Tests of benchmark.report on synthetic result folders (no model, no torch)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.report import (
    interpolate_log_l0,
    load_results,
    matched_l0_table,
    runs_table,
    t_quantile_975,
    table_cells,
    to_latex,
    to_markdown,
    write_report,
)
from benchmark.report.figures import line_labels
from benchmark.report.tables import MARKDOWN

REPO = Path(__file__).resolve().parents[1]
LAYER_NAMES = {3: "early", 6: "middle"}


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def record(recipe: str = "cpu", **fields: object) -> dict:
    """A complete result record as the runner writes it; the hashes follow from the fields
    (``recipe`` stands for every other config key: it changes both hashes)."""
    r: dict = {
        "status": "complete", "error": None, "time": "2025-01-01T00:00:00+00:00",
        "git_commit": "abc1234", "git_dirty": False, "device": "cpu", "metrics_version": "2",
        "package_versions": {"torch": "2.5.0"}, "metric_definitions": {"fvu": "whole set"},
        "config": {"sae": {"_target_": "baselines.x"}}, "experiment": "test",
        "model": "smollm2_135m", "layer": 6, "site": "residual", "sae": "jumprelu",
        "d_in": 576, "d_sae": 2304, "sparsity_mode": "target_l0", "target_l0": 40,
        "sparsity_coefficient": None, "coefficient": 1e-3, "seed": 0, "l0": 40.0,
        "delta_lm_loss": 0.1, "clean_ce_loss": 3.0, "zero_ce_loss": 8.0, "kl_div": 0.09,
        "n_activation_tokens": 100_000, "n_lm_tokens": 16_384, "dead_window_tokens": 50_000,
        "train_tokens": 276_000, "train_seconds": 60.0, "train_tokens_per_s": 4600.0,
        "peak_memory_mb": 900.0, "history_file": "history.csv",
    } | fields  # fmt: skip
    r.setdefault("layer_name", LAYER_NAMES.get(int(r["layer"]), str(r["layer"])))
    delta = r["delta_lm_loss"]
    r.setdefault("fvu", 2 * delta)
    r.setdefault("spliced_ce_loss", r["clean_ce_loss"] + delta)
    r.setdefault("ce_loss_recovered", 1 - delta / 5)
    r.setdefault("splice_l0", r["l0"])
    for name in ("frac_dead", "frac_freq_over_10pct", "frac_freq_over_1pct", "train_frac_dead"):
        r.setdefault(name, 0.01)
    curve = [recipe, *(r[k] for k in ("model", "site", "layer", "sae", "d_sae", "sparsity_mode"))]
    r.setdefault("curve_hash", digest(*curve))
    point = r["target_l0"] if r["sparsity_mode"] == "target_l0" else r["sparsity_coefficient"]
    r.setdefault("config_hash", digest(r["curve_hash"], point, r["seed"]))
    tag = f"l0_{point}" if r["sparsity_mode"] == "target_l0" else f"c{point:g}"
    r.setdefault("run_id", f"{r['site']}-L{r['layer']}_{r['sae']}_{tag}_s{r['seed']}")
    return r


def write_run(root: Path, folder: str | None = None, history: bool = False, **fields) -> Path:
    """A run folder: result.json, firing frequencies, Hydra config, history.csv if asked."""
    r = record(**fields)
    run_dir = root / (folder or r["run_id"])
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("sae: {}\n")
    rng = np.random.default_rng([r["seed"], zlib.crc32(r["sae"].encode())])
    log_frequency = rng.normal(-3 + math.log10(r["l0"] or 1) / 2, 1.0, r["d_sae"]).clip(max=0)
    frequency = 10.0**log_frequency * (rng.random(r["d_sae"]) > 0.05)  # some dead
    np.save(run_dir / "firing_frequency.npy", frequency)
    if history:
        tokens = np.arange(1, 11) * 4096
        lam = r["coefficient"] * np.linspace(0.2, 1, 10)
        pd.DataFrame({"step": range(1, 11), "tokens": tokens, "lr": 1e-3, "coefficient": lam,
                      "l0": np.linspace(300, r["l0"], 10), "mse": 0.1, "fvu": 0.2,
                      "frac_dead": 0.0}).to_csv(run_dir / "history.csv", index=False)  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(r))
    return run_dir


def curve(root: Path, deltas: dict[float, float], **fields: object) -> None:
    """One seed's curve: a target_l0 run landing exactly at each L0, with its delta LM loss."""
    for l0, delta in deltas.items():
        write_run(root, l0=l0, target_l0=int(l0), delta_lm_loss=delta, **fields)


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


def row(table: pd.DataFrame, **where: object) -> pd.Series:
    mask = np.logical_and.reduce([table[k] == v for k, v in where.items()])
    assert mask.sum() == 1, table
    return table[mask].iloc[0]


# ---------------------------------------------------------------------------- interpolation


def test_interpolation_is_linear_in_log_l0(tmp_path: Path) -> None:
    # log 40 is the midpoint of log 20 and log 80, so the value is the midpoint of 0.2 and 0.1
    assert interpolate_log_l0([20, 80], [0.2, 0.1], [40]) == pytest.approx([0.15], abs=1e-12)
    w = math.log(30 / 20) / math.log(80 / 20)  # 0.29248
    assert interpolate_log_l0([80, 20], [0.1, 0.2], [30])[0] == pytest.approx(0.2 - 0.1 * w)
    curve(tmp_path, {20: 0.2, 80: 0.1})
    table = matched_l0_table(load_results(tmp_path)[0], targets=[40])
    assert table.loc[0, "delta_lm_loss"] == pytest.approx(0.15, abs=1e-12)
    assert table.loc[0, "n_seeds"] == 1 and math.isnan(table.loc[0, "delta_lm_loss_ci95"])
    assert table.loc[0, "l0_used"] == 40 and not table.loc[0, "from_endpoint"]


def test_strict_by_default_a_target_outside_the_range_is_empty(tmp_path: Path) -> None:
    assert np.isnan(interpolate_log_l0([20, 80], [0.2, 0.1], [19.9, 80.1])).all()
    assert interpolate_log_l0([38], [0.3], [38, 40]) == pytest.approx([0.3, np.nan], nan_ok=True)
    curve(tmp_path / "runs", {20: 0.2, 80: 0.1})
    runs, problems = load_results(tmp_path / "runs")
    table, _, _ = write_report(runs, problems, tmp_path / "out", targets=[10, 40, 85])
    assert table["delta_lm_loss"].tolist() == pytest.approx([np.nan, 0.15, np.nan], nan_ok=True)
    assert table["n_seeds"].tolist() == [0, 1, 0] and not table["from_endpoint"].any()
    csv = pd.read_csv(tmp_path / "out" / "table1_matched_l0.csv")
    assert csv["delta_lm_loss"].isna().tolist() == [True, False, True]


def test_points_at_equal_l0_are_never_averaged() -> None:
    # two different points both measured at L0 40 disagree: the curve is ambiguous there
    values = interpolate_log_l0([20, 40, 40, 80], [0.3, 0.2, 0.25, 0.1], [20, 30, 40, 60, 80])
    assert values == pytest.approx([0.3, np.nan, np.nan, np.nan, 0.1], nan_ok=True)


def test_nan_propagates_through_interpolation() -> None:
    values = interpolate_log_l0([20, 80, 160], [np.nan, 0.9, 0.8], [20, 40, 80, 113.137])
    assert values == pytest.approx([np.nan, np.nan, 0.9, 0.85], nan_ok=True, rel=1e-5)


# ---------------------------------------------------------------------------- tolerance


def tolerance_sweep(root: Path) -> None:
    """JumpReLU and TopK measured at L0 20 and 80; Gated only up to 76, and the best there."""
    curve(root, {20: 0.2, 80: 0.1}, sae="jumprelu")
    curve(root, {20: 0.3, 80: 0.15}, sae="topk")
    curve(root, {19: 0.05, 76: 0.04}, sae="gated")


def test_tolerance_marks_endpoint_cells_and_keeps_them_from_best(tmp_path: Path) -> None:
    tolerance_sweep(tmp_path / "runs")
    runs, problems = load_results(tmp_path / "runs")
    strict = matched_l0_table(runs, targets=[40, 80])
    assert math.isnan(row(strict, sae="gated", target_l0=80)["delta_lm_loss"])
    out = tmp_path / "out"
    table, _, _ = write_report(runs, problems, out, [40, 80], latex=True, l0_tolerance=0.1)
    gated_80 = row(table, sae="gated", target_l0=80)
    assert gated_80["delta_lm_loss"] == 0.04 and gated_80["from_endpoint"]
    assert gated_80["l0_used"] == 76 and not gated_80["best"]
    assert row(table, sae="jumprelu", target_l0=80)["best"]  # 0.10 beats TopK's 0.15
    w = math.log(40 / 19) / math.log(76 / 19)  # gated at 40 is a true interpolation: best
    gated_40 = row(table, sae="gated", target_l0=40)
    assert gated_40["delta_lm_loss"] == pytest.approx(0.05 - 0.01 * w) and gated_40["best"]
    assert table["best"].sum() == 2
    csv = pd.read_csv(out / "table1_matched_l0.csv")
    assert row(csv, sae="gated", target_l0=80)[["from_endpoint", "l0_used"]].tolist() == [True, 76]
    markdown = (out / "table1_matched_l0.md").read_text()
    assert " 0.0400† |" in markdown and "\n† value from the curve's end point" in markdown
    assert markdown.count("†") == 5 + 1  # the five metric cells of Gated at 80, and the note
    latex = (out / "table1_matched_l0.tex").read_text()
    assert r"0.0400$^\dagger$" in latex and r"\footnotesize $^\dagger$" in latex


# ---------------------------------------------------------------------------- identity


def test_dedupe_is_by_config_hash_not_run_id(tmp_path: Path) -> None:
    # same folder name in two experiments, different configs: both kept
    a = write_run(tmp_path / "exp_a", folder="run", recipe="a", delta_lm_loss=0.1)
    b = write_run(tmp_path / "exp_b", folder="run", recipe="b", delta_lm_loss=0.2)
    # the same config (same hash) run twice in two experiments: the newest is kept
    old = write_run(tmp_path / "exp_c", recipe="c", time="2025-01-01T00:00:00+00:00")
    new = write_run(tmp_path / "exp_d", recipe="c", time="2025-02-01T00:00:00+00:00")
    runs, problems = load_results(tmp_path)
    assert sorted(runs["run_dir"]) == sorted(map(str, [a, b, new]))
    assert problems[["run_dir", "status", "reason"]].values.tolist() == [
        [str(old), "duplicate", f"duplicate of {new}"]
    ]


def test_two_recipes_are_two_curves(tmp_path: Path) -> None:
    curve(tmp_path / "paper", {20: 0.2, 80: 0.1}, recipe="paper")
    curve(tmp_path / "cpu", {20: 0.4, 80: 0.2}, recipe="cpu")
    runs = load_results(tmp_path)[0]
    table = matched_l0_table(runs, targets=[40])
    hashes = {r: record(recipe=r)["curve_hash"][:8] for r in ("paper", "cpu")}
    assert row(table, curve=hashes["paper"])["delta_lm_loss"] == pytest.approx(0.15)
    assert row(table, curve=hashes["cpu"])["delta_lm_loss"] == pytest.approx(0.3)
    assert sorted(line_labels(runs).values()) == sorted(f"jumprelu [{h}]" for h in hashes.values())
    assert set(runs_table(runs)["curve"]) == set(hashes.values())
    assert "curve" in to_markdown(table)


def test_coefficient_points_are_separate(tmp_path: Path) -> None:
    for coefficient, l0, delta in ((1e-3, 80, 0.1), (3e-3, 40, 0.2), (1e-2, 20, 0.3)):
        for seed in (0, 1):
            write_run(tmp_path, sparsity_mode="coefficient", target_l0=None, seed=seed,
                      sparsity_coefficient=coefficient, coefficient=coefficient, l0=l0 + seed,
                      delta_lm_loss=delta + 0.01 * seed)  # fmt: skip
    runs = load_results(tmp_path)[0]
    assert len(runs) == 6 and sorted(runs["point"].unique()) == [1e-3, 3e-3, 1e-2]
    table = matched_l0_table(runs, targets=[30])
    seed_0 = 0.3 - 0.1 * math.log(30 / 20) / math.log(2)
    seed_1 = 0.31 - 0.1 * math.log(30 / 21) / math.log(41 / 21)
    assert table.loc[0, "n_seeds"] == 2
    assert table.loc[0, "delta_lm_loss"] == pytest.approx((seed_0 + seed_1) / 2)


# ---------------------------------------------------------------------------- statistics


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
    for seed, (at_20, at_80) in deltas.items():
        curve(tmp_path, {20: at_20, 80: at_80}, seed=seed)
    at_40 = [(a + b) / 2 for a, b in deltas.values()]  # each seed's own interpolation
    n = len(at_40)
    mean = sum(at_40) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in at_40) / (n - 1))
    r = matched_l0_table(load_results(tmp_path)[0], targets=[40]).iloc[0]
    assert r["n_seeds"] == n
    assert r["delta_lm_loss"] == pytest.approx(mean)
    assert r["delta_lm_loss_ci95"] == pytest.approx(t * sd / math.sqrt(n), rel=1e-4)


def test_token_counts_are_the_fewest_among_the_runs_used(tmp_path: Path) -> None:
    write_run(tmp_path, l0=20, target_l0=20, n_lm_tokens=16_384, n_activation_tokens=100_000)
    write_run(tmp_path, l0=80, target_l0=80, n_lm_tokens=8_192, n_activation_tokens=50_000)
    table = matched_l0_table(load_results(tmp_path)[0], targets=[20, 40])
    assert table["n_lm_tokens"].tolist() == [16_384, 8_192]
    assert table["n_activation_tokens"].tolist() == [100_000, 50_000]
    first_line = to_markdown(table).splitlines()[0]
    assert "fvu, frac_dead, frac_freq_over_10pct on the activation set" in first_line
    assert "(`n_activation_tokens`, at least 50,000 tokens)" in first_line
    assert "delta_lm_loss, ce_loss_recovered on the LM set (`n_lm_tokens`" in first_line


# ---------------------------------------------------------------------------- rendering


def test_markdown_is_rendered_by_pandas_with_the_numbers(tmp_path: Path) -> None:
    for seed, (at_20, at_80) in {0: (0.2, 0.1), 1: (0.3, 0.1)}.items():
        curve(tmp_path, {20: at_20, 80: at_80}, seed=seed)
    table = matched_l0_table(load_results(tmp_path)[0], targets=[40])
    ci = 12.7062 * math.sqrt(2 * 0.025**2) / math.sqrt(2)  # seeds at 40: 0.15 and 0.20
    assert f"{ci:.4f}" == "0.3177"
    lines = to_markdown(table).splitlines()
    assert lines[3].startswith("|:") and "---:|" in lines[3]  # tabulate's pipe alignment row
    assert "0.1750 ± 0.3177" in lines[4] and "| jumprelu " in lines[4]
    assert "nan" not in "\n".join(lines).lower()


def test_null_ce_loss_recovered_is_shown_empty(tmp_path: Path) -> None:
    write_run(tmp_path, l0=20, target_l0=20, ce_loss_recovered=None)
    write_run(tmp_path, l0=80, target_l0=80, ce_loss_recovered=0.9)
    runs = load_results(tmp_path)[0]
    table = matched_l0_table(runs, targets=[20, 40, 80])
    assert table["ce_loss_recovered"].tolist() == pytest.approx([np.nan, np.nan, 0.9], nan_ok=True)
    cells = table_cells(table, MARKDOWN)
    assert cells["ce_loss_recovered"].tolist() == ["", "", "0.9000"]
    run_cells = table_cells(runs_table(runs), MARKDOWN)
    assert run_cells["ce_loss_recovered"].tolist() == ["", "0.9000"]
    assert "nan" not in to_markdown(runs_table(runs)).lower()


def test_best_architecture_is_marked(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    table = matched_l0_table(load_results(tmp_path)[0], l0_tolerance=0.1)
    assert sorted(table["target_l0"].unique()) == [10, 20, 40, 80, 160]
    assert len(table) == 3 * 2 * 2 * 5
    assert (table.loc[table["best"], "sae"] == "jumprelu").all()
    # L0 lands 1% below each target: 160 is filled from the end point 158.4, so never best
    assert table["best"].sum() == 2 * 2 * 4 and table.loc[table["best"], "target_l0"].max() == 80
    assert to_markdown(table).count("**") == 2 * table["best"].sum()
    assert r"\bfseries" in to_latex(table) and r"d\_sae" in to_latex(table)


# ---------------------------------------------------------------------------- files


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


def test_old_records_are_kept_and_listed(tmp_path: Path) -> None:
    old = {k: v for k, v in record().items() if k not in ("config_hash", "curve_hash")}
    for experiment in ("a", "b"):  # same run_id in two experiments: two runs, two curves
        (tmp_path / experiment / "run").mkdir(parents=True)
        (tmp_path / experiment / "run" / "result.json").write_text(
            json.dumps(old | {"experiment": experiment})
        )
    runs, problems = load_results(tmp_path)
    assert len(runs) == 2 and runs["curve_hash"].nunique() == 2
    assert problems["reason"].tolist() == ["old schema (no config_hash); re-run"] * 2


def test_report_files_are_written(tmp_path: Path) -> None:
    write_sweep(tmp_path / "runs", seeds=(0, 1))
    runs, problems = load_results(tmp_path / "runs")
    table, written, notes = write_report(runs, problems, tmp_path / "out", latex=True)
    inside = table["target_l0"].between(20, 80)  # strict: 10 and 160 are outside a seed's range
    assert (table.loc[inside, "n_seeds"] == 2).all() and table["delta_lm_loss_ci95"][
        inside
    ].notna().all()
    names = {path.name for path in written}
    for stem in ("fig_delta_lm_loss_vs_l0", "fig_fvu_vs_l0", "fig_high_freq_vs_l0"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"fig_firing_histograms.png", "table1_matched_l0.tex", "problems.csv"} <= names
    assert {"table1_matched_l0.csv", "table1_matched_l0.md", "table2_runs.csv"} <= names
    assert "fig_training.png" not in names  # no history.csv anywhere: no figure, no note
    assert all(path.stat().st_size > 0 for path in written) and not notes
    assert (tmp_path / "out" / "fig_fvu_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
    assert len(runs_table(runs)) == len(runs)


def test_training_history_figure(tmp_path: Path) -> None:
    for sae in ("jumprelu", "gated"):
        for target in (20, 80):
            write_run(tmp_path / "runs", sae=sae, l0=target, target_l0=target, history=True)
    write_run(tmp_path / "runs", sae="topk", l0=40, target_l0=40)  # no history: skipped
    runs, problems = load_results(tmp_path / "runs")
    _, written, _ = write_report(runs, problems, tmp_path / "out")
    assert {"fig_training.png", "fig_training.pdf"} <= {path.name for path in written}
    assert (tmp_path / "out" / "fig_training.png").stat().st_size > 10_000


def test_cli(tmp_path: Path) -> None:
    curve(tmp_path / "runs", {20: 0.2, 80: 0.1})
    write_run(tmp_path / "runs", sae="gated", status="failed", error="diverged")
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path / "runs"),
               "--targets", "40,85", "--l0-tolerance", "0.1", "--latex"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "0.1500" in done.stdout and "0.1000†" in done.stdout and "diverged" in done.stdout
    assert not done.stderr
    assert (tmp_path / "runs" / "report" / "fig_delta_lm_loss_vs_l0.png").stat().st_size > 0
    assert (tmp_path / "runs" / "report" / "table1_matched_l0.tex").exists()


def test_a_run_far_off_its_target_is_flagged(tmp_path: Path) -> None:
    """Held-out L0 more than 10% from target_l0 (a failed calibration, e.g. a diverged run): kept
    as a point at its own L0, and listed as a warning with its L0, FVU and dead fraction."""
    write_run(tmp_path, l0=43.9)  # +9.75%: fine
    write_run(tmp_path, target_l0=80, l0=101.2, fvu=0.699, frac_dead=0.722)  # +26.5%
    write_run(tmp_path, target_l0=20, l0=17.9)  # -10.5%
    runs, problems = load_results(tmp_path)
    assert len(runs) == 3
    warnings = problems[problems.status == "warning"].sort_values("run_dir")
    assert len(warnings) == 2
    first, second = warnings.itertuples()
    assert "l0_20" in first.run_dir and "l0 17.9 vs target_l0 20 (-10.5%" in first.reason
    assert "l0_80" in second.run_dir
    assert "l0 101.2 vs target_l0 80 (+26.5%; fvu 0.699, frac_dead 0.722)" in second.reason


def test_cli_fails_on_an_empty_folder(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and str(tmp_path) in done.stderr


def test_an_lm_set_off_the_held_out_l0_is_not_a_problem(tmp_path: Path) -> None:
    """splice_l0 away from the held-out l0 is no longer a warning: the LM metrics are read at
    splice_l0 (stats.x_column), so the LM set need not be representative."""
    write_run(tmp_path, l0=40.0, splice_l0=41.0)
    write_run(tmp_path, target_l0=80, l0=80.0, splice_l0=86.0)  # +7.5%
    runs, problems = load_results(tmp_path)
    assert len(runs) == 2 and problems.empty


def test_a_loss_spike_is_listed(tmp_path: Path) -> None:
    """A run whose trainer flagged a loss spike is kept and listed with the step and the jump."""
    write_run(tmp_path, l0=40.0, train_max_fvu_jump=3.1)  # healthy: no spike step
    write_run(tmp_path, target_l0=80, l0=80.0, train_max_fvu_jump=1203.0, train_spike_step=188)
    runs, problems = load_results(tmp_path)
    assert len(runs) == 2
    (warning,) = problems[problems.status == "warning"].itertuples()
    assert "l0_80" in warning.run_dir
    assert "loss spike at step 188 (batch FVU 1203x its running average" in warning.reason


def test_best_is_bold_only_where_resolved(tmp_path: Path) -> None:
    """One seed: JumpReLU 0.100 vs TopK 0.104 at L0 40 (4% ahead) and 0.050 vs 0.060 at 80
    (17% ahead). With --resolution 0.06 only the 80 cell is bold; with 0, both. Three seeds
    whose spread is wider than the gap: not bold."""
    for sae, deltas in (("jumprelu", {20: 0.2, 40: 0.100, 80: 0.050}),
                        ("topk", {20: 0.21, 40: 0.104, 80: 0.060})):  # fmt: skip
        curve(tmp_path / "one", deltas, sae=sae)
    runs = load_results(tmp_path / "one")[0]
    loose = matched_l0_table(runs, [40, 80])
    assert loose.loc[loose["best"], "target_l0"].tolist() == [40, 80]
    strict = matched_l0_table(runs, [40, 80], resolution=0.06)
    assert strict.loc[strict["best"], "target_l0"].tolist() == [80]
    text = to_markdown(strict)
    assert text.count("**") == 2 and "more than 6% of the runner-up" in text
    for seed, noise in enumerate((0.0, 0.02, -0.02)):  # JumpReLU's seeds spread +-0.02
        curve(tmp_path / "three", {20: 0.2, 40: 0.100 + noise, 80: 0.05 + noise}, seed=seed)
        curve(tmp_path / "three", {20: 0.21, 40: 0.104, 80: 0.060}, seed=seed, sae="topk")
    three = matched_l0_table(load_results(tmp_path / "three")[0], [40, 80])
    # at 80: gap 0.010 < JumpReLU's half-width 4.303 * 0.02 / sqrt(3) = 0.0497: not bold
    assert not three["best"].any()


def test_resolution_out_of_range_is_one_line(tmp_path: Path) -> None:
    curve(tmp_path, {20: 0.2, 80: 0.1})
    run = subprocess.run([sys.executable, "-m", "benchmark.report", str(tmp_path),
                          "--resolution", "-0.1"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--resolution=-0.1" in run.stderr and "[0, 1)" in run.stderr


def test_what_the_outlier_rule_left_out_is_in_table_2_and_the_notes(tmp_path: Path) -> None:
    filtered = {"max_norm_multiple": 10.0, "held_out_excluded": 93, "train_excluded": 88,
                "definition": "..."}  # fmt: skip
    write_run(tmp_path, layer=14, target_l0=20, l0=20.0, norm_filter=filtered)
    write_run(
        tmp_path, layer=14, target_l0=80, l0=80.0, norm_filter=filtered | {"held_out_excluded": 101}
    )
    write_run(tmp_path, layer=6, target_l0=20, l0=20.0)  # every token
    runs, _ = load_results(tmp_path)
    by_layer = runs.set_index(["layer", "target_l0"])
    assert (
        by_layer.loc[(14, 80), "n_left_out"] == 101
        and by_layer.loc[(14, 20), "n_train_left_out"] == 88
    )
    assert np.isnan(by_layer.loc[(6, 20), "max_norm_multiple"])
    assert {"max_norm_multiple", "n_left_out"} <= set(runs_table(runs).columns)
    _, _, notes = write_report(runs, pd.DataFrame(), tmp_path / "report")
    (note,) = [n for n in notes if "max_norm_multiple" in n]
    assert note.startswith("residual layer 14: 2 run(s)") and "10x" in note and "93-101" in note
