"""Statistics: seed means with 95% Student-t intervals, the matched-L0 table (table 1) and its
"best" marking.

Owns the numbers of table 1. Knows the tidy runs frame of ``load`` and the directions in
``benchmark.metrics.METRICS``; not files, not text, not figures.

Rules, stated once (the interpolation's own in ``interpolate``):
- A seed's curve is the runs of one ``curve_hash`` and one seed, one run per ``point``; each is
  interpolated on its own, then table 1 gives the mean over the seeds that cover the target
  (``n_seeds``) and the half-width of the 95% Student-t interval (``<metric>_ci95``). A NaN in
  any of them makes the mean NaN (a null ``ce_loss_recovered`` is never half-averaged).
- ``from_endpoint`` is True when any seed's cell came from an end point by the tolerance;
  ``l0_used`` is the mean L0 the seeds used; the token counts are the fewest among the runs.
- Best: at each (model, site, layer, d_sae, target L0), the curve with the best mean
  ``delta_lm_loss`` (direction from METRICS), among true interpolations only (never an
  end-point cell), when two or more curves have one there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from benchmark.metrics import METRICS
from benchmark.report.interpolate import at_targets, bracket_log_l0, curve_points
from benchmark.report.load import DISPLAY_KEYS, TOKEN_COLUMNS, sort_rows

BEST_METRIC = "delta_lm_loss"
TABLE_METRICS = ("delta_lm_loss", "fvu", "ce_loss_recovered", "frac_dead", "frac_freq_over_10pct")
DEFAULT_TARGETS = (10, 20, 40, 80, 160)
CURVE_KEYS = ("curve_hash", *DISPLAY_KEYS, "curve")  # one row group of table 1, one line
BEST_AMONG = ("model", "site", "layer", "d_sae", "target_l0")  # rows compared for "best"

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


def _seed_cells(
    curve: pd.DataFrame, targets: list[float], metrics: Sequence[str], tolerance: float
) -> pd.DataFrame:
    """One seed's curve at every target: the metrics, how each was found, the token counts."""
    points = curve_points(curve, [*metrics, *TOKEN_COLUMNS])
    bracket = bracket_log_l0(points.index.to_numpy(), targets, tolerance)
    cells = pd.DataFrame({"target_l0": targets, "covered": bracket.lo >= 0})
    cells["from_endpoint"], cells["l0_used"] = bracket.from_endpoint, bracket.l0_used
    for metric in metrics:
        cells[metric] = at_targets(bracket, points[metric].to_numpy())
    for column in TOKEN_COLUMNS:  # the fewest tokens among the runs the cell is made from
        tokens = points[column].to_numpy()
        fewest = np.minimum(tokens[bracket.lo], tokens[bracket.hi])
        cells[column] = np.where(bracket.lo >= 0, fewest, np.nan)
    return cells


def matched_l0_table(
    df: pd.DataFrame,
    targets: Sequence[float] | None = None,
    metrics: Sequence[str] = TABLE_METRICS,
    l0_tolerance: float = 0.0,
) -> pd.DataFrame:
    """Table 1: every curve's metrics at common L0 values, mean and 95% CI over seeds."""
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
    covered = per_seed[per_seed["covered"]]
    grouped = covered.groupby(keys, dropna=False, sort=True)
    found = summarize_seeds(covered, keys, metrics).rename(columns={"n_runs": "n_seeds"})
    found.insert(len(keys) + 1, "l0_used", grouped["l0_used"].mean().to_numpy())
    found.insert(len(keys) + 2, "from_endpoint", grouped["from_endpoint"].any().to_numpy())
    for column in TOKEN_COLUMNS:
        found[column] = grouped[column].min(skipna=False).to_numpy()
    table = per_seed[keys].drop_duplicates().merge(found, on=keys, how="left")
    table["n_seeds"] = table["n_seeds"].fillna(0).astype(int)
    table["from_endpoint"] = table["from_endpoint"].fillna(False).astype(bool)
    if BEST_METRIC in metrics:
        table["best"] = mark_best(table, BEST_METRIC)
    return sort_rows(table, [*BEST_AMONG[:-1], "target_l0", "sae", "curve"])


def mark_best(table: pd.DataFrame, metric: str) -> pd.Series:
    """True for the best curve at each comparison point, among true interpolations only,
    when two or more curves have one there."""
    eligible = table[metric].notna() & ~table["from_endpoint"]
    sign = 1 if METRICS[metric].higher_is_better else -1
    score = (sign * table[metric]).where(eligible)
    by_point = score.groupby([table[key] for key in BEST_AMONG], dropna=False)
    return eligible & (score == by_point.transform("max")) & (by_point.transform("count") >= 2)
