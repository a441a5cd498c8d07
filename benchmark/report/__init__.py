"""Report: every run folder under a results folder -> one tidy DataFrame -> tables and figures.

    python -m benchmark.report RESULTS_DIR [--out DIR] [--latex] [--targets 10,20,40]
                                           [--l0-tolerance X]

One module per job, each stating its rules in its docstring:
``load`` (result.json files -> runs + problems; identity by ``config_hash``, curves by
``curve_hash``), ``interpolate`` (log-L0 interpolation, no silent extrapolation), ``stats``
(seed means with 95% t-intervals, the matched-L0 table, best marking), ``tables`` (cell text;
pandas renders markdown and LaTeX), ``claims`` (the paper's claims judged: holds, refuted or
inconclusive), ``figures`` and ``training`` (matplotlib object API), ``write`` (the files),
``__main__`` (the command line).

Must not import torch, Hydra or any runner module: a results folder copied from a cluster is
reported on with pandas, numpy, matplotlib and ``benchmark.metrics`` (pure Python) alone.
"""

from benchmark.report.claims import judge_claims
from benchmark.report.figures import plot_firing_histograms, plot_metric_vs_l0
from benchmark.report.interpolate import bracket_log_l0, interpolate_log_l0
from benchmark.report.load import load_results
from benchmark.report.stats import (
    ci95_half_width,
    default_targets,
    mark_best,
    matched_l0_table,
    summarize_seeds,
    t_quantile_975,
)
from benchmark.report.tables import caption, runs_table, table_cells, to_latex, to_markdown
from benchmark.report.training import plot_training_history
from benchmark.report.write import write_report

__all__ = [
    "bracket_log_l0",
    "caption",
    "ci95_half_width",
    "default_targets",
    "interpolate_log_l0",
    "judge_claims",
    "load_results",
    "mark_best",
    "matched_l0_table",
    "plot_firing_histograms",
    "plot_metric_vs_l0",
    "plot_training_history",
    "runs_table",
    "summarize_seeds",
    "t_quantile_975",
    "table_cells",
    "to_latex",
    "to_markdown",
    "write_report",
]
