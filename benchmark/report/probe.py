"""The sparse-probing summary: ``probe.csv`` (written by ``benchmark.probe``) -> ``probe.md``.

Owns the probe tables' text and the probe comparison's rule. Reads the tidy probe frame with
pandas alone (one row per SAE, dataset and k, plus the dense baseline's rows, ``sae ==
"dense"``); must not know torch or the model. ``benchmark.probe`` writes this summary beside its
CSV, and ``benchmark.report`` adds it to a report when ``RESULTS_DIR/probe/probe.csv`` exists.

Rules, stated once:
- A run's score at k is its test AUC (accuracy) averaged over the datasets it was probed on;
  the architectures are compared at matched L0 by their target L0 (the achieved L0 of each
  cell is printed beside it).
- Over seeds: the mean and the 95% Student-t half-width (``stats.ci95_half_width``); one seed
  gives no interval.
- The comparison (claim-style, as ``claims``): JumpReLU (or the first architecture present)
  against each other one, seed s paired with seed s; d = A - B per seed, its mean and 95%
  interval; ``A higher`` / ``B higher`` when the interval excludes 0, ``no difference
  resolved`` when it includes it, ``inconclusive`` below two paired seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from benchmark.report.claims import name
from benchmark.report.figures import OTHER_STYLES, STYLE
from benchmark.report.load import ORDER, checked_columns
from benchmark.report.stats import ci95_half_width
from benchmark.report.write import save

COLUMNS = ("run_id", "sae", "target_l0", "l0", "seed", "dataset", "k", "auc", "accuracy")
GROUP = ("model", "hook")  # probes at different hooks are never compared
DENSE = "dense"
CLAIM_KS = (1, 16)


def read_probe_csv(path: str | Path) -> pd.DataFrame:
    """The probe rows of ``path``; ValueError naming the file if a column is missing."""
    return checked_columns(pd.read_csv(path), path, COLUMNS, GROUP, "benchmark.probe")


def per_run(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, k): test AUC and accuracy averaged over the run's datasets."""
    keys = [*GROUP, "run_id", "sae", "target_l0", "seed", "k"]
    grouped = frame.groupby(keys, dropna=False, sort=True)
    out = grouped[["auc", "accuracy", "l0"]].mean().reset_index()
    out["n_datasets"] = grouped.size().to_numpy()
    return out


def _order(sae: str) -> tuple[int, str]:
    known = ORDER["sae"]
    return (known.index(sae) if sae in known else len(known), sae)


def _cell(mean: float, half: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:.{digits}f}"


def auc_table(runs: pd.DataFrame, ks: Sequence[int]) -> str:
    """Markdown: mean test AUC over datasets per architecture and target L0 (± 95% over seeds)
    for every k, the dense probe last."""
    head = ["sae", "target L0", "L0", "seeds", *(f"k={k}" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|" + "---:|" * len(ks)]
    saes = sorted((s for s in runs["sae"].unique() if s != DENSE), key=_order)
    for sae in saes:
        for target, cell in runs[runs["sae"] == sae].groupby("target_l0", dropna=False):
            by_k = {k: cell[cell["k"] == k]["auc"] for k in ks}
            row = [name(sae), f"{target:g}", f"{cell['l0'].mean():.1f}",
                   str(cell["seed"].nunique()),
                   *(_cell(v.mean(), ci95_half_width(v)) for v in by_k.values())]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    dense = runs[runs["sae"] == DENSE]
    if not dense.empty:
        d_in = int(dense["k"].iloc[0])
        text = _cell(dense["auc"].mean(), math.nan)
        lines.append(f"| dense (all {d_in} dims) | | | | " + " | ".join([text] * len(ks)) + " |")
    return "\n".join(lines)


def comparison(runs: pd.DataFrame, ks: Sequence[int] = CLAIM_KS) -> pd.DataFrame:
    """The paired comparison of the reference architecture with each other one (module rule)."""
    saes = sorted((s for s in runs["sae"].unique() if s != DENSE), key=_order)
    if len(saes) < 2:
        return pd.DataFrame()
    ref, rows = saes[0], []
    for other in saes[1:]:
        for target in sorted(runs["target_l0"].dropna().unique()):
            for k in ks:
                cell = runs[(runs["target_l0"] == target) & (runs["k"] == k)]
                a = cell[cell["sae"] == ref].set_index("seed")["auc"]
                b = cell[cell["sae"] == other].set_index("seed")["auc"]
                d = (a - b).dropna()  # seeds where both were probed
                mean, half = (float(d.mean()) if len(d) else math.nan), ci95_half_width(d)
                if len(d) < 2:
                    verdict = "inconclusive (one seed)" if len(d) else "no paired seed"
                elif mean - half > 0:
                    verdict = f"{name(ref)} higher"
                elif mean + half < 0:
                    verdict = f"{name(other)} higher"
                else:
                    verdict = "no difference resolved"
                rows.append({"a": name(ref), "b": name(other), "target_l0": target, "k": k,
                             "auc_a": a.mean(), "auc_b": b.mean(), "diff": mean, "ci95": half,
                             "seeds": len(d), "verdict": verdict})  # fmt: skip
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    lines = ["| A | B | target L0 | k | AUC A | AUC B | A - B (95%) | seeds | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in table.itertuples(index=False):
        lines.append(f"| {r.a} | {r.b} | {r.target_l0:g} | {r.k} | {r.auc_a:.3f} | "
                     f"{r.auc_b:.3f} | {_cell(r.diff, r.ci95)} | {r.seeds} | {r.verdict} |")  # fmt: skip
    return "\n".join(lines)


def probe_markdown(frame: pd.DataFrame) -> str:
    """The whole summary: per (model, hook) the AUC table and the paired comparison."""
    ks = sorted(int(k) for k in frame.loc[frame["sae"] != DENSE, "k"].unique())
    datasets = sorted(frame["dataset"].unique())
    parts = ["# Sparse probing (SAE-Probes datasets)", "",
             "Test AUC of logistic-regression probes on the top-k SAE latents (chosen on the "
             "training split), averaged over the datasets, mean ± 95% t-interval over seeds; the "
             "dense row probes every dimension of the activation at the hook. Protocol, source "
             "and deviations: docs/probing.md.", "",
             f"Datasets ({len(datasets)}): {', '.join(datasets)}."]  # fmt: skip
    runs = per_run(frame)
    for (model, hook), group in runs.groupby(list(GROUP), dropna=False, sort=True):
        parts += ["", f"## {model} {hook}", "", "Mean test AUC:", "", auc_table(group, ks)]
        table = comparison(group)
        if not table.empty:
            parts += ["", "Paired over seeds (A - B in mean test AUC):", "",
                      comparison_markdown(table)]  # fmt: skip
    return "\n".join(parts) + "\n"


def plot_probe(frame: pd.DataFrame) -> Figure:
    """One panel per (model, hook) and target L0: mean test AUC over the datasets against k
    (log scale) per architecture, its colour and marker the report's (``figures.STYLE``), the
    mean over seeds with a 95% band when there are two or more; the dense probe as a dashed
    line. The y-range is the data's."""
    runs = per_run(frame)
    panels = [(key, target, cell) for key, group in runs.groupby(list(GROUP), sort=True)
              for target, cell in group[group["sae"] != DENSE].groupby("target_l0")]  # fmt: skip
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    others = iter(OTHER_STYLES * 10)
    styles = {sae: STYLE.get(sae) or next(others)
              for sae in sorted(runs["sae"].unique(), key=_order) if sae != DENSE}  # fmt: skip
    for ax, ((model, hook), target, cell) in zip(axes, panels):
        values = [cell["auc"]]
        for sae, rows in sorted(cell.groupby("sae"), key=lambda kv: _order(kv[0])):
            by_k = rows.groupby("k")["auc"]
            mean = by_k.mean()
            half = by_k.agg(ci95_half_width).fillna(0.0)
            colour, marker = styles[sae]
            ax.plot(mean.index, mean.values, marker=marker, color=colour, label=name(sae))
            ax.fill_between(mean.index, mean - half, mean + half, color=colour, alpha=0.15)
        dense = runs[(runs["sae"] == DENSE) & (runs["model"] == model) & (runs["hook"] == hook)]
        if not dense.empty:
            ax.axhline(dense["auc"].mean(), color="grey", linestyle="--", label="dense probe")
            values.append(dense["auc"])
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k (latents probed)", ylabel="mean test AUC",
               title=f"{hook}, target L0 {target:g}")  # fmt: skip
        lo, hi = float(pd.concat(values).min()), float(pd.concat(values).max())
        ax.set_ylim(lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


def write_probe(csv: Path, out: Path) -> list[Path]:
    """``out``/probe.md and ``fig_probe.{png,pdf}`` from ``csv``; the paths written."""
    frame = read_probe_csv(csv)
    path = out / "probe.md"
    path.write_text(probe_markdown(frame))
    return [path, *save(plot_probe(frame), out / "fig_probe")]
