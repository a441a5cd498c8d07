"""The comparison along the training budget: the claims judged at each budget side by side, and
delta LM loss and the dead fraction at one matched L0 against the number of training tokens.

Owns the budget outputs (written by ``write`` only when the runs hold two or more budgets).
A curve's budget is ``load``'s ``budget`` (the tokens its SAEs trained on; ``train.n_tokens``
is part of the curve's hash, so one curve has one budget). Reads the claims of ``claims`` and
the matched-L0 values of ``stats``; nothing is computed differently here:
- Claims per budget: ``judge_claims`` on each budget's runs alone, one column per budget
  holding the verdict and its cells holding / compared.
- The figure: per (site, layer), two panels (delta LM loss, dead fraction), x the training
  tokens (log), y table 1's seed mean and 95% t-interval at the matched L0 (delta LM loss at
  ``splice_l0``, the dead fraction at ``l0``, as everywhere). One line per architecture and
  width, its colour and marker the report's (``figures.STYLE``); a line joins an
  architecture's curves only where it has one curve per budget, otherwise its points stand
  alone (two recipes at one budget are never averaged) and a note says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from benchmark.metrics import METRICS
from benchmark.report.claims import judge_claims, name, tokens
from benchmark.report.figures import OTHER_STYLES, STYLE, figure_legend, panel_stacks
from benchmark.report.load import sort_rows
from benchmark.report.stats import matched_l0_table

BUDGET_METRICS = ("delta_lm_loss", "frac_dead")


def budgets(df: pd.DataFrame) -> list[float]:
    """The distinct training budgets of the runs (tokens), smallest first."""
    if "budget" not in df:
        return []
    return sorted(float(b) for b in df["budget"].dropna().unique())


def claims_by_budget(
    df: pd.DataFrame, points: Sequence[float], l0_tolerance: float = 0.0
) -> pd.DataFrame:
    """One row per claim (and dead-latent measurement), one column per budget: "verdict
    (cells)" as ``judge_claims`` finds it on that budget's runs alone."""
    columns = {}
    for budget in budgets(df):
        summary = judge_claims(df[df["budget"] == budget], points, l0_tolerance).summary
        text = summary["verdict"] + " (" + summary["cells"] + ")"
        columns[f"{tokens(budget)} tokens"] = text.set_axis(summary["claim"])
    table = pd.DataFrame(columns)
    return table.rename_axis("claim").reset_index()


def budget_markdown(table: pd.DataFrame, points: Sequence[float]) -> str:
    at = ", ".join(f"{p:g}" for p in points)
    return "\n".join([
        "# Claims of the paper at each training budget",
        "",
        f"Each column judges the claims on that budget's runs alone (at L0 {at}; rules as in "
        "`claims.md`). A cell reads verdict (cells holding / cells compared).",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
    ])  # fmt: skip


def plot_budget(df: pd.DataFrame, l0: float, l0_tolerance: float = 0.0) -> tuple[Figure, list[str]]:
    """Delta LM loss and dead fraction at matched L0 ``l0`` against training tokens, and notes
    (an architecture with several curves at one budget)."""
    table = matched_l0_table(df, [l0], BUDGET_METRICS, l0_tolerance)
    fig, stacks = panel_stacks(df, len(BUDGET_METRICS))
    notes: list[str] = []
    styles = iter(OTHER_STYLES * 10)
    saes = sort_rows(df[["sae"]].drop_duplicates(), ["sae"])["sae"]
    style = {sae: STYLE.get(sae) or next(styles) for sae in saes}
    wide = df["d_sae"].nunique() > 1
    for (site, layer), axes in stacks.items():
        here = table[(table["site"] == site) & (table["layer"] == layer)]
        for (sae, d_sae), line in sort_rows(here, ["sae", "d_sae", "budget"]).groupby(
            ["sae", "d_sae"], sort=False
        ):
            colour, marker = style[sae]
            label = f"{name(sae)} ({d_sae:.0f})" if wide else name(sae)
            joined = not line["budget"].duplicated().any()
            if not joined:
                notes.append(f"fig_budget: {label} has several curves at one budget in {site} "
                             f"layer {layer:g}; their points are not joined")  # fmt: skip
            for ax, metric in zip(axes, BUDGET_METRICS, strict=True):
                x, mean = line["budget"].to_numpy(), line[metric].to_numpy()
                half = line[f"{metric}_ci95"].fillna(0).to_numpy()
                ax.errorbar(x, mean, yerr=half, color=colour, marker=marker, markersize=5,
                            linestyle="-" if joined else "none", capsize=3, label=label)  # fmt: skip
        for ax, metric in zip(axes, BUDGET_METRICS, strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("training tokens (log scale)")
            ax.set_ylabel(METRICS[metric].label)
            ticks = sorted(here["budget"].dropna().unique())
            if ticks:
                ax.set_xticks(ticks, [tokens(t) for t in ticks])
                ax.minorticks_off()
    figure_legend(fig, {key: stack[0] for key, stack in stacks.items()})
    fig.suptitle(f"At matched L0 {l0:g} (delta LM loss at the LM set's L0), mean and 95% "
                 "interval over seeds, against the training budget")  # fmt: skip
    return fig, notes


def has_budgets(df: pd.DataFrame) -> bool:
    return len(budgets(df)) > 1
