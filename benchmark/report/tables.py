"""Tables as text: pandas renders them (``DataFrame.to_markdown`` through tabulate, and
``DataFrame.style.to_latex``); this module only decides what each cell says.

Owns table 2's columns, the cell text (the metric's format from ``benchmark.metrics.METRICS``,
``mean ± ci`` in one cell, a trailing ``†`` on a cell filled from a curve's end point, nothing
at all for a missing value), the best value in bold, the caption naming the token set each
metric is measured on, and the footnote explaining ``†``. Computes no statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from benchmark.metrics import ACT, LM, METRICS
from benchmark.report.load import TOKEN_COLUMNS, sort_rows
from benchmark.report.stats import BEST_METRIC, x_column

RUN_COLUMNS = (
    *("model", "site", "layer", "layer_name", "sae", "d_sae", "curve", "sparsity_mode"),
    *("target_l0", "sparsity_coefficient", "coefficient", "seed", "l0", "splice_l0"),
    *(
        "delta_lm_loss",
        "delta_lm_loss_se",
        "fvu",
        "ce_loss_recovered",
        "kl_div",
        "frac_dead",
        "frac_freq_over_10pct",
    ),
    *("frac_freq_over_1pct", "train_frac_dead", *TOKEN_COLUMNS, "max_norm_multiple"),
    *("n_left_out", "n_train_left_out", "train_tokens", "train_seconds"),
    *("train_tokens_per_s", "experiment", "run_id", "config_hash"),
)
HIDDEN = (
    "curve_hash",
    "best",
    "from_endpoint",
    "lm_from_endpoint",
)  # shown through the cells, not as columns
FORMATS = {
    "l0_used": "{:.1f}",
    "lm_l0_used": "{:.1f}",
    "coefficient": "{:.3g}",
    "sparsity_coefficient": "{:.3g}",
}
TOKEN_SETS = {ACT: "activation set", LM: "LM set"}
BOLD_NOTE = (
    "the lowest delta LM loss at its (site, layer, width, budget, L0), shown only where it is "
    "resolved: ahead of the runner-up by more than {:.0%} of the runner-up's value (the stated "
    "run-to-run spread, `--resolution`) and by more than either 95% half-width."
)
DAGGER_NOTE = (
    "value from the curve's end point at L0 `l0_used` (`lm_l0_used` for the LM-set metrics, "
    "read along splice_l0) within the L0 tolerance, not interpolated; never marked best."
)


@dataclass(frozen=True)
class Marks:
    """What differs between markdown and LaTeX cells."""

    plus_minus: str
    dagger: str
    bold: str


MARKDOWN = Marks(plus_minus=" ± ", dagger="†", bold="**{}**")
LATEX = Marks(plus_minus=r" $\pm$ ", dagger=r"$^\dagger$", bold="{}")  # bold by Styler CSS


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2: one row per run, its choices, main metrics and token counts."""
    columns = [column for column in RUN_COLUMNS if column in df]
    keys = ["model", "site", "layer", "sae", "d_sae", "curve", "point", "seed"]
    return sort_rows(df, keys)[columns]


def table_cells(table: pd.DataFrame, marks: Marks) -> pd.DataFrame:
    """Every shown cell as text: fixed formats, ``mean ± ci``, ``†`` and bold where due."""
    no = pd.Series(False, index=table.index)
    endpoint = table.get("from_endpoint", no).to_numpy(bool)
    lm_endpoint = table.get("lm_from_endpoint", no).to_numpy(bool)
    best = table.get("best", pd.Series(False, index=table.index)).to_numpy(bool)
    cells = {}
    for column in table.columns:
        if column in HIDDEN or column.endswith("_ci95"):
            continue
        text = [_format(column, value) for value in table[column]]
        if f"{column}_ci95" in table:
            text = [_with_ci(t, column, ci, marks) for t, ci in zip(text, table[f"{column}_ci95"])]
        if column in METRICS:  # each metric on its own L0 axis (stats.x_column)
            ends = lm_endpoint if x_column(column) == "splice_l0" else endpoint
            text = [t + marks.dagger if t and e else t for t, e in zip(text, ends)]
        if column == BEST_METRIC:
            text = [marks.bold.format(t) if b else t for t, b in zip(text, best)]
        cells[column] = text
    return pd.DataFrame(cells, index=table.index)


def _with_ci(text: str, column: str, ci: float, marks: Marks) -> str:
    return text + marks.plus_minus + _format(column, ci) if text and np.isfinite(ci) else text


def _format(column: str, value: object) -> str:
    """A number in its column's format; a missing value as nothing (never as a number)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return str(value)
    fmt = METRICS[column].fmt if column in METRICS else FORMATS.get(column)
    if fmt is None:
        fmt = "{:.0f}" if float(value).is_integer() else "{:.4g}"
    return fmt.format(value)


def caption(table: pd.DataFrame) -> str:
    """One line: which metrics are measured on which held-out token set, and how many tokens."""
    by_set: dict[str, list[str]] = {}  # L0 first: table 1's targets are L0 values too
    for metric in [c for c in dict.fromkeys(("l0", *table.columns)) if c in METRICS]:
        by_set.setdefault(METRICS[metric].measured_on, []).append(metric)
    parts = []
    for field, names in by_set.items():
        count = table[field].min() if field in table else math.nan
        fewest = f", at least {count:,.0f} tokens" if np.isfinite(count) else ""
        parts.append(
            f"{', '.join(names)} on the {TOKEN_SETS.get(field, field)} (`{field}`{fewest})"
        )
    return "Measured on held-out tokens: " + "; ".join(parts) + "."


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    """A caption line, the GitHub markdown table (numbers right-aligned), the † footnote."""
    cells = table_cells(table, MARKDOWN)
    align = ["right" if _is_number(table[c]) else "left" for c in cells]
    text = cells.to_markdown(index=False, disable_numparse=True, colalign=align)
    lines = [f"{title}{caption(table)}", "", text, ""]
    if "best" in table and BEST_METRIC in table:
        lines += [f"Bold: {BOLD_NOTE.format(table.attrs.get('resolution', 0.0))}", ""]
    if any(c in table and table[c].any() for c in ("from_endpoint", "lm_from_endpoint")):
        lines += [f"† {DAGGER_NOTE}", ""]
    return "\n".join(lines)


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (numbers right-aligned, best in bold), then the † footnote."""
    cells = table_cells(table, LATEX)
    text_columns = [c for c in cells if c not in METRICS]
    styler = cells.style.hide(axis="index").format(escape="latex", subset=text_columns)
    styler = styler.format_index(escape="latex", axis=1)
    if "best" in table and BEST_METRIC in cells:
        bold = np.where(table["best"].to_numpy(bool), "font-weight: bold;", "")
        styler = styler.apply(lambda _: bold, subset=[BEST_METRIC])
    align = "".join("r" if _is_number(table[c]) else "l" for c in cells)
    latex = styler.to_latex(column_format=align, hrules=True, convert_css=True)
    if any(c in table and table[c].any() for c in ("from_endpoint", "lm_from_endpoint")):
        note = DAGGER_NOTE.replace("`l0_used`", r"\texttt{l0\_used}")
        note = note.replace("`lm_l0_used`", r"\texttt{lm\_l0\_used}")
        latex += rf"\par\smallskip{{\footnotesize $^\dagger$ {note}}}" + "\n"
    return latex


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
