"""Interpolation of one curve in log L0, with no silent extrapolation.

Owns the rule for a value at a target L0 from a curve's measured points; knows nothing of runs,
seeds or files.

- Linear in log L0 between the measured neighbours of the target; at a measured L0, its value.
- A target outside the measured L0 range is NaN. With ``tolerance`` > 0, a target within that
  relative distance of an end point (|end - target| <= tolerance * target) takes the end
  point's value, and is marked ``from_endpoint`` with the end point's L0 in ``l0_used`` (for an
  interpolated cell ``l0_used`` is the target).
- Two different points at the same L0 are never averaged: if they disagree the curve is
  ambiguous there and a target that needs that L0 is NaN.
- NaN propagates: a target whose neighbour is NaN is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike


class Bracket(NamedTuple):
    """Where each target sits on a curve's ascending, distinct L0 values."""

    lo: np.ndarray  # index of the measured point at or below the target (-1: not covered)
    hi: np.ndarray  # index of the point at or above it (== lo at a point or an end point)
    weight: np.ndarray  # weight of ``hi``, linear in log L0
    from_endpoint: np.ndarray  # the value is an end point's, by the tolerance
    l0_used: np.ndarray  # the target, or the end point's L0; NaN where not covered


def bracket_log_l0(l0: np.ndarray, targets: ArrayLike, tolerance: float = 0.0) -> Bracket:
    """Locate each target on ``l0`` (ascending, distinct, > 0); see the module's rules."""
    t = np.asarray(targets, dtype=float)
    if len(l0) == 0:
        none = np.full(t.shape, -1)
        return Bracket(none, none, np.zeros(t.shape), np.zeros(t.shape, bool), t * np.nan)
    inside = (t >= l0[0]) & (t <= l0[-1])
    below = (t < l0[0]) & (l0[0] <= t * (1 + tolerance))  # |end - t| <= tolerance * t
    above = (t > l0[-1]) & (t * (1 - tolerance) <= l0[-1])
    lo = np.searchsorted(l0, t, side="right") - 1
    hi = np.searchsorted(l0, t, side="left")
    lo, hi = np.where(below, 0, lo), np.where(below, 0, hi)
    lo, hi = np.where(above, len(l0) - 1, lo), np.where(above, len(l0) - 1, hi)
    covered = inside | below | above
    lo, hi = np.where(covered, lo, -1), np.where(covered, hi, -1)
    log_l0 = np.log(l0)
    span = log_l0[hi] - log_l0[lo]
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(span > 0, (np.log(t) - log_l0[lo]) / span, 0.0)
    l0_used = np.where(inside, t, np.where(covered, l0[lo], np.nan))
    return Bracket(lo, hi, weight, below | above, l0_used)


def at_targets(bracket: Bracket, values: np.ndarray) -> np.ndarray:
    """The values at the bracketed targets; NaN where not covered or where a neighbour is NaN."""
    lo, hi, w = bracket.lo, bracket.hi, bracket.weight
    out = (1 - w) * values[lo] + np.where(w > 0, w * values[hi], 0.0)
    return np.where(lo >= 0, out, np.nan)


def curve_points(curve: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A curve's values by distinct L0 (ascending); points at one L0 that disagree give NaN."""
    valid = curve[np.isfinite(curve["l0"]) & (curve["l0"] > 0)]
    agree = lambda v: v.iloc[0] if v.nunique(dropna=False) == 1 else math.nan  # noqa: E731
    return valid.groupby("l0", sort=True)[list(columns)].agg(agree)


def interpolate_log_l0(
    l0: ArrayLike, values: ArrayLike, targets: ArrayLike, tolerance: float = 0.0
) -> np.ndarray:
    """One curve's values at the targets, linear in log L0 (the module's rules)."""
    points = curve_points(pd.DataFrame({"l0": l0, "v": values}, dtype=float), ["v"])
    bracket = bracket_log_l0(points.index.to_numpy(), targets, tolerance)
    return at_targets(bracket, points["v"].to_numpy())
