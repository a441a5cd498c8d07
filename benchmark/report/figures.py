"""Figures of metrics against L0 and of firing frequencies, with the matplotlib object API.

Owns the figures' layout: one panel per (site, layer), sites in rows; one line per curve
(``curve_hash``). Every architecture has one colour and one marker in every panel and figure
(``STYLE``); when one architecture has several curves in a panel (two recipes, two widths), they
share its colour, differ in line style and are named by the config keys where they differ
(``line_labels``; the ``curve`` id only when the records do not say). Points are the sparsity
points of ``load``: the line and its markers are the mean over seeds, a shaded band its 95%
t-interval, faint dots the seeds themselves; two points are never merged because their L0 is
equal. The y-range is set by the seeds' values, not by the bands. An LM-set metric is drawn
against ``splice_l0`` (the L0 on the LM set's positions, ``stats.x_column``), the others
against ``l0``. No pyplot, no global backend state.
"""

from __future__ import annotations

import json
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
from benchmark.report.stats import CURVE_KEYS, summarize_seeds, x_column

CURVE_FIGURES = {
    "fig_delta_lm_loss_vs_l0": "delta_lm_loss",
    "fig_fvu_vs_l0": "fvu",
    "fig_high_freq_vs_l0": "frac_freq_over_10pct",
}
Panels = dict[tuple[str, float], Axes]


def plot_metric_vs_l0(df: pd.DataFrame, metric: str, ticks: Sequence[float]) -> Figure:
    """``metric`` against its L0 (log x): per curve, the seed mean (line and markers), its 95%
    interval (band) and each seed (faint dots)."""
    x = x_column(metric)
    data = df.assign(_x=df[x] if x in df else np.nan)
    points = summarize_seeds(data, [*CURVE_KEYS, "point"], ["_x", metric])
    fig, panels = panel_grid(df)
    labels, styles = line_labels(df), styles_of(df)
    for (site, layer), ax in panels.items():
        here = points[(points["site"] == site) & (points["layer"] == layer)]
        seeds = data[(data["site"] == site) & (data["layer"] == layer)]
        for curve_hash, line in sort_rows(here, ["sae", "d_sae", "curve", "_x"]).groupby(
            "curve_hash", sort=False
        ):
            label = labels[curve_hash]
            colour, marker, dash = styles[label]
            mean, half = line[metric].to_numpy(), line[f"{metric}_ci95"].fillna(0).to_numpy()
            ax.fill_between(line["_x"], mean - half, mean + half, color=colour, alpha=0.15,
                            linewidth=0)  # fmt: skip
            ax.plot(line["_x"], mean, marker=marker, markersize=5, linestyle=dash,
                    color=colour, label=label)  # fmt: skip
            own = seeds[seeds["curve_hash"] == curve_hash]
            ax.scatter(own["_x"], own[metric], s=9, color=colour, alpha=0.35, linewidths=0)
        log_l0_axis(ax, ticks, "L0 on the LM set" if x == "splice_l0" else "L0")
        data_ylim(ax, seeds[metric])
    for ax in first_column(panels):
        ax.set_ylabel(METRICS[metric].label)
    figure_legend(fig, panels)
    return fig


def data_ylim(ax: Axes, values: pd.Series) -> None:
    """The y-range of the measured values (5% margin), so that a wide interval band does not
    flatten the data."""
    finite = values[np.isfinite(values)]
    if finite.empty:
        return
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.05
    ax.set_ylim(lo - pad, hi + pad)


def plot_firing_histograms(df: pd.DataFrame, near_l0: float) -> tuple[Figure, list[str]]:
    """Histograms of log10 firing frequency, one per curve, from its run nearest an L0.

    Dead latents (frequency 0, so log10 = -inf) are counted in the legend instead.
    Returns the figure and a note for every run whose ``firing_frequency.npy`` is missing.
    """
    nearest = _runs_nearest_l0(df, near_l0)
    fig, panels = panel_grid(df)
    labels, styles, notes = line_labels(df), styles_of(df), []
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
            colour, _, dash = styles[label]
            ax.hist(np.log10(freq[freq > 0]), bins=bins, histtype="step", linewidth=1.5,
                    linestyle=dash, color=colour,
                    label=f"{label}: L0 {run['l0']:.0f}, {n_dead} dead")  # fmt: skip
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


def log_l0_axis(ax: Axes, ticks: Sequence[float], name: str = "L0") -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{name} (log scale)")


def figure_legend(fig: Figure, panels: Panels) -> None:
    """One legend above the panels: every line label once, in the order drawn, in as many
    columns as fit the figure's width."""
    legend: dict[str, Any] = {}
    for ax in panels.values():
        legend |= {label: handle for handle, label in zip(*ax.get_legend_handles_labels())}
    ncols = max(1, min(len(legend), int(fig.get_figwidth() // 2.2)))
    where: Any = "outside upper center"  # a valid loc for a constrained layout; not in the stubs
    fig.legend(list(legend.values()), list(legend), loc=where, ncols=ncols)


PANEL = ("model", "site", "layer")
# One colour and marker per architecture, the paper's three first (matplotlib's default cycle).
STYLE = {"jumprelu": ("C0", "o"), "gated": ("C1", "s"), "topk": ("C2", "^"),
         "batchtopk": ("C3", "D"), "relu": ("C4", "v"), "jumprelu_tanh": ("C5", "P"),
         "jumprelu_target_l0": ("C6", "X"), "matryoshka_batchtopk": ("C7", "<")}  # fmt: skip
OTHER_STYLES = (("C8", "h"), ("C9", "p"), ("k", "*"))
DASHES = ("-", "--", ":", "-.")
VARIANT_KEYS_SHOWN = 2  # at most this many differing config keys in a variant's name


def line_labels(df: pd.DataFrame) -> dict[str, str]:
    """{curve_hash: label}: the architecture, its width if widths differ, and, where one
    architecture has several curves in one panel, the config keys (at most two) whose values
    tell them apart there, e.g. ``jumprelu (train.lr=0.002)``; the ``curve`` id in brackets when
    the records' configs do not differ (or are not recorded). Keys that vary within a curve
    (seed, sparsity) never name a variant."""
    curves = df.drop_duplicates("curve_hash")
    wide = df["d_sae"].nunique() > 1
    labels = {}
    for curve in curves.to_dict("records"):
        base = f"{curve['sae']} ({curve['d_sae']:.0f})" if wide else str(curve["sae"])
        labels[curve["curve_hash"]] = base
    same = [*PANEL, "sae", "d_sae"]
    for _, group in curves.groupby(same, dropna=False):
        if len(group) < 2:
            continue
        names = _variant_names(df[df["curve_hash"].isin(group["curve_hash"])])
        for curve_hash, curve_id in zip(group["curve_hash"], group["curve"]):
            name = names.get(curve_hash)
            labels[curve_hash] += f" ({name})" if name else f" [{curve_id}]"
    return labels


def _variant_names(runs: pd.DataFrame) -> dict[str, str]:
    """{curve_hash: "key=value, ..."} over the config keys that differ between these curves
    and are constant within each; empty when no such key is recorded."""
    if "config_flat" not in runs:
        return {}
    configs = {
        h: [json.loads(c) for c in g["config_flat"].dropna()] for h, g in runs.groupby("curve_hash")
    }
    if any(not c for c in configs.values()):
        return {}
    keys = sorted(set().union(*(c.keys() for cs in configs.values() for c in cs)))
    constant = {h: {k for k in keys if len({json.dumps(c.get(k)) for c in cs}) == 1}
                for h, cs in configs.items()}  # fmt: skip
    shared = set.intersection(*constant.values())
    differ = [k for k in keys if k in shared
              and len({json.dumps(cs[0].get(k)) for cs in configs.values()}) > 1]  # fmt: skip
    if not differ:
        return {}
    shown = differ[:VARIANT_KEYS_SHOWN]
    more = f", +{len(differ) - len(shown)} keys" if len(differ) > len(shown) else ""
    return {h: ", ".join(f"{k}={cs[0].get(k)}" for k in shown) + more for h, cs in configs.items()}


def styles_of(df: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """{line label: (colour, marker, line style)}: the architecture's colour and marker
    (``STYLE``) in every figure; the variants of one architecture differ in line style."""
    curves = sort_rows(df.drop_duplicates("curve_hash"), ["sae", "d_sae", "curve"])
    labels = line_labels(df)
    others = iter(OTHER_STYLES * 10)
    by_sae: dict[str, tuple[str, str]] = {}
    dashes: dict[str, dict[str, str]] = {}
    out = {}
    for curve in curves.to_dict("records"):
        sae, label = str(curve["sae"]), labels[curve["curve_hash"]]
        if sae not in by_sae:
            by_sae[sae] = STYLE.get(sae) or next(others)
        variants = dashes.setdefault(sae, {})
        variants.setdefault(label, DASHES[len(variants) % len(DASHES)])
        out[label] = (*by_sae[sae], variants[label])
    return out


def colours_of(df: pd.DataFrame) -> dict[str, str]:
    """One colour per line label, the architecture's, fixed across every figure of the report."""
    return {label: style[0] for label, style in styles_of(df).items()}
