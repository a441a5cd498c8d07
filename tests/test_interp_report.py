"""The automated-interpretability summary (``benchmark.report.interp``) on hand-built frames:
the Welch comparison checked against the formula by hand, its three verdicts, undefined (NaN)
scores counted and never averaged, the markdown's escaping, the CSV reader's errors, the
figure, and ``python -m benchmark.report`` picking up ``interp/interp.csv`` (no model, no torch
in the code under test)."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.report.__main__ import main
from benchmark.report.interp import (
    HOLDS,
    INCONCLUSIVE,
    comparison,
    interp_markdown,
    plot_interp,
    read_interp_csv,
    summary,
    welch,
    write_interp,
)
from tests.test_report import write_run

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.6.hook_resid_post"


def scored(scores: dict[str, list[float]], target: float = 20, seed: int = 0) -> pd.DataFrame:
    """One row per scored latent, as benchmark.interp writes them: ``scores`` per architecture."""
    rows = []
    for sae, values in scores.items():
        for i, score in enumerate(values):
            rows.append({"run_id": f"{sae}_l0_{target:g}_s{seed}", "sae": sae,
                         "target_l0": float(target), "l0": target * 1.02 + seed, "seed": seed,
                         "model": "smollm2_135m", "hook": HOOK, "latent": i,
                         "frequency": 10.0 ** -(2 + i % 3),
                         "band": ["1e-3..1e-2", "1e-4..1e-3", "1e-5..1e-4"][i % 3],
                         "explanation": f"latent {i} of {sae}", "score": score, "n_scored": 64,
                         "explainer": "smollm2_135m", "simulator": "smollm2_135m"})  # fmt: skip
    return pd.DataFrame(rows)


def test_welch_interval_matches_the_formula_by_hand():
    a, b = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4  # 0.01/3, (0.05/3)/4
    df = (va + vb) ** 2 / (va**2 / (3 - 1) + vb**2 / (4 - 1))
    assert df == pytest.approx(4.9592, abs=1e-4) and math.floor(df) == 4
    half = 2.7764 * math.sqrt(va + vb)  # t(0.975, 4): the Welch df rounded down
    diff, got_half, got_df = welch(pd.Series(a), pd.Series(b))
    assert diff == pytest.approx(-0.35, abs=1e-9)
    assert got_half == pytest.approx(half, abs=1e-9) and got_df == pytest.approx(df, abs=1e-9)
    row = comparison(scored({"jumprelu": a, "gated": b})).iloc[0]
    assert (row.a, row.b, row.n_a, row.n_b) == ("jumprelu", "gated", 3, 4)
    assert row["diff"] == pytest.approx(-0.35, abs=1e-9)
    assert row["ci95"] == pytest.approx(half, abs=1e-9)
    assert row.verdict == "JumpReLU lower"  # -0.35 ± 0.240: the interval excludes 0


def test_verdicts_contained_excluded_inconclusive():
    table = comparison(scored({"jumprelu": [0.3, 0.35, 0.4], "gated": [0.2, 0.4, 0.6, 0.0],
                               "topk": [0.0, 0.05, 0.1, 0.05]}))  # fmt: skip
    pooled = table[table["target_l0"].isna()].set_index("b")
    assert pooled.loc["gated", "verdict"] == HOLDS
    g = pooled.loc["gated"]
    assert g["diff"] - g["ci95"] < 0 < g["diff"] + g["ci95"]
    assert pooled.loc["topk", "verdict"] == "JumpReLU higher"
    one = comparison(scored({"jumprelu": [0.3, math.nan], "gated": [0.1, 0.2, 0.3]}))
    assert one.iloc[0]["verdict"] == INCONCLUSIVE and one.iloc[0]["n_a"] == 1
    assert math.isnan(one.iloc[0]["ci95"])


def test_pooled_row_then_one_row_per_target_l0_and_reference_without_jumprelu():
    frame = pd.concat(
        [
            scored({"topk": [0.1, 0.2, 0.3], "gated": [0.5, 0.6, 0.7]}, target=20),
            scored({"topk": [0.1, 0.2], "gated": [0.2, 0.1]}, target=40, seed=1),
        ]
    )
    table = comparison(frame)
    assert table["target_l0"].tolist()[1:] == [20.0, 40.0] and math.isnan(table["target_l0"][0])
    assert (table["a"] == "gated").all()  # no JumpReLU: the first in ORDER["sae"] order
    assert table["verdict"].tolist()[1:] == ["Gated higher", HOLDS]
    assert table["n_a"].tolist() == [5, 3, 2]  # pooled over target L0s and seeds


def test_nan_scores_are_counted_not_averaged():
    frame = scored({"jumprelu": [0.2, math.nan, 0.4, math.nan], "gated": [0.1, 0.3]})
    rows = summary(frame).set_index("sae")
    assert rows.loc["jumprelu", "latents"] == 4 and rows.loc["jumprelu", "undefined"] == 2
    assert rows.loc["jumprelu", "mean"] == pytest.approx(0.3, abs=1e-12)
    assert rows.loc["jumprelu", "median"] == pytest.approx(0.3, abs=1e-12)
    assert rows.loc["jumprelu", "l0"] == pytest.approx(20.4)  # one run: its achieved L0
    text = interp_markdown(frame)
    assert "2 of 6 latents here" in text
    assert "| JumpReLU | 20 | 20.4 | 1 | 4 | 2 | 0.300 ± 1.271 | 0.300 |" in text


def test_markdown_states_the_score_the_models_and_escapes_explanations():
    frame = scored({"jumprelu": [0.9, 0.1], "gated": [0.2, 0.3]})
    frame.loc[0, "explanation"] = "tokens a | b\nafter <b>bold</b> \\ end"
    text = interp_markdown(frame)
    assert text.startswith("# Automated interpretability (explain, simulate, score)\n")
    assert "Bills et al. (2023)" in text and "Explainer: `smollm2_135m`" in text
    assert "not the paper's numbers" in text and "The unit is the latent" in text
    assert f"## smollm2_135m {HOOK}" in text
    row = next(line for line in text.splitlines() if "tokens a" in line)
    assert row == ("| JumpReLU | jumprelu_l0_20_s0 | 0 | 0.900 | tokens a \\| b after "
                   "&lt;b&gt;bold&lt;/b&gt; \\\\ end |")  # fmt: skip
    bands = text.split("firing-frequency band (n: defined scores):\n\n")[1].splitlines()[:4]
    assert bands == ["| band | JumpReLU | Gated |", "|---|---:|---:|",  # by lower edge
                     "| 1e-4..1e-3 | 0.100 (n=1) | 0.300 (n=1) |",
                     "| 1e-3..1e-2 | 0.900 (n=1) | 0.200 (n=1) |"]  # fmt: skip
    assert len(comparison(frame)) == 1  # one target L0: the pooled row only


def test_reader_keeps_text_fills_optional_columns_and_names_the_file(tmp_path):
    frame = scored({"jumprelu": [0.5, 0.6]})
    frame.loc[0, "explanation"] = 'None, "quoted", a\nnewline'
    frame.to_csv(tmp_path / "interp.csv", index=False)
    back = read_interp_csv(tmp_path / "interp.csv")
    assert back.loc[0, "explanation"] == 'None, "quoted", a\nnewline'
    assert back["score"].tolist() == [0.5, 0.6] and back["latent"].tolist() == [0, 1]
    frame[["run_id", "sae", "target_l0", "seed", "hook", "latent", "score"]].to_csv(
        tmp_path / "bare.csv", index=False
    )
    bare = read_interp_csv(tmp_path / "bare.csv")
    assert "simulator: not recorded" in interp_markdown(bare)
    frame.drop(columns=["score", "hook"]).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match=r"other\.csv: no column hook, score"):
        read_interp_csv(tmp_path / "other.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv"):
        read_interp_csv(tmp_path / "empty.csv")


def test_figure_and_files_are_written(tmp_path):
    frame = scored({"jumprelu": [0.1, 0.2, 0.35, math.nan], "gated": [0.3, 0.5, 0.7],
                    "mystery": [0.4]})  # fmt: skip
    fig = plot_interp(frame)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["JumpReLU", "Gated", "mystery"]
    assert ax.get_ylabel() == "score (Pearson r)"
    low, high = ax.get_ylim()
    assert 0.05 < low < 0.1 and 0.7 < high < 0.75  # the data's range, not -1..1
    frame.to_csv(tmp_path / "interp.csv", index=False)
    written = write_interp(tmp_path / "interp.csv", tmp_path / "out")
    assert [p.name for p in written] == ["interp.md", "fig_interp.png", "fig_interp.pdf"]
    png = (tmp_path / "out" / "fig_interp.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    assert (tmp_path / "out" / "fig_interp.pdf").stat().st_size > 1_000


def test_report_cli_adds_the_interp_summary_and_leaves_a_damaged_one_out(tmp_path, capsys):
    runs = tmp_path / "runs"  # one failed run: the report is its problem list (no figures: fast)
    write_run(runs, status="failed", error="diverged")
    (runs / "interp").mkdir()
    scored({"jumprelu": [0.1, 0.2, 0.3], "gated": [0.4, 0.5, 0.6, 0.7]}).to_csv(
        runs / "interp" / "interp.csv", index=False
    )
    command = [sys.executable, "-m", "benchmark.report", str(runs)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(runs / "report" / "interp.md") in done.stdout
    assert str(runs / "report" / "fig_interp.png") in done.stdout
    assert "JumpReLU lower" in (runs / "report" / "interp.md").read_text()
    pd.DataFrame({"x": [1]}).to_csv(runs / "interp" / "interp.csv", index=False)
    assert main([str(runs), "--out", str(tmp_path / "again")]) == 0  # in-process: faster
    printed = capsys.readouterr().out
    assert "note: interp summary left out:" in printed and "not a benchmark.interp" in printed
    assert not (tmp_path / "again" / "interp.md").exists()


def test_scores_at_chance_are_not_judged_whatever_the_difference():
    """A simulator that predicts nothing gives scores around 0; a difference between
    architectures measured with it is no evidence, so every verdict at that hook says so."""
    from benchmark.report.interp import AT_CHANCE, above_chance, comparison

    rows = [{"run_id": f"{sae}_r", "sae": sae, "target_l0": 40.0, "seed": 0, "hook": "h",
             "model": "m", "latent": i, "score": s}
            for sae, scores in (("jumprelu", [-0.30, -0.25, -0.20, -0.28]),
                                ("gated", [0.20, 0.25, 0.30, 0.22]))
            for i, s in enumerate(scores)]  # fmt: skip
    group = pd.DataFrame(rows)
    assert not above_chance(group)  # mean -0.0075: not above 0
    table = comparison(group)
    assert (table["verdict"] == AT_CHANCE).all()
    assert table["diff"].iloc[0] == pytest.approx(-0.2575 - 0.2425)  # still measured and shown
    group.loc[group["sae"] == "jumprelu", "score"] += 0.6  # now both well above chance
    assert above_chance(group) and comparison(group)["verdict"].iloc[0] == "JumpReLU higher"
