"""The training-history figure: lambda and batch L0 against training tokens, one line per run.

Owns reading each run's ``history.csv`` (named by the result's ``history_file``, beside
``result.json``; columns include ``tokens``, ``coefficient`` and ``l0``). A run without one is
skipped silently, and so is the figure when no run has one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from benchmark.report.figures import colours_of, figure_legend, line_labels, panel_stacks


def history_path(run: dict) -> Path | None:
    """The run's history file, or None when there is none."""
    name = run.get("history_file")
    name = name if isinstance(name, str) and name else "history.csv"  # older records: the default
    path = Path(run["run_dir"]) / name
    return path if path.is_file() else None


def read_histories(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{run_dir: history} for every run with a readable history holding the needed columns."""
    histories = {}
    for run in df.to_dict("records"):
        path = history_path(run)
        try:
            history = pd.read_csv(path) if path else None
        except (OSError, ValueError):
            continue
        if history is not None and {"tokens", "coefficient", "l0"} <= set(history.columns):
            histories[run["run_dir"]] = history
    return histories


def plot_training_history(df: pd.DataFrame) -> Figure | None:
    """Per (site, layer): lambda (log y) above batch L0, both against training tokens."""
    histories = read_histories(df)
    if not histories:
        return None
    runs = df[df["run_dir"].isin(list(histories))]
    fig, stacks = panel_stacks(runs, rows=2)
    labels, colours = line_labels(runs), colours_of(runs)
    for run in runs.to_dict("records"):
        history = histories[run["run_dir"]]
        top, bottom = stacks[(run["site"], run["layer"])]
        label = labels[run["curve_hash"]]
        for ax, column in ((top, "coefficient"), (bottom, "l0")):
            ax.plot(history["tokens"], history[column], color=colours[label], label=label,
                    linewidth=1, alpha=0.8)  # fmt: skip
    for top, bottom in stacks.values():
        top.set_yscale("log")
        top.set_ylabel("lambda (sparsity coefficient)")
        bottom.set_ylabel("batch L0")
        bottom.set_xlabel("training tokens")
    figure_legend(fig, {key: stack[0] for key, stack in stacks.items()})
    return fig
