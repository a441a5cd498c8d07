"""Writing the report: every table (CSV, markdown, LaTeX when asked), the paper's claims judged
(``claims.md``, per cell ``claims_cells.md``) and figure (PNG, PDF) under one folder, one set
of figures per model when the runs hold several models. Runs of two or more training budgets
add ``claims_by_budget.{csv,md}`` and ``fig_budget`` (``budget``).

Owns the file names. Composes ``stats``, ``tables``, ``claims``, ``figures`` and ``training``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchmark.report.budget import budget_markdown, claims_by_budget, has_budgets, plot_budget
from benchmark.report.claims import (
    Judged,
    cells_markdown,
    claim_points,
    claims_latex,
    claims_markdown,
    judge_claims,
)
from benchmark.report.figures import CURVE_FIGURES, plot_firing_histograms, plot_metric_vs_l0
from benchmark.report.stats import default_targets, matched_l0_table
from benchmark.report.tables import runs_table, to_latex, to_markdown
from benchmark.report.training import plot_training_history

TABLE1_TITLE = "Table 1: metrics at matched L0 (mean ± 95% t-interval over seeds). "
TABLE2_TITLE = "Table 2: every run. "


def write_report(
    df: pd.DataFrame,
    problems: pd.DataFrame,
    out: Path,
    targets: Sequence[float] | None = None,
    latex: bool = False,
    l0_tolerance: float = 0.0,
    claims_l0: Sequence[float] | None = None,
    resolution: float = 0.0,
) -> tuple[pd.DataFrame, list[Path], list[str]]:
    """Write every table and figure under ``out``; (table 1, paths written, notes). The claims
    are judged at ``claims_l0`` (default: ``claim_points(targets)``); table 1 bolds a best only
    where it is ahead by more than ``resolution`` (relative) and the intervals."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "problems.csv"]
    problems.to_csv(written[0], index=False)
    if df.empty:
        return pd.DataFrame(), written, ["no complete runs: no tables or figures"]
    targets = default_targets(df) if targets is None else sorted(targets)
    table = matched_l0_table(df, targets, l0_tolerance=l0_tolerance, resolution=resolution)
    written += write_table(table, out / "table1_matched_l0", latex, TABLE1_TITLE)
    written += write_table(runs_table(df), out / "table2_runs", False, TABLE2_TITLE)
    points = claim_points(targets) if claims_l0 is None else sorted(claims_l0)
    written += write_claims(judge_claims(df, points, l0_tolerance), out, latex)
    notes = left_out_notes(df)
    if has_budgets(df):  # several training budgets: the claims and fig_budget along them
        by_budget = claims_by_budget(df, points, l0_tolerance)
        written += [out / "claims_by_budget.csv", out / "claims_by_budget.md"]
        by_budget.to_csv(written[-2], index=False)
        written[-1].write_text(budget_markdown(by_budget, points))
    for model, runs in df.groupby("model", sort=True):
        suffix = "" if df["model"].nunique() == 1 else f"_{model}"
        if has_budgets(df):
            figure, missing = plot_budget(runs, float(np.median(points)), l0_tolerance)
            written += save(figure, out / f"fig_budget{suffix}")
            notes += missing
        for name, metric in CURVE_FIGURES.items():
            written += save(plot_metric_vs_l0(runs, metric, targets), out / f"{name}{suffix}")
        figure, missing = plot_firing_histograms(runs, float(np.median(targets)))
        written += save(figure, out / f"fig_firing_histograms{suffix}")
        notes += missing
        history = plot_training_history(runs)
        if history is not None:
            written += save(history, out / f"fig_training{suffix}")
    return table, written, notes


def left_out_notes(df: pd.DataFrame) -> list[str]:
    """One note per (site, layer) whose runs left out massive activations
    (data.max_norm_multiple): the multiple and the held-out rows left out (table 2 has them
    per run)."""
    if "max_norm_multiple" not in df:
        return []
    used = df[df["max_norm_multiple"].notna()]
    notes = []
    for (site, layer), runs in used.groupby(["site", "layer"], sort=True):
        low, high = runs["n_left_out"].min(), runs["n_left_out"].max()
        rows = f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"
        notes.append(f"{site} layer {layer:g}: {len(runs)} run(s) left out positions over "
                     f"{runs['max_norm_multiple'].iloc[0]:g}x the median norm "
                     f"(data.max_norm_multiple): {rows} held-out rows each")  # fmt: skip
    return notes


def write_table(table: pd.DataFrame, stem: Path, latex: bool, title: str = "") -> list[Path]:
    """``stem``.csv (every column, numbers in full), .md, and .tex when asked."""
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(table, title))
    if latex:
        paths.append(stem.with_suffix(".tex"))
        paths[-1].write_text(to_latex(table))
    return paths


def write_claims(judged: Judged, out: Path, latex: bool) -> list[Path]:
    """claims.csv/.md (one row per claim), claims_cells.csv/.md (per cell), claims.tex if asked."""
    paths = [out / f"claims{end}" for end in (".csv", ".md", "_cells.csv", "_cells.md")]
    judged.summary.to_csv(paths[0], index=False)
    pointer = "\nPer cell: `claims_cells.md`; every number in full: `claims_cells.csv`.\n"
    paths[1].write_text(claims_markdown(judged) + pointer)
    judged.cells.to_csv(paths[2], index=False)
    paths[3].write_text(cells_markdown(judged.cells))
    if latex:
        paths.append(out / "claims.tex")
        paths[-1].write_text(claims_latex(judged.summary))
    return paths


def save(fig: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths
