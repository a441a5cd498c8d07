"""The report along the training budget (benchmark/report/budget.py and the budget key of the
claims): synthetic runs at two budgets, JumpReLU worse than Gated at the small one and better
at the large one, three seeds each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.report import judge_claims, load_results, write_report
from benchmark.report.budget import claims_by_budget, plot_budget
from benchmark.report.claims import CLAIMS, tokens
from tests.test_report import write_run

FIG_2A = CLAIMS[0].text
# delta LM loss at L0 20 and 80 per (budget, architecture), seeds 0..2 add 0, 0.002, 0.004
DELTA = {
    160_000: {"jumprelu": (0.30, 0.20), "gated": (0.25, 0.15)},  # JumpReLU worse by 0.05
    640_000: {"jumprelu": (0.15, 0.08), "gated": (0.20, 0.12)},  # JumpReLU better
}


def budget_sweep(root: Path) -> pd.DataFrame:
    for budget, saes in DELTA.items():
        for sae, (at_20, at_80) in saes.items():
            for seed in range(3):
                for l0, delta in ((20, at_20), (80, at_80)):
                    write_run(root, folder=f"{sae}_{budget}_{l0}_s{seed}", recipe=f"n{budget}",
                              sae=sae, seed=seed, l0=l0, target_l0=l0, train_tokens=budget,
                              delta_lm_loss=delta + 0.002 * seed,
                              frac_dead=0.1 * 160_000 / budget)  # fmt: skip
    return load_results(root)[0]


def test_cells_pair_curves_of_one_budget_only(tmp_path: Path) -> None:
    runs = budget_sweep(tmp_path)
    assert sorted(runs["budget"].unique()) == [160_000, 640_000]
    cells = judge_claims(runs, [20, 40, 80]).cells
    fig_2a = cells[cells["claim"] == FIG_2A]
    # 3 L0 points x 2 budgets, each pairing one budget's JumpReLU with that budget's Gated
    assert len(fig_2a) == 6 and (fig_2a["n_seeds"] == 3).all()
    small = fig_2a[fig_2a["budget"] == 160_000].set_index("target_l0")
    assert small.loc[20, "diff"] == pytest.approx(0.05) and small.loc[20, "verdict"] == "refuted"
    large = fig_2a[fig_2a["budget"] == 640_000].set_index("target_l0")
    assert large.loc[80, "diff"] == pytest.approx(-0.04) and large.loc[80, "verdict"] == "holds"


def test_claims_side_by_side_per_budget(tmp_path: Path) -> None:
    table = claims_by_budget(budget_sweep(tmp_path), [40]).set_index("claim")
    assert list(table.columns) == ["160k tokens", "640k tokens"]
    assert table.loc[FIG_2A].tolist() == ["refuted (0/1)", "holds (1/1)"]
    assert tokens(2_560_000) == "2.56M" and tokens(160_000) == "160k"


def test_budget_figure_plots_table_1_values_against_tokens(tmp_path: Path) -> None:
    fig, notes = plot_budget(budget_sweep(tmp_path), 40.0)
    delta_ax, dead_ax = fig.axes[:2]
    assert delta_ax.get_xscale() == "log" and not notes
    lines = {bars.get_label(): bars.lines[0] for bars in delta_ax.containers}
    x, y = lines["JumpReLU"].get_data()
    # at L0 40 (the log midpoint of 20 and 80) each seed is the mean of its two values;
    # seeds add 0, 0.002, 0.004: mean +0.002
    assert list(x) == [160_000, 640_000]
    assert np.asarray(y) == pytest.approx([0.25 + 0.002, 0.115 + 0.002])
    dead = {bars.get_label(): bars.lines[0] for bars in dead_ax.containers}
    assert np.asarray(dead["Gated"].get_data()[1]) == pytest.approx([0.1, 0.025])


def test_report_writes_budget_outputs_only_with_several_budgets(tmp_path: Path) -> None:
    runs = budget_sweep(tmp_path / "runs")
    _, written, _ = write_report(runs, pd.DataFrame(), tmp_path / "two")
    names = {p.name for p in written}
    assert {"claims_by_budget.md", "claims_by_budget.csv", "fig_budget.png"} <= names
    text = (tmp_path / "two" / "claims_by_budget.md").read_text()
    assert "160k tokens" in text and "640k tokens" in text and "refuted (0/" in text
    one = runs[runs["budget"] == 640_000]
    _, written, _ = write_report(one, pd.DataFrame(), tmp_path / "one")
    assert not {p.name for p in written} & {"claims_by_budget.md", "fig_budget.png"}
