"""Report: every run folder under a results folder -> one tidy DataFrame -> tables and figures.

Owns the result files as read back from disk (``result.json`` and ``firing_frequency.npy`` in
each run folder), the matched-L0 interpolation, the aggregation over seeds, and the report's
files: CSV / markdown / LaTeX tables and PNG / PDF figures. It must not know torch, Hydra, the
models, the trainer or any other ``benchmark`` module: a results folder copied from a cluster is
reported on with pandas, numpy and matplotlib alone.

    python -m benchmark.report RESULTS_DIR [--out DIR] [--latex] [--targets 10,20,40,80,160]

Decisions, stated once:
- A run is a folder holding ``result.json``, found anywhere below RESULTS_DIR. A folder with a
  ``.hydra/`` subfolder and no ``result.json`` in or below it is a missing or partial run (the
  job crashed or is still running). Failed, partial, malformed and incomplete runs are listed
  (stdout and ``problems.csv``), never fatal. A repeated ``run_id`` is listed and dropped.
- ``run_dir`` is the folder where ``result.json`` was found, not the path recorded in it, so a
  results folder moved between machines still finds its ``firing_frequency.npy``.
- Matched L0. A curve is the runs of one (model, site, layer, sae, d_sae, seed); each metric is
  interpolated linearly in log L0 between the two measured points either side of the target.
  No extrapolation: a target outside the measured L0 range is NaN, except that a target within
  ``l0_tolerance`` (10%) of the curve's nearest end point takes that point's value (no slope).
  So a one-point curve counts only within 10% of its L0, and a ``target_l0`` run that landed at
  L0 157 still serves the target 160. ``l0_tolerance=0`` is the strict rule.
- Seeds. Each seed's curve is interpolated on its own; the table reports the mean over seeds and
  the half-width of the 95% Student-t interval (``<metric>_ci95``; NaN with one seed).
  ``n_seeds`` counts the seeds whose curve covers the target. Figures plot, per sparsity
  setting, the mean over seeds with the same interval as error bars.
- Best. At each (model, site, layer, d_sae, target L0) the architecture with the best mean
  ``delta_lm_loss`` (direction from ``METRICS``) is marked ``best``, and bold in markdown and
  LaTeX, when at least two architectures have a value there.
- Markdown and LaTeX are written here (no ``tabulate``, no jinja2) so a cell can read
  ``mean ± ci`` with a fixed format per metric.
- Several models in one folder: one figure per model, the model's name appended to the file name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
from matplotlib.ticker import NullFormatter, ScalarFormatter
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class Metric:
    """How a metric is read: its axis label, its direction and its table format."""

    label: str
    higher_is_better: bool
    fmt: str = "{:.4f}"


METRICS: dict[str, Metric] = {
    "delta_lm_loss": Metric("delta LM loss (nats)", higher_is_better=False),
    "fvu": Metric("fraction of variance unexplained", higher_is_better=False),
    "ce_loss_recovered": Metric("CE loss recovered", higher_is_better=True),
    "kl_div": Metric("KL(clean || spliced)", higher_is_better=False),
    "frac_dead": Metric("fraction of dead latents", higher_is_better=False),
    "frac_freq_over_10pct": Metric(
        "fraction of latents firing on >10% of tokens", higher_is_better=False, fmt="{:.2e}"
    ),
    "frac_freq_over_1pct": Metric(
        "fraction of latents firing on >1% of tokens", higher_is_better=False, fmt="{:.2e}"
    ),
}
BEST_METRIC = "delta_lm_loss"
TABLE_METRICS = ("delta_lm_loss", "fvu", "ce_loss_recovered", "frac_dead", "frac_freq_over_10pct")
DEFAULT_TARGETS = (10, 20, 40, 80, 160)
CURVE_KEYS = ("model", "site", "layer", "sae", "d_sae")  # one line in a figure
REQUIRED_KEYS = ("model", "site", "layer", "sae", "sparsity", "seed", "l0")
SCHEMA_COLUMNS = (
    *("run_id", "status", "error", "time", "git_commit", "git_dirty", "device"),
    *("metrics_version", "run_dir", "experiment", "model", "layer", "layer_name", "site", "sae"),
    *("sparsity", "sparsity_mode", "target_l0", "coefficient", "seed", "d_in", "d_sae"),
    *("l0", "fvu", "clean_ce_loss", "spliced_ce_loss", "zero_ce_loss", "delta_lm_loss"),
    *("ce_loss_recovered", "kl_div", "frac_dead", "frac_freq_over_10pct", "frac_freq_over_1pct"),
    *("n_eval_tokens", "train_tokens", "train_seconds", "train_tokens_per_s", "peak_memory_mb"),
)
NUMERIC_COLUMNS = SCHEMA_COLUMNS[SCHEMA_COLUMNS.index("target_l0") :] + ("layer",)
RUN_COLUMNS = (
    *("model", "site", "layer", "layer_name", "sae", "d_sae", "sparsity", "sparsity_mode"),
    *("target_l0", "coefficient", "seed", "l0"),
    *("delta_lm_loss", "fvu", "ce_loss_recovered", "kl_div", "frac_dead", "frac_freq_over_10pct"),
    *("frac_freq_over_1pct", "train_tokens", "train_seconds", "train_tokens_per_s", "run_id"),
)
FORMATS = {"l0": "{:.1f}", "coefficient": "{:.3g}", "train_seconds": "{:.0f}"}
ORDER = {  # paper order first, anything else after it alphabetically
    "site": ("residual", "mlp", "attention"),
    "sae": ("jumprelu", "gated", "topk", "batchtopk", "relu"),
}
PROBLEM_COLUMNS = ("run_dir", "status", "reason")


# ---------------------------------------------------------------------------- loading


def load_results(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, problems): one row per complete run, and one row per run that cannot be used."""
    root = Path(root)
    rows, problems = [], []
    for path in sorted(root.rglob("result.json")):
        row, status, reason = _read_result(path)
        if row is None:
            problems.append({"run_dir": str(path.parent), "status": status, "reason": reason})
        else:
            rows.append(row)
    for hydra in sorted(root.rglob(".hydra")):
        if hydra.is_dir() and next(hydra.parent.rglob("result.json"), None) is None:
            reason = "no result.json (job crashed or still running)"
            problems.append({"run_dir": str(hydra.parent), "status": "missing", "reason": reason})
    runs = _tidy(rows)
    repeated = runs["run_id"].notna() & runs.duplicated("run_id")
    for run_dir, run_id in runs.loc[repeated, ["run_dir", "run_id"]].itertuples(index=False):
        problems.append({"run_dir": run_dir, "status": "duplicate", "reason": f"run_id {run_id}"})
    runs = runs[~repeated].reset_index(drop=True)
    return runs, pd.DataFrame(problems, columns=list(PROBLEM_COLUMNS))


def _read_result(path: Path) -> tuple[dict | None, str, str]:
    """(flat scalar fields, status, reason); the fields are None when the run cannot be used."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, "malformed", f"unreadable result.json: {err}"
    if not isinstance(record, dict):
        return None, "malformed", "result.json is not a JSON object"
    status = record.get("status")
    if status == "failed":
        return None, "failed", str(record.get("error") or "failed, no error message")
    if status != "complete":
        return None, str(status), f"unknown status {status!r}"
    missing = [key for key in REQUIRED_KEYS if record.get(key) is None]
    if missing:
        return None, "incomplete", "missing " + ", ".join(missing)
    row = {key: value for key, value in record.items() if not isinstance(value, (dict, list))}
    row["run_dir"] = str(path.parent)
    return row, "complete", ""


def _tidy(rows: list[dict]) -> pd.DataFrame:
    """The schema's columns first (NaN where a run lacks one), numbers as numbers."""
    frame = pd.DataFrame(rows)
    extra = [column for column in frame.columns if column not in SCHEMA_COLUMNS]
    frame = frame.reindex(columns=[*SCHEMA_COLUMNS, *extra])
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


# ---------------------------------------------------------------------------- statistics

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (scipy is not a dependency).
_T975 = (
    *(12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281),
    *(2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860),
    *(2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423),
)


def t_quantile_975(df: int) -> float:
    """t(0.975, df): a table for df <= 30, beyond it the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95_half_width(values: Iterable[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean of the finite values; NaN below two."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) < 2:
        return math.nan
    return t_quantile_975(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))


def summarize_seeds(
    frame: pd.DataFrame, keys: Sequence[str], columns: Sequence[str]
) -> pd.DataFrame:
    """One row per group of ``keys``: the mean of each column and its ``<column>_ci95``."""
    grouped = frame.groupby(list(keys), dropna=False, sort=True)
    out = grouped.size().rename("n_runs").reset_index()
    for column in columns:
        out[column] = grouped[column].mean().to_numpy()
        out[f"{column}_ci95"] = grouped[column].agg(ci95_half_width).to_numpy()
    return out


# ---------------------------------------------------------------------------- matched L0


def covers(l0: ArrayLike, targets: ArrayLike, tolerance: float = 0.1) -> np.ndarray:
    """Which targets a curve measured at ``l0`` covers: its range, widened by ``tolerance``."""
    points = np.asarray(l0, dtype=float)
    wanted = np.asarray(targets, dtype=float)
    points = points[np.isfinite(points) & (points > 0)]
    if len(points) == 0:
        return np.zeros(wanted.shape, dtype=bool)
    # |end - target| <= tolerance * target, solved for the target at each end of the range
    return (wanted >= points.min() / (1 + tolerance)) & (wanted <= points.max() / (1 - tolerance))


def interpolate_log_l0(
    l0: ArrayLike, values: ArrayLike, targets: ArrayLike, tolerance: float = 0.1
) -> np.ndarray:
    """Each value at each target L0: linear in log L0 between the measured neighbours.

    Runs at the same L0 are averaged. Targets the curve does not cover (see ``covers``) are NaN;
    a covered target beyond an end point takes that end point's value.
    """
    l0 = np.asarray(l0, dtype=float)
    targets = np.asarray(targets, dtype=float)
    valid = np.isfinite(l0) & (l0 > 0)
    out = np.full(targets.shape, np.nan)
    if not valid.any():
        return out
    points = pd.Series(np.asarray(values, dtype=float)[valid]).groupby(l0[valid]).mean()
    inside = covers(l0, targets, tolerance)
    log_l0 = np.log(points.index.to_numpy())
    out[inside] = np.interp(np.log(targets[inside]), log_l0, points.to_numpy())
    return out


def default_targets(df: pd.DataFrame) -> list[float]:
    """The target L0 values the runs were trained for, else the paper-like 10..160 ladder."""
    present = sorted(df["target_l0"].dropna().unique()) if "target_l0" in df else []
    return [float(t) for t in present] or [float(t) for t in DEFAULT_TARGETS]


def matched_l0_table(
    df: pd.DataFrame,
    targets: Sequence[float] | None = None,
    metrics: Sequence[str] = TABLE_METRICS,
    l0_tolerance: float = 0.1,
) -> pd.DataFrame:
    """Table 1: each architecture's metrics at common L0 values, mean and 95% CI over seeds."""
    targets = sorted(float(t) for t in (default_targets(df) if targets is None else targets))
    rows = []
    for key, curve in df.groupby([*CURVE_KEYS, "seed"], dropna=False, sort=True):
        covered = covers(curve["l0"], targets, l0_tolerance)
        at_targets = {
            metric: interpolate_log_l0(curve["l0"], curve[metric], targets, l0_tolerance)
            for metric in metrics
        }
        for i, target in enumerate(targets):
            row = dict(zip([*CURVE_KEYS, "seed"], key), target_l0=target, covered=covered[i])
            rows.append(row | {metric: values[i] for metric, values in at_targets.items()})
    per_seed = pd.DataFrame(rows, columns=[*CURVE_KEYS, "seed", "target_l0", "covered", *metrics])
    table = summarize_seeds(per_seed, [*CURVE_KEYS, "target_l0"], metrics).drop(columns="n_runs")
    n_seeds = per_seed.groupby([*CURVE_KEYS, "target_l0"], dropna=False, sort=True)["covered"]
    table.insert(len(CURVE_KEYS) + 1, "n_seeds", n_seeds.sum().to_numpy().astype(int))
    if BEST_METRIC in metrics:
        table["best"] = mark_best(table, BEST_METRIC)
    return _sorted(table, ["model", "site", "layer", "d_sae", "target_l0", "sae"])


def mark_best(table: pd.DataFrame, metric: str) -> pd.Series:
    """True for the best architecture at each comparison point, if two or more have a value."""
    point = [key for key in CURVE_KEYS if key != "sae"] + ["target_l0"]
    score = table[metric] if METRICS[metric].higher_is_better else -table[metric]
    by_point = score.groupby([table[key] for key in point], dropna=False)
    return (score == by_point.transform("max")) & (by_point.transform("count") >= 2)


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2: one row per run, its choices and main metrics."""
    columns = [column for column in RUN_COLUMNS if column in df]
    return _sorted(df, ["model", "site", "layer", "sae", "d_sae", "l0", "seed"])[columns]


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sorted by ``keys``, sites and architectures in the paper's order."""
    return frame.sort_values(keys, key=_order_key, kind="stable").reset_index(drop=True)


def _order_key(column: pd.Series) -> pd.Series:
    order = ORDER.get(str(column.name))
    if order is None:
        return column
    return column.map(lambda v: f"{order.index(v) if v in order else len(order)}{v}")


# ---------------------------------------------------------------------------- table text


@dataclass(frozen=True)
class Markup:
    """What differs between markdown and LaTeX cells."""

    bold: Callable[[str], str]
    plus_minus: str
    missing: str
    escape: Callable[[str], str] = str


MARKDOWN = Markup(bold=lambda s: f"**{s}**", plus_minus=" ± ", missing="–")
LATEX = Markup(
    bold=lambda s: rf"\textbf{{{s}}}",
    plus_minus=r" $\pm$ ",
    missing="--",
    escape=lambda s: "".join("\\" + c if c in "_%&#$" else c for c in s),
)


def table_cells(table: pd.DataFrame, markup: Markup) -> pd.DataFrame:
    """Text cells: fixed formats, ``mean ± ci`` in one cell, the best architecture in bold."""
    cells = {}
    for column in table.columns:
        if column == "best" or column.endswith("_ci95"):
            continue
        text = [_format(column, value, markup) for value in table[column]]
        if f"{column}_ci95" in table:
            half_widths = table[f"{column}_ci95"]
            text = [
                t + markup.plus_minus + _format(column, ci, markup) if np.isfinite(ci) else t
                for t, ci in zip(text, half_widths)
            ]
        if column == BEST_METRIC and "best" in table:
            text = [markup.bold(t) if best else t for t, best in zip(text, table["best"])]
        cells[markup.escape(column)] = text
    return pd.DataFrame(cells)


def _format(column: str, value: object, markup: Markup) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return markup.missing
    if not isinstance(value, (float, np.floating)):
        return markup.escape(str(value))
    fmt = METRICS[column].fmt if column in METRICS else FORMATS.get(column)
    if fmt is None:
        fmt = "{:.0f}" if float(value).is_integer() else "{:.4g}"
    return fmt.format(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table, numbers right-aligned."""
    cells = table_cells(table, MARKDOWN)
    align = ["---:" if pd.api.types.is_numeric_dtype(table[c]) else "---" for c in cells]
    lines = ["| " + " | ".join(cells.columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs ``tabular``, numbers right-aligned."""
    cells = table_cells(table, LATEX)
    shown = [c for c in table.columns if c != "best" and not c.endswith("_ci95")]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in shown)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(cells.columns) + r" \\"]
    lines += [r"\midrule", *(" & ".join(row) + r" \\" for row in cells.itertuples(index=False))]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


# ---------------------------------------------------------------------------- figures

CURVE_FIGURES = {
    "fig_delta_lm_loss_vs_l0": "delta_lm_loss",
    "fig_fvu_vs_l0": "fvu",
    "fig_high_freq_vs_l0": "frac_freq_over_10pct",
}


def plot_metric_vs_l0(df: pd.DataFrame, metric: str, ticks: Sequence[float]) -> Figure:
    """``metric`` against L0 (log x): sites in rows, layers in columns, one line per architecture."""
    points = summarize_seeds(df, [*CURVE_KEYS, "sparsity"], ["l0", metric])
    fig, panels = _panel_grid(df)
    colours = _colours(df)
    for (site, layer), ax in panels.items():
        here = points[(points["site"] == site) & (points["layer"] == layer)]
        for (sae, d_sae), line in _sorted(here, ["sae", "d_sae", "l0"]).groupby(
            ["sae", "d_sae"], dropna=False, sort=False
        ):
            label = _line_label(df, sae, d_sae)
            yerr = line[f"{metric}_ci95"].fillna(0).to_numpy()
            ax.errorbar(line["l0"], line[metric], yerr=yerr, marker="o", markersize=4,
                        capsize=3, label=label, color=colours[label])  # fmt: skip
        _log_l0_axis(ax, ticks)
    for ax in _first_column(panels):
        ax.set_ylabel(METRICS[metric].label)
    legend: dict[str, Any] = {}  # label -> handle, over every panel, in the order of the lines
    for ax in panels.values():
        legend |= {label: handle for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside upper center",  # type: ignore[call-overload]
        ncols=len(legend) or 1,
    )
    return fig


def plot_firing_histograms(df: pd.DataFrame, near_l0: float) -> tuple[Figure, list[str]]:
    """Histograms of log10 firing frequency, one per architecture, from the run nearest an L0.

    Dead latents (frequency 0, so log10 = -inf) are counted in the legend instead.
    Returns the figure and a note for every run whose ``firing_frequency.npy`` is missing.
    """
    nearest = _runs_nearest_l0(df, near_l0)
    fig, panels = _panel_grid(df)
    colours, notes = _colours(df), []
    for (site, layer), ax in panels.items():
        here = nearest[(nearest["site"] == site) & (nearest["layer"] == layer)]
        loaded = []  # (run, frequency of each latent)
        for run in here.itertuples(index=False):
            path = Path(run.run_dir) / "firing_frequency.npy"
            if path.exists():
                loaded.append((run, np.load(path).astype(float).ravel()))
            else:
                notes.append(f"no firing_frequency.npy in {run.run_dir}")
        alive = [freq[freq > 0] for _, freq in loaded if (freq > 0).any()]
        low = math.floor(min(np.log10(freq).min() for freq in alive)) if alive else -6
        bins = list(np.linspace(min(low, -2), 0, 41))
        for run, freq in loaded:
            label = _line_label(df, run.sae, run.d_sae)
            n_dead = int((freq == 0).sum())
            ax.hist(np.log10(freq[freq > 0]), bins=bins, histtype="step", linewidth=1.5,
                    color=colours[label], label=f"{label}: L0 {run.l0:.0f}, {n_dead} dead")  # fmt: skip
        ax.axvline(-1, color="grey", linestyle="--", linewidth=1)  # the 10% line of Fig. 5
        ax.set_xlabel("log10 firing frequency")
        if loaded:
            ax.legend(fontsize="small")
    for ax in _first_column(panels):
        ax.set_ylabel("latents")
    fig.suptitle(f"Firing frequencies\n(run nearest L0 {near_l0:g} per architecture)")
    return fig, notes


def _runs_nearest_l0(df: pd.DataFrame, near_l0: float) -> pd.DataFrame:
    """Per (model, site, layer, sae, d_sae): the run closest to ``near_l0`` in log L0."""
    distance = (np.log(df["l0"].clip(lower=1e-9)) - math.log(near_l0)).abs()
    ranked = df.assign(_distance=distance).sort_values(["_distance", "seed"], kind="stable")
    nearest = ranked.drop_duplicates(list(CURVE_KEYS)).drop(columns="_distance")
    return _sorted(nearest, list(CURVE_KEYS))


def _panel_grid(df: pd.DataFrame) -> tuple[Figure, dict[tuple[str, int], Axes]]:
    """A figure with one panel per (site, layer), sites in rows, titled with site and layer."""
    sites = _sorted(df[["site"]].drop_duplicates(), ["site"])["site"].tolist()
    layers = sorted(df["layer"].unique())
    names = df.groupby("layer")["layer_name"].first()
    fig = Figure(figsize=(4.2 * len(layers), 3.2 * len(sites) + 0.6), layout="constrained")
    axes = fig.subplots(len(sites), len(layers), squeeze=False)
    panels = {}
    for row, site in enumerate(sites):
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            name = names.get(layer)
            suffix = f" ({name})" if isinstance(name, str) and name != str(int(layer)) else ""
            ax.set_title(f"{site}, layer {int(layer)}{suffix}")
            ax.grid(alpha=0.3)
            panels[(site, layer)] = ax
    return fig, panels


def _first_column(panels: dict[tuple[str, int], Axes]) -> list[Axes]:
    first_layer = min(layer for _, layer in panels)
    return [ax for (_, layer), ax in panels.items() if layer == first_layer]


def _log_l0_axis(ax: Axes, ticks: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (log scale)")


def _line_label(df: pd.DataFrame, sae: str, d_sae: float) -> str:
    """The architecture's name, with its width when the runs have several widths."""
    return sae if df["d_sae"].nunique() <= 1 else f"{sae} ({d_sae:.0f})"


def _colours(df: pd.DataFrame) -> dict[str, str]:
    """One colour per line label, fixed across every figure of the report."""
    lines = _sorted(df[["sae", "d_sae"]].drop_duplicates(), ["sae", "d_sae"])
    labels = [_line_label(df, sae, d_sae) for sae, d_sae in lines.itertuples(index=False)]
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


# ---------------------------------------------------------------------------- writing


def write_report(
    df: pd.DataFrame,
    problems: pd.DataFrame,
    out: Path,
    targets: Sequence[float] | None = None,
    latex: bool = False,
    l0_tolerance: float = 0.1,
) -> tuple[pd.DataFrame, list[Path], list[str]]:
    """Write every table and figure under ``out``; (table 1, paths written, notes)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "problems.csv"]
    problems.to_csv(written[0], index=False)
    if df.empty:
        return pd.DataFrame(), written, ["no complete runs: no tables or figures"]
    targets = default_targets(df) if targets is None else sorted(targets)
    table = matched_l0_table(df, targets, l0_tolerance=l0_tolerance)
    written += _write_table(table, out / "table1_matched_l0", latex)
    written += _write_table(runs_table(df), out / "table2_runs", latex=False)
    notes = []
    for model, runs in df.groupby("model", sort=True):
        suffix = "" if df["model"].nunique() == 1 else f"_{model}"
        for name, metric in CURVE_FIGURES.items():
            written += _save(plot_metric_vs_l0(runs, metric, targets), out / f"{name}{suffix}")
        figure, missing = plot_firing_histograms(runs, float(np.median(targets)))
        written += _save(figure, out / f"fig_firing_histograms{suffix}")
        notes += missing
    return table, written, notes


def _write_table(table: pd.DataFrame, stem: Path, latex: bool) -> list[Path]:
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(table))
    if latex:
        paths.append(stem.with_suffix(".tex"))
        paths[-1].write_text(to_latex(table))
    return paths


def _save(fig: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.report", description=__doc__)
    parser.add_argument("results_dir", type=Path, help="folder searched recursively for runs")
    parser.add_argument("--out", type=Path, help="output folder (default RESULTS_DIR/report)")
    parser.add_argument("--latex", action="store_true", help="also write table1_matched_l0.tex")
    parser.add_argument("--targets", help="comma-separated L0 values for table 1, e.g. 10,20,40")
    parser.add_argument("--l0-tolerance", type=float, default=0.1,
                        help="relative L0 distance within which a curve's end point counts")  # fmt: skip
    args = parser.parse_args(argv)

    df, problems = load_results(args.results_dir)
    if df.empty and problems.empty:
        print(
            f"error: no result.json or Hydra run folder under {args.results_dir}", file=sys.stderr
        )
        return 1
    targets = [float(t) for t in args.targets.split(",")] if args.targets else None
    out = args.out or args.results_dir / "report"
    table, written, notes = write_report(df, problems, out, targets, args.latex, args.l0_tolerance)

    if not df.empty:
        print(f"# Matched-L0 table ({len(df)} complete runs)\n")
        print(to_markdown(table))
    print(f"# Problems ({len(problems)})")
    for run in problems.itertuples(index=False):
        print(f"- {run.status}: {run.run_dir}: {run.reason}")
    for note in notes:
        print(f"note: {note}")
    print("\n# Written")
    print("\n".join(f"- {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
