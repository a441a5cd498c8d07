"""Tests of benchmark.report.claims: the paper's claims judged on synthetic result folders."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.report import judge_claims, load_results
from benchmark.report.claims import CLAIMS, SUMMARY_COLUMNS, Judged, cells_markdown, claim_points
from tests.test_report import REPO, curve, write_run

FIG_2A, FIG_2B, FIG_5_JUMPRELU, FIG_5_TOPK = (claim.text for claim in CLAIMS)
T_975_DF2 = 4.303  # t(0.975, 2): three seeds


def sweep(root: Path, deltas: dict[str, list[tuple[float, float]]], **fields) -> pd.DataFrame:
    """Per architecture, one curve per seed measured at L0 20 and 80: its delta LM loss there."""
    for sae, seeds in deltas.items():
        for seed, (at_20, at_80) in enumerate(seeds):
            curve(root, {20: at_20, 80: at_80}, sae=sae, seed=seed, **fields)
    return load_results(root)[0]


def summary(judged: Judged, claim: str) -> pd.Series:
    (row,) = judged.summary[judged.summary["claim"] == claim].to_dict("records")
    return pd.Series(row)


def cell(judged: Judged, claim: str, target_l0: float) -> pd.Series:
    cells = judged.cells
    (row,) = cells[(cells["claim"] == claim) & (cells["target_l0"] == target_l0)].to_dict("records")
    return pd.Series(row)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width by hand (n = 3: t = 4.303)."""
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975_DF2 * sd / math.sqrt(n)


JUMPRELU = [(0.20, 0.10), (0.22, 0.12), (0.21, 0.10)]
GATED = [(0.25, 0.12), (0.24, 0.13), (0.27, 0.12)]


def test_jumprelu_better_everywhere_with_three_seeds_holds(tmp_path: Path) -> None:
    topk = [(a + 0.01, b + 0.005) for a, b in JUMPRELU]
    runs = sweep(tmp_path, {"jumprelu": JUMPRELU, "gated": GATED, "topk": topk})
    judged = judge_claims(runs, [20, 40, 80])
    for claim in (FIG_2A, FIG_2B):
        assert summary(judged, claim)[["verdict", "cells", "reason"]].tolist() == [
            "holds", "3/3", "every cell holds"
        ]  # fmt: skip
    assert (judged.cells["n_seeds"] == 3).all()


def test_interval_of_the_difference_is_a_paired_t_interval(tmp_path: Path) -> None:
    for seed, frac_dead in enumerate((0.01, 0.02, 0.03)):  # dead fraction per JumpReLU seed
        curve(tmp_path, {20: JUMPRELU[seed][0], 80: JUMPRELU[seed][1]}, seed=seed,
              frac_dead=frac_dead)  # fmt: skip
        curve(tmp_path, {20: GATED[seed][0], 80: GATED[seed][1]}, seed=seed, sae="gated")
    judged = judge_claims(load_results(tmp_path)[0], [20, 40, 80])
    # at 40 (the midpoint of 20 and 80 in log L0) each seed's value is the mean of its two
    at_40 = [(j[0] + j[1]) / 2 - (g[0] + g[1]) / 2 for j, g in zip(JUMPRELU, GATED)]
    mean, half = t_interval(at_40)  # -0.030 ± 0.0329: the interval holds 0, the mean is < 0
    assert (mean, half) == pytest.approx((-0.030, 0.032865), abs=1e-6)
    c = cell(judged, FIG_2A, 40)
    assert c["diff"] == pytest.approx(mean) and c["diff_ci95"] == pytest.approx(half, rel=1e-4)
    assert c["verdict"] == "holds" and c["value_a"] == pytest.approx((0.15 + 0.17 + 0.155) / 3)
    # the evidence quotes the cell most against the claim: L0 80, d = -0.02, -0.01, -0.02
    mean_80, half_80 = t_interval([j[1] - g[1] for j, g in zip(JUMPRELU, GATED)])
    evidence = summary(judged, FIG_2A)["evidence"]
    assert f"L0 80: 0.1067 vs 0.1233, d {mean_80:+.4f} ± {half_80:.4f} (3 seeds)" in evidence
    assert "d -0.0167 ± 0.0143" in evidence and "d over 3 cells in [-0.0433, -0.0167]" in evidence
    dead = summary(judged, "dead latents: JumpReLU frac_dead")
    assert dead["verdict"] == "measured" and dead["cells"] == "3/3"
    dead_mean, dead_half = t_interval([0.01, 0.02, 0.03])
    assert dead["evidence"].startswith(f"mean {dead_mean:.4f} ± {dead_half:.4f} over 3 seeds")
    assert dead["evidence"].startswith("mean 0.0200 ± 0.0248 over 3 seeds")


def test_significantly_worse_in_one_cell_is_refuted(tmp_path: Path) -> None:
    jumprelu = [(0.20, 0.15), (0.21, 0.16), (0.22, 0.15)]
    gated = [(0.25, 0.10), (0.26, 0.11), (0.27, 0.11)]  # at 80: d = 0.05, 0.05, 0.04
    judged = judge_claims(sweep(tmp_path, {"jumprelu": jumprelu, "gated": gated}), [20, 40, 80])
    row = summary(judged, FIG_2A)
    assert row["verdict"] == "refuted" and row["cells"] == "2/3"
    assert row["reason"] == "significantly against the claim in 1 cell(s): residual L6 L0 80"
    assert "worst at residual L6 L0 80" in row["evidence"]
    assert cell(judged, FIG_2A, 80)["diff"] - cell(judged, FIG_2A, 80)["diff_ci95"] > 0


def test_not_significantly_worse_holds_for_topk_not_for_gated(tmp_path: Path) -> None:
    jumprelu = [(0.20, 0.10)] * 3
    rival = [(0.19, 0.10), (0.21, 0.10), (0.18, 0.10)]  # at 20: d = +0.01, -0.01, +0.02
    runs = sweep(tmp_path, {"jumprelu": jumprelu, "gated": rival, "topk": rival})
    judged = judge_claims(runs, [20, 80])
    assert cell(judged, FIG_2A, 20)["verdict"] == "inconclusive"
    assert summary(judged, FIG_2A)["reason"] == "1 cell(s): against the claim, not significantly"
    assert summary(judged, FIG_2B)[["verdict", "cells"]].tolist() == ["holds", "2/2"]


def test_one_seed_is_inconclusive_with_its_numbers(tmp_path: Path) -> None:
    runs = sweep(tmp_path, {"jumprelu": JUMPRELU[:1], "gated": GATED[:1]})
    judged = judge_claims(runs, [20, 40, 80])
    row = summary(judged, FIG_2A)
    assert row["verdict"] == "inconclusive" and row["cells"] == "0/3"
    assert (
        row["reason"]
        == "3 cell(s): one counted seed, no interval (the points agree with the claim in 3)"
    )
    assert "L0 80: 0.1000 vs 0.1200, d -0.0200 (1 seed)" in row["evidence"]
    assert judged.cells["diff_ci95"].isna().all()
    dead = summary(judged, "dead latents: Gated frac_dead")
    assert dead["evidence"].startswith("mean 0.0100 (one seed, no interval)")


def test_a_missing_architecture_is_inconclusive_with_the_reason(tmp_path: Path) -> None:
    runs = sweep(tmp_path, {"jumprelu": JUMPRELU, "topk": GATED})
    judged = judge_claims(runs, [20, 40, 80])
    for claim in (FIG_2A, FIG_5_JUMPRELU, FIG_5_TOPK):
        row = summary(judged, claim)
        assert row[["verdict", "cells", "reason"]].tolist() == [
            "inconclusive", "0/0", "no Gated runs"
        ]  # fmt: skip
    assert summary(judged, FIG_2B)["verdict"] == "holds"
    assert judged.summary["claim"].tolist()[:4] == [FIG_2A, FIG_2B, FIG_5_JUMPRELU, FIG_5_TOPK]
    assert "nan" not in judged.summary.to_markdown().lower()


@pytest.mark.parametrize("tolerance", [0.0, 0.1])
def test_end_point_cells_are_not_evidence(tmp_path: Path, tolerance: float) -> None:
    for seed in range(3):  # JumpReLU the better everywhere, but Gated measured only up to 76
        curve(tmp_path, {20: 0.2 + 0.01 * seed, 80: 0.1}, seed=seed)
        curve(tmp_path, {20: 0.3, 76: 0.15 + 0.01 * seed}, seed=seed, sae="gated")
    judged = judge_claims(load_results(tmp_path)[0], [40, 80], l0_tolerance=tolerance)
    row, at_80 = summary(judged, FIG_2A), cell(judged, FIG_2A, 80)
    assert row["verdict"] == "inconclusive" and row["cells"] == "1/2"
    assert at_80["n_seeds"] == 0 and at_80["verdict"] == "inconclusive"
    if tolerance:  # Gated's end point at 76 fills 80: shown, left out, and said so
        assert at_80["cause"] == "left out: end point"
        assert at_80["note"] == "3 of 3 seeds left out (end point)"
        assert at_80["value_b"] == pytest.approx(0.16) and at_80["diff"] < 0
        assert row["reason"] == "1 cell(s): left out: end point"
        assert "left out: end point; 3 of 3 seeds left out" in cells_markdown(judged.cells)
    else:
        assert at_80["cause"] == "no value at this L0 (outside a curve's measured L0 range)"
        assert math.isnan(at_80["value_b"])
    assert "d over 1 cells" in row["evidence"]  # only the interpolated cell at 40 counts


def test_lm_metrics_are_read_at_their_own_l0(tmp_path: Path) -> None:
    """delta LM loss is interpolated along splice_l0 (the L0 on the LM set's positions), not
    along the activation set's l0: a run whose LM set reads L0 86 where the held-out set reads
    80 counts, at its own L0, and no seed is left out for it."""
    for seed in range(3):
        write_run(tmp_path, l0=20, target_l0=20, delta_lm_loss=0.2, seed=seed)
        splice_l0 = 86.0 if seed == 0 else 80.0  # +7.5% on the LM set for seed 0
        write_run(tmp_path, l0=80, target_l0=80, delta_lm_loss=0.1, seed=seed, splice_l0=splice_l0)
        curve(tmp_path, {20: 0.3, 80: 0.2}, seed=seed, sae="gated")
    judged = judge_claims(load_results(tmp_path)[0], [20, 40, 80])
    # seed 0 at 40, by hand: linear in log L0 between (20, 0.2) and (86, 0.1)
    w = math.log(40 / 20) / math.log(86 / 20)
    seed0 = 0.2 + w * (0.1 - 0.2)  # 0.15248; seeds 1 and 2: 0.15 (halfway in log L0)
    c = cell(judged, FIG_2A, 40)
    assert c["n_seeds"] == 3 and c["note"] == "" and c["verdict"] == "holds"
    assert c["value_a"] == pytest.approx((seed0 + 0.15 + 0.15) / 3, abs=1e-9)
    assert c["value_b"] == pytest.approx(0.25, abs=1e-9)
    # at 80 seed 0's LM curve is interpolated (86 lies beyond), the others hit their point
    w80 = math.log(80 / 20) / math.log(86 / 20)
    at_80 = cell(judged, FIG_2A, 80)
    assert at_80["value_a"] == pytest.approx((0.2 - 0.1 * w80 + 0.1 + 0.1) / 3, abs=1e-9)
    assert (judged.cells.loc[judged.cells["claim"] == FIG_5_JUMPRELU, "n_seeds"] == 3).all()


def test_more_high_frequency_latents_than_gated(tmp_path: Path) -> None:
    for seed in range(3):
        for sae, frequent in (("jumprelu", 2e-3), ("topk", 3e-3), ("gated", 1e-3)):
            curve(tmp_path / "more", {20: 0.2, 80: 0.1}, seed=seed, sae=sae,
                  frac_freq_over_10pct=frequent * (1 + 0.1 * seed))  # fmt: skip
        curve(tmp_path / "tie", {20: 0.2, 80: 0.1}, seed=seed, sae="gated")
        curve(tmp_path / "tie", {20: 0.2, 80: 0.1}, seed=seed, sae="topk")
    judged = judge_claims(load_results(tmp_path / "more")[0], [20, 80])
    for claim in (FIG_5_JUMPRELU, FIG_5_TOPK):
        assert summary(judged, claim)[["verdict", "cells"]].tolist() == ["holds", "2/2"]
    tie = judge_claims(load_results(tmp_path / "tie")[0], [20, 80])
    assert summary(tie, FIG_5_TOPK)[["verdict", "reason"]].tolist() == [
        "inconclusive", "2 cell(s): a tie"
    ]  # fmt: skip


def test_cli_writes_the_claims(tmp_path: Path) -> None:
    sweep(tmp_path / "runs", {"jumprelu": JUMPRELU[:1], "gated": GATED[:1]})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path / "runs"), "--out", str(out),
               "--targets", "20,40,80", "--latex"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "# Claims of the paper, judged at matched L0" in done.stdout
    csv = pd.read_csv(out / "claims.csv", keep_default_na=False)
    assert tuple(csv.columns) == SUMMARY_COLUMNS
    verdicts = dict(zip(csv["claim"], csv["verdict"]))
    assert verdicts[FIG_2A] == "inconclusive" and verdicts[FIG_2B] == "inconclusive"
    assert csv.loc[csv["claim"] == FIG_2B, "reason"].item() == "no TopK runs"
    markdown = (out / "claims.md").read_text()
    assert "| JumpReLU's delta_lm_loss <= Gated's" in markdown and "t(0.975, n - 1)" in markdown
    assert "nan" not in markdown.lower()
    assert len(pd.read_csv(out / "claims_cells.csv")) == 3 + 3  # Fig. 2 (a), Fig. 5 JumpReLU
    cells_md = (out / "claims_cells.md").read_text()  # judged inside 20..80 (claim_points)
    assert all(f"| residual L6 L0 {p} " in cells_md for p in ("28.3", "40", "56.6"))
    assert "L0 20 " not in cells_md and "L0 80 " not in cells_md
    assert r"$\le$ Gated's" in (out / "claims.tex").read_text()


def test_claim_points_are_the_inside_of_the_swept_range() -> None:
    assert claim_points([80, 20, 40]) == [28.3, 40.0, 56.6]
    assert claim_points([20, 40]) == [28.3]
    assert claim_points([40]) == [40.0]  # no inside: the target itself


def test_curves_landing_beside_the_end_targets_are_judged_inside(tmp_path: Path) -> None:
    """Calibrated runs land a few % beside their targets (here 20.6 and 78.0): at L0 20 and 80
    half the curves only have an end point (never counted), inside every seed interpolates."""
    for seed, (j, g) in enumerate([(0.30, 0.40), (0.32, 0.45)]):
        for sae, at_20, at_80 in (("jumprelu", j, j / 2), ("gated", g, g / 2)):
            write_run(tmp_path, sae=sae, seed=seed, l0=20.6, target_l0=20, delta_lm_loss=at_20)
            write_run(tmp_path, sae=sae, seed=seed, l0=78.0, target_l0=80, delta_lm_loss=at_80)
    runs = load_results(tmp_path)[0]
    at_targets = judge_claims(runs, [20, 80], l0_tolerance=0.05)
    assert summary(at_targets, FIG_2A)["verdict"] == "inconclusive"
    assert cell(at_targets, FIG_2A, 20)["n_seeds"] == 0  # both seeds from end points
    inside = judge_claims(runs, claim_points([20, 80]), l0_tolerance=0.05)
    (mid,) = claim_points([20, 80])
    got = cell(inside, FIG_2A, mid)
    # by hand: log-linear between (20.6, v20) and (78.0, v20 / 2) at L0 40
    w = math.log(mid / 20.6) / math.log(78.0 / 20.6)
    d = [(j - g) * (1 - w / 2) for j, g in [(0.30, 0.40), (0.32, 0.45)]]
    assert got["n_seeds"] == 2 and got["diff"] == pytest.approx(sum(d) / 2, rel=1e-9)
    assert summary(inside, FIG_2A)[["verdict", "cells"]].tolist() == ["holds", "1/1"]


@pytest.mark.parametrize("bad", ["", "20,x", "0,40", "nan"])
def test_cli_rejects_bad_claims_l0_in_one_line(tmp_path: Path, bad: str) -> None:
    command = [sys.executable, "-m", "benchmark.report", str(tmp_path), "--claims-l0", bad]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --claims-l0={bad!r}: expected comma-separated positive L0 values, e.g. 20,40,80"
    ]
