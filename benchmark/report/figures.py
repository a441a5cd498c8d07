"""Figures of metrics against L0 and of firing frequencies, with the matplotlib object API.

Owns the figures' layout: one panel per (site, layer), sites in rows; one line per curve
(``curve_hash``), labelled by its architecture, its width when the runs have several, and its
``curve`` id when one architecture has several curves (e.g. two recipes); one colour per line
across every figure. Points are the sparsity points of ``load`` (mean over seeds, 95% t-interval
as error bars): two points are never merged because their L0 is equal. No pyplot, no global
backend state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from benchmark.metrics import METRICS
from benchmark.report.load import sort_rows
from benchmark.report.stats import CURVE_KEYS, summarize_seeds

CURVE_FIGURES = {
    "fig_delta_lm_loss_vs_l0": "delta_lm_loss",
    "fig_fvu_vs_l0": "fvu",
    "fig_high_freq_vs_l0": "frac_freq_over_10pct",
}
Panels = dict[tuple[str, float], Axes]


def plot_metric_vs_l0(df: pd.DataFrame, metric: str, ticks: Sequence[float]) -> Figure:
    """``metric`` against L0 (log x): one line per curve, one point per sparsity point."""
    points = summarize_seeds(df, [*CURVE_KEYS, "point"], ["l0", metric])
    fig, panels = panel_grid(df)
    labels, colours = line_labels(df), colours_of(df)
    for (site, layer), ax in panels.items():
        here = points[(points["site"] == site) & (points["layer"] == layer)]
        for curve_hash, line in sort_rows(here, ["sae", "d_sae", "curve", "l0"]).groupby(
            "curve_hash", sort=False
        ):
            label = labels[curve_hash]
            yerr = line[f"{metric}_ci95"].fillna(0).to_numpy()
            ax.errorbar(line["l0"], line[metric], yerr=yerr, marker="o", markersize=4,
                        capsize=3, label=label, color=colours[label])  # fmt: skip
        log_l0_axis(ax, ticks)
    for ax in first_column(panels):
        ax.set_ylabel(METRICS[metric].label)
    figure_legend(fig, panels)
    return fig


def plot_firing_histograms(df: pd.DataFrame, near_l0: float) -> tuple[Figure, list[str]]:
    """Histograms of log10 firing frequency, one per curve, from its run nearest an L0.

    Dead latents (frequency 0, so log10 = -inf) are counted in the legend instead.
    Returns the figure and a note for every run whose ``firing_frequency.npy`` is missing.
    """
    nearest = _runs_nearest_l0(df, near_l0)
    fig, panels = panel_grid(df)
    labels, colours, notes = line_labels(df), colours_of(df), []
    for (site, layer), ax in panels.items():
        here = nearest[(nearest["site"] == site) & (nearest["layer"] == layer)]
        loaded = []  # (run, frequency of each latent)
        for run in here.to_dict("records"):
            path = Path(run["run_dir"]) / "firing_frequency.npy"
            if path.exists():
                loaded.append((run, np.load(path).astype(float).ravel()))
            else:
                notes.append(f"no firing_frequency.npy in {run['run_dir']}")
        alive = [freq[freq > 0] for _, freq in loaded if (freq > 0).any()]
        low = math.floor(min(np.log10(freq).min() for freq in alive)) if alive else -6
        bins = list(np.linspace(min(low, -2), 0, 41))
        for run, freq in loaded:
            label, n_dead = labels[run["curve_hash"]], int((freq == 0).sum())
            ax.hist(np.log10(freq[freq > 0]), bins=bins, histtype="step", linewidth=1.5,
                    color=colours[label], label=f"{label}: L0 {run['l0']:.0f}, {n_dead} dead")  # fmt: skip
        ax.axvline(-1, color="grey", linestyle="--", linewidth=1)  # the 10% line of Fig. 5
        ax.set_xlabel("log10 firing frequency")
        if loaded:
            ax.legend(fontsize="small")
    for ax in first_column(panels):
        ax.set_ylabel("latents")
    fig.suptitle(f"Firing frequencies\n(run nearest L0 {near_l0:g} per curve)")
    return fig, notes


def _runs_nearest_l0(df: pd.DataFrame, near_l0: float) -> pd.DataFrame:
    """Per curve: the run closest to ``near_l0`` in log L0 (lowest seed on a tie)."""
    distance = (np.log(df["l0"].clip(lower=1e-9)) - math.log(near_l0)).abs()
    ranked = df.assign(_distance=distance).sort_values(["_distance", "seed"], kind="stable")
    nearest = ranked.drop_duplicates("curve_hash").drop(columns="_distance")
    return sort_rows(nearest, ["sae", "d_sae", "curve"])


def panel_grid(df: pd.DataFrame) -> tuple[Figure, Panels]:
    """One panel per (site, layer): sites in rows, layers in columns."""
    fig, stacks = panel_stacks(df, 1)
    return fig, {key: stack[0] for key, stack in stacks.items()}


def panel_stacks(df: pd.DataFrame, rows: int) -> tuple[Figure, dict[tuple[str, float], list[Axes]]]:
    """A stack of ``rows`` panels per (site, layer), titled with the site and the layer."""
    sites = sort_rows(df[["site"]].drop_duplicates(), ["site"])["site"].tolist()
    layers = sorted(df["layer"].unique())
    names = df.groupby("layer")["layer_name"].first()
    size = (4.2 * len(layers), 3.2 * rows * len(sites) + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows * len(sites), len(layers), squeeze=False)
    stacks = {}
    for row, site in enumerate(sites):
        for col, layer in enumerate(layers):
            name = names.get(layer)
            suffix = f" ({name})" if isinstance(name, str) and name != str(int(layer)) else ""
            stacks[(site, layer)] = list(axes[rows * row : rows * (row + 1), col])
            for ax in stacks[(site, layer)]:
                ax.set_title(f"{site}, layer {int(layer)}{suffix}")
                ax.grid(alpha=0.3)
    return fig, stacks


def first_column(panels: Panels) -> list[Axes]:
    first_layer = min(layer for _, layer in panels)
    return [ax for (_, layer), ax in panels.items() if layer == first_layer]


def log_l0_axis(ax: Axes, ticks: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (log scale)")


def figure_legend(fig: Figure, panels: Panels) -> None:
    """One legend above the panels: every line label once, in the order drawn, in as many
    columns as fit the figure's width."""
    legend: dict[str, Any] = {}
    for ax in panels.values():
        legend |= {label: handle for handle, label in zip(*ax.get_legend_handles_labels())}
    ncols = max(1, min(len(legend), int(fig.get_figwidth() // 2.2)))
    where: Any = "outside upper center"  # a valid loc for a constrained layout; not in the stubs
    fig.legend(list(legend.values()), list(legend), loc=where, ncols=ncols)


def line_labels(df: pd.DataFrame) -> dict[str, str]:
    """{curve_hash: label}: the architecture, its width if widths differ, its curve id if the
    architecture and width have several curves here."""
    curves = df.drop_duplicates("curve_hash")
    several = curves.groupby(["sae", "d_sae"], dropna=False)["curve_hash"].transform("size") > 1
    labels = {}
    for curve, wide in zip(curves.to_dict("records"), several):
        label = (
            curve["sae"] if df["d_sae"].nunique() <= 1 else f"{curve['sae']} ({curve['d_sae']:.0f})"
        )
        labels[curve["curve_hash"]] = f"{label} [{curve['curve']}]" if wide else label
    return labels


def colours_of(df: pd.DataFrame) -> dict[str, str]:
    """One colour per line label, fixed across every figure of the report."""
    curves = sort_rows(df.drop_duplicates("curve_hash"), ["sae", "d_sae", "curve"])
    labels = line_labels(df)
    ordered = dict.fromkeys(labels[h] for h in curves["curve_hash"])
    return {label: f"C{i % 10}" for i, label in enumerate(ordered)}
