"""Statistics: seed means with 95% Student-t intervals, the matched-L0 table (table 1) and its
"best" marking.

Owns the numbers of table 1. Knows the tidy runs frame of ``load`` and the directions in
``benchmark.metrics.METRICS``; not files, not text, not figures.

Rules, stated once (the interpolation's own in ``interpolate``):
- A seed's curve is the runs of one ``curve_hash`` and one seed, one run per ``point``; each is
  interpolated on its own, then table 1 gives the mean over the seeds that cover the target
  (``n_seeds``) and the half-width of the 95% Student-t interval (``<metric>_ci95``). A NaN in
  any of them makes the mean NaN (a null ``ce_loss_recovered`` is never half-averaged).
- Each metric is read at its own L0 (``x_column``): the LM-set metrics (delta LM loss, CE
  recovered, KL) at ``splice_l0``, the L0 measured on the same LM positions, the others at
  ``l0`` (the held-out activation set). So the LM set need not be representative of the
  activation set's L0: a curve's delta LM loss at L0 40 is read where its LM-set L0 is 40.
- ``from_endpoint`` (``lm_from_endpoint`` for the LM axis) is True when any seed's cell came
  from an end point by the tolerance; ``l0_used`` (``lm_l0_used``) is the mean L0 the seeds
  used; the token counts are the fewest among the runs.
- Best: at each (model, site, layer, d_sae, training budget, target L0), the curve with the best mean
  ``delta_lm_loss`` (direction from METRICS), among true interpolations only (never an
  end-point cell), when two or more curves have one there, and only when it is resolved: its
  gap to the runner-up exceeds ``resolution`` x the runner-up's |value| (the run-to-run spread
  a reader states, e.g. across machines; default 0) and either curve's 95% half-width (with
  two or more seeds). An unresolved best is not marked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from benchmark.metrics import ACT, LM, METRICS
from benchmark.report.interpolate import at_targets, bracket_log_l0, curve_points
from benchmark.report.load import DISPLAY_KEYS, TOKEN_COLUMNS, sort_rows

BEST_METRIC = "delta_lm_loss"
TABLE_METRICS = ("delta_lm_loss", "fvu", "ce_loss_recovered", "frac_dead", "frac_freq_over_10pct")
DEFAULT_TARGETS = (10, 20, 40, 80, 160)
CURVE_KEYS = ("curve_hash", *DISPLAY_KEYS, "budget", "curve")  # a row group of table 1, a line
# rows compared for "best": one site, layer, width and training budget (load: `budget`)
BEST_AMONG = ("model", "site", "layer", "d_sae", "budget", "target_l0")

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
    """Half-width of the 95% t-interval of the mean; NaN below two values or if any is NaN."""
    array = np.asarray(list(values), dtype=float)
    if len(array) < 2 or not np.isfinite(array).all():
        return math.nan
    return t_quantile_975(len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array))


def summarize_seeds(
    frame: pd.DataFrame, keys: Sequence[str], columns: Sequence[str]
) -> pd.DataFrame:
    """One row per group of ``keys``: the mean of each column (NaN if any is) and its ``_ci95``."""
    grouped = frame.groupby(list(keys), dropna=False, sort=True)
    out = grouped.size().rename("n_runs").reset_index()
    for column in columns:
        out[column] = grouped[column].mean(skipna=False).to_numpy()
        out[f"{column}_ci95"] = grouped[column].agg(ci95_half_width).to_numpy()
    return out


def default_targets(df: pd.DataFrame) -> list[float]:
    """The target L0 values the runs were trained for, else the paper-like 10..160 ladder."""
    present = sorted(df["target_l0"].dropna().unique()) if "target_l0" in df else []
    return [float(t) for t in present] or [float(t) for t in DEFAULT_TARGETS]


def x_column(metric: str) -> str:
    """The L0 a metric is read at: `splice_l0` (L0 on the LM set, the same positions) for the
    LM-set metrics, `l0` (the held-out activation set) for the others."""
    return "splice_l0" if METRICS.get(metric) and METRICS[metric].measured_on == LM else "l0"


def _seed_cells(
    curve: pd.DataFrame, targets: list[float], metrics: Sequence[str], tolerance: float
) -> pd.DataFrame:
    """One seed's curve at every target: the metrics, how each was found, the token counts.
    Each metric is interpolated along its own L0 (`x_column`): ``from_endpoint`` / ``l0_used``
    describe the activation-set axis (l0), ``lm_from_endpoint`` / ``lm_l0_used`` the LM axis
    (splice_l0); ``covered`` is the activation axis's."""
    cells = pd.DataFrame({"target_l0": targets})
    for axis, prefix in (("l0", ""), ("splice_l0", "lm_")):
        names = [m for m in metrics if x_column(m) == axis]
        tokens = [ACT if axis == "l0" else LM]
        x = curve[axis] if axis in curve else pd.Series(np.nan, index=curve.index)
        if axis == "splice_l0" and not names:
            continue
        points = curve_points(curve.assign(l0=x), [*names, *tokens])
        bracket = bracket_log_l0(points.index.to_numpy(), targets, tolerance)
        if axis == "l0":
            cells["covered"] = bracket.lo >= 0
        cells[f"{prefix}from_endpoint"] = bracket.from_endpoint & (bracket.lo >= 0)
        cells[f"{prefix}l0_used"] = bracket.l0_used
        for metric in names:
            cells[metric] = at_targets(bracket, points[metric].to_numpy())
        for column in tokens:  # the fewest tokens among the runs the cell is made from
            counts = points[column].to_numpy()
            fewest = np.minimum(counts[bracket.lo], counts[bracket.hi])
            cells[column] = np.where(bracket.lo >= 0, fewest, np.nan)
    for column in TOKEN_COLUMNS:
        if column not in cells:
            cells[column] = np.nan
    return cells


def matched_l0_table(
    df: pd.DataFrame,
    targets: Sequence[float] | None = None,
    metrics: Sequence[str] = TABLE_METRICS,
    l0_tolerance: float = 0.0,
    resolution: float = 0.0,
) -> pd.DataFrame:
    """Table 1: every curve's metrics at common L0 values, mean and 95% CI over seeds; the best
    marked where resolved (``mark_best``; ``resolution`` is kept in ``table.attrs``)."""
    targets = sorted(float(t) for t in (default_targets(df) if targets is None else targets))
    if df.empty or not targets:
        return pd.DataFrame()
    keys, by = [*CURVE_KEYS, "target_l0"], [*CURVE_KEYS, "seed"]  # a seed's curve: by
    per_seed = pd.concat(
        [
            _seed_cells(runs, targets, metrics, l0_tolerance).assign(**dict(zip(by, key)))
            for key, runs in df.groupby(by, dropna=False, sort=True)
        ],
        ignore_index=True,
    )
    # a cell is kept when either axis covers it (an LM metric may be read where l0 is not)
    lm = "lm_l0_used" in per_seed
    covered = per_seed[per_seed["covered"] | (per_seed["lm_l0_used"].notna() if lm else False)]
    grouped = covered.groupby(keys, dropna=False, sort=True)
    found = summarize_seeds(covered, keys, metrics).rename(columns={"n_runs": "n_seeds"})
    flags = ["l0_used", "from_endpoint", *(("lm_l0_used", "lm_from_endpoint") if lm else ())]
    for i, column in enumerate(flags):
        agg = grouped[column].any() if "endpoint" in column else grouped[column].mean()
        found.insert(len(keys) + 1 + i, column, agg.to_numpy())
    for column in TOKEN_COLUMNS:
        found[column] = grouped[column].min(skipna=False).to_numpy()
    table = per_seed[keys].drop_duplicates().merge(found, on=keys, how="left")
    table["n_seeds"] = table["n_seeds"].fillna(0).astype(int)
    for column in ("from_endpoint", "lm_from_endpoint"):
        if column in table:
            table[column] = table[column].fillna(False).astype(bool)
    if BEST_METRIC in metrics:
        table["best"] = mark_best(table, BEST_METRIC, resolution)
    table = sort_rows(table, [*BEST_AMONG[:-1], "target_l0", "sae", "curve"])
    table.attrs["resolution"] = resolution
    return table


def mark_best(table: pd.DataFrame, metric: str, resolution: float = 0.0) -> pd.Series:
    """True for the best curve at each comparison point, among true interpolations only, when
    two or more curves have one there and the best is resolved: its gap to the runner-up is
    over ``resolution`` x |runner-up| and over both curves' 95% half-widths (NaN: one seed, 0)."""
    endpoint = "lm_from_endpoint" if x_column(metric) == "splice_l0" else "from_endpoint"
    eligible = table[metric].notna() & ~table[endpoint].astype(bool)
    sign = 1 if METRICS[metric].higher_is_better else -1
    score = (sign * table[metric]).where(eligible)
    half = table.get(f"{metric}_ci95", pd.Series(np.nan, index=table.index)).fillna(0.0)
    best = pd.Series(False, index=table.index)
    for _, group in score.groupby([table[key] for key in BEST_AMONG], dropna=False):
        ranked = group.dropna().sort_values(ascending=False)
        if len(ranked) < 2:
            continue
        top, second = ranked.index[0], ranked.index[1]
        gap = ranked.iloc[0] - ranked.iloc[1]
        needed = max(resolution * abs(ranked.iloc[1]), half[top], half[second])
        best[top] = bool(gap > needed)  # a tie is never bold
    return best
