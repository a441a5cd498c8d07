"""Claims: the paper's claims judged by the report, each ``holds``, ``refuted`` or
``inconclusive`` with the numbers behind it, and the dead-latent fraction per architecture (a
measurement printed beside them, not a claim of the paper).

Owns the claims, the verdict rules and the claims tables' text. Reads the tidy runs frame of
``load`` and takes the matched-L0 values from ``stats`` one seed at a time; writes no files.

Rules, stated once (the matched-L0 values follow ``interpolate`` and ``stats``):
- A claim compares architecture A with B on one metric. A cell is one (model, site, layer,
  d_sae, training budget, target L0) where both have a curve (``load``'s ``budget``: SAEs
  trained on different numbers of tokens are never compared); with several curves of one architecture there (two
  recipes), every pair of curves is a cell.
- Seeds are paired: seed s of A with seed s of B (the seed fixes the batch stream). A seed
  counts only where both values are true interpolations. Left out, and said so: a value from a
  curve's end point on the metric's own L0 axis (``from_endpoint``; for an LM-set metric
  ``lm_from_endpoint``, along ``splice_l0``: ``stats.x_column``).
- Per cell: d = A - B for each counted seed; its mean and 95% Student-t interval over the n
  seeds (``stats.ci95_half_width``: t(0.975, n - 1) * sd / sqrt(n)). With n < 2 the cell is
  ``inconclusive`` (its numbers and their direction are still printed); else ``RULES`` decide.
- Overall: ``refuted`` if any cell is; ``holds`` if every cell holds; else ``inconclusive``,
  the reason counting each cause. A claim missing an architecture is ``inconclusive`` ("no
  Gated runs"), never skipped.
- Dead latents (``frac_dead``): per seed, the mean over the matched-L0 cells that every seed of
  the architecture measured (no end point); the mean and 95% t-interval of that over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from benchmark.metrics import METRICS
from benchmark.report.load import sort_rows
from benchmark.report.stats import ci95_half_width, matched_l0_table, x_column

HOLDS, REFUTED, INCONCLUSIVE, MEASURED = "holds", "refuted", "inconclusive", "measured"
NAMES = {"jumprelu": "JumpReLU", "gated": "Gated", "topk": "TopK", "batchtopk": "BatchTopK",
         "matryoshka_batchtopk": "Matryoshka BatchTopK"}  # fmt: skip
CELL = ("model", "site", "layer", "d_sae", "budget", "target_l0")
SUMMARY_COLUMNS = ("claim", "figure", "verdict", "cells", "evidence", "reason")


class Rule(NamedTuple):
    """A cell's verdict from the mean and 95% half-width of d = A - B over >= 2 seeds."""

    holds: Callable[[float, float], bool]
    refuted: Callable[[float, float], bool]
    text: str


RULES = {
    "<=": Rule(
        lambda mean, half: mean <= 0,
        lambda mean, half: mean - half > 0,
        "holds where the mean of A - B is <= 0; refuted where its interval lies entirely "
        "above 0 (A significantly higher)",
    ),
    "<= or within noise of": Rule(
        lambda mean, half: mean - half <= 0,
        lambda mean, half: mean - half > 0,
        "holds where the interval of A - B reaches 0 or below (A not significantly higher); "
        "refuted where it lies entirely above 0",
    ),
    ">": Rule(
        lambda mean, half: mean > 0,
        lambda mean, half: mean + half < 0,
        "holds where the mean of A - B is > 0 (a tie does not hold); refuted where its "
        "interval lies entirely below 0 (A significantly lower)",
    ),
}


class Claim(NamedTuple):
    figure: str
    a: str
    metric: str
    relation: str  # a key of RULES
    b: str

    @property
    def text(self) -> str:
        return f"{name(self.a)}'s {self.metric} {self.relation} {name(self.b)}'s"


CLAIMS = (
    Claim("Fig. 2 (a)", "jumprelu", "delta_lm_loss", "<=", "gated"),
    Claim("Fig. 2 (b)", "jumprelu", "delta_lm_loss", "<= or within noise of", "topk"),
    Claim("Fig. 5", "jumprelu", "frac_freq_over_10pct", ">", "gated"),
    Claim("Fig. 5", "topk", "frac_freq_over_10pct", ">", "gated"),
)


class Judged(NamedTuple):
    summary: pd.DataFrame  # one row per claim, then one per architecture's dead fraction
    cells: pd.DataFrame  # one row per claim and cell, the numbers in full
    targets: list[float]
    l0_tolerance: float


def name(sae: str) -> str:
    return NAMES.get(sae, sae)


def claim_points(targets: Sequence[float]) -> list[float]:
    """Where the claims are judged, given table 1's target L0s: the targets strictly inside the
    swept range and the geometric midpoints of consecutive targets (rounded to 0.1), e.g.
    20, 40, 80 -> 28.3, 40, 56.6. A curve calibrated to a target lands a few % above or below
    it, so at the end targets (20, 80) about half the curves have no measured point beyond
    the target and their value there is an end point (never counted); inside the range every
    curve has measured points on both sides and the values are true interpolations. With
    fewer than two targets there is no inside: the targets themselves are returned."""
    ordered = sorted({float(t) for t in targets})
    if len(ordered) < 2:
        return ordered
    middles = [round(math.sqrt(lo * hi), 1) for lo, hi in zip(ordered, ordered[1:])]
    return sorted({*ordered[1:-1], *middles})


def judge_claims(df: pd.DataFrame, targets: Sequence[float], l0_tolerance: float = 0.0) -> Judged:
    """Every claim of ``CLAIMS`` and every architecture's dead fraction (the module's rules)."""
    long = seed_cells(df, sorted(targets), l0_tolerance)
    rows, cells = zip(*(judge_claim(claim, long) for claim in CLAIMS))
    saes = sort_rows(df[["sae"]].drop_duplicates(), ["sae"])["sae"]
    summary = pd.DataFrame([*rows, *(dead_latents(long, sae) for sae in saes)])
    found = [frame for frame in cells if not frame.empty]
    cells_frame = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    return Judged(
        summary.reindex(columns=SUMMARY_COLUMNS).fillna(""),
        cells_frame,
        sorted(targets),
        l0_tolerance,
    )


def seed_cells(df: pd.DataFrame, targets: list[float], l0_tolerance: float) -> pd.DataFrame:
    """One row per (curve, seed, target): the claims' metrics as table 1 computes them."""
    metrics = [*dict.fromkeys(claim.metric for claim in CLAIMS), "frac_dead"]
    per_seed = [
        matched_l0_table(seed_runs, targets, metrics, l0_tolerance).assign(seed=seed)
        for seed, seed_runs in df.groupby("seed", sort=True)
    ]
    return pd.concat(per_seed, ignore_index=True)


def side(long: pd.DataFrame, sae: str, metric: str) -> pd.DataFrame:
    """One architecture's per-seed values of ``metric``, with why a value is left out."""
    rows = long[long["sae"] == sae]
    endpoint = "lm_from_endpoint" if x_column(metric) == "splice_l0" else "from_endpoint"
    why = np.where(rows[endpoint].astype(bool), "end point", "")
    return rows[[*CELL, "curve", "seed"]].assign(value=rows[metric], left_out=why)


def judge_claim(claim: Claim, long: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """(summary row, cells) of one claim."""
    a, b = side(long, claim.a, claim.metric), side(long, claim.b, claim.metric)
    absent = [name(sae) for sae, rows in ((claim.a, a), (claim.b, b)) if rows.empty]
    row = {"claim": claim.text, "figure": claim.figure, "verdict": INCONCLUSIVE, "cells": "0/0"}
    if absent:
        return row | {"reason": f"no {' and no '.join(absent)} runs"}, pd.DataFrame()
    keys, curves = [*CELL, "curve_a", "curve_b"], [*CELL, "curve"]
    universe = (
        a[curves]
        .drop_duplicates()
        .merge(b[curves].drop_duplicates(), on=list(CELL), suffixes=("_a", "_b"))
    )
    if universe.empty:
        reason = f"{name(claim.a)} and {name(claim.b)} share no (model, site, layer, d_sae)"
        return row | {"reason": reason}, pd.DataFrame()
    pairs = a.merge(b, on=[*CELL, "seed"], suffixes=("_a", "_b"))
    rule = RULES[claim.relation]
    judged = [  # a cell without a seed in common keeps one row, with no seed
        dict(zip(keys, key)) | judge_cell(seeds[seeds["seed"].notna()], rule)
        for key, seeds in universe.merge(pairs, on=keys, how="left").groupby(
            keys, dropna=False, sort=False
        )
    ]
    cells = pd.DataFrame(judged)
    cells.insert(0, "figure", claim.figure)
    cells.insert(1, "claim", claim.text)
    cells.insert(2, "metric", claim.metric)
    return row | overall(claim, cells), cells


def judge_cell(seeds: pd.DataFrame, rule: Rule) -> dict:
    """One cell: the counted seeds' means of A, B and d = A - B, its interval, the verdict."""
    both = seeds[seeds["value_a"].notna() & seeds["value_b"].notna()]
    left_out = (both["left_out_a"] != "") | (both["left_out_b"] != "")
    counted = both[~left_out]
    shown = counted if len(counted) else both  # numbers of left-out seeds still printed
    d = shown["value_a"] - shown["value_b"]
    mean, half = d.mean(), ci95_half_width(d)
    cell = {"n_seeds": len(counted), "value_a": shown["value_a"].mean(),
            "value_b": shown["value_b"].mean(), "diff": mean, "diff_ci95": half,
            "points_agree": bool(len(d)) and rule.holds(mean, 0.0)}  # fmt: skip
    why = ", ".join(sorted((set(both["left_out_a"]) | set(both["left_out_b"])) - {""}))
    note = f"{left_out.sum()} of {len(both)} seeds left out ({why})" if why else ""
    verdict, cause = INCONCLUSIVE, ""
    if seeds.empty:
        cause = "no seed in common"
    elif both.empty:
        cause = "no value at this L0 (outside a curve's measured L0 range)"
    elif counted.empty:
        cause = f"left out: {why}"
    elif len(counted) == 1:
        cause = "one counted seed, no interval"
    elif rule.refuted(mean, half):
        verdict, cause = REFUTED, "significantly against the claim"
    elif rule.holds(mean, half):
        verdict = HOLDS
    else:
        cause = "a tie" if mean == 0 else "against the claim, not significantly"
    return cell | {"verdict": verdict, "cause": cause, "note": note}


def overall(claim: Claim, cells: pd.DataFrame) -> dict:
    """The claim's verdict, ``cells`` (holding / total), evidence and reason."""
    verdicts = cells["verdict"]
    out = {"cells": f"{(verdicts == HOLDS).sum()}/{len(cells)}", "evidence": evidence(claim, cells)}
    if (verdicts == REFUTED).any():
        refuting = cells[verdicts == REFUTED].to_dict("records")
        where = ", ".join(label(cell, cells) for cell in refuting[:3])
        more = f" and {len(refuting) - 3} more" if len(refuting) > 3 else ""
        reason = f"significantly against the claim in {len(refuting)} cell(s): {where}{more}"
        return out | {"verdict": REFUTED, "reason": reason}
    if (verdicts == HOLDS).all():
        return out | {"verdict": HOLDS, "reason": "every cell holds"}
    causes = []
    for cause, group in cells[verdicts != HOLDS].groupby("cause", sort=False):
        agree = group["points_agree"].sum()
        points = (
            f" (the points agree with the claim in {agree})" if "one counted seed" in cause else ""
        )
        causes.append(f"{len(group)} cell(s): {cause}{points}")
    return out | {"verdict": INCONCLUSIVE, "reason": "; ".join(causes)}


def evidence(claim: Claim, cells: pd.DataFrame) -> str:
    """The cell most against the claim (its A, B, d ± interval) and the range of d."""
    counted = cells[cells["n_seeds"] > 0]
    if counted.empty:
        return "no cell with a counted value at matched L0"
    worst = counted.loc[
        counted["diff"].idxmin() if claim.relation == ">" else counted["diff"].idxmax()
    ]
    fmt = METRICS[claim.metric].fmt
    signed = fmt.replace("{:", "{:+")
    half = f" ± {fmt.format(worst['diff_ci95'])}" if np.isfinite(worst["diff_ci95"]) else ""
    seeds = f"{worst['n_seeds']} seed{'s' if worst['n_seeds'] > 1 else ''}"
    return (
        f"A - B worst at {label(worst, cells)}: {fmt.format(worst['value_a'])} vs "
        f"{fmt.format(worst['value_b'])}, d {signed.format(worst['diff'])}{half} ({seeds}); "
        f"d over {len(counted)} cells in [{signed.format(counted['diff'].min())}, "
        f"{signed.format(counted['diff'].max())}]"
    )


def label(cell: dict | pd.Series, cells: pd.DataFrame) -> str:
    """A cell's name, with the model and width only when the cells hold several."""
    parts = [str(cell["model"])] if cells["model"].nunique() > 1 else []
    parts += [f"{cell['site']} L{cell['layer']:g}"]
    parts += [f"d_sae {cell['d_sae']:g}"] if cells["d_sae"].nunique() > 1 else []
    parts += [f"{tokens(cell['budget'])} tokens"] if cells["budget"].nunique() > 1 else []
    return " ".join([*parts, f"L0 {cell['target_l0']:g}"])


def tokens(n: float) -> str:
    """A token count as a short label: 160k, 2.56M."""
    if not np.isfinite(n):
        return "?"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def dead_latents(long: pd.DataFrame, sae: str) -> dict:
    """One architecture's dead fraction at matched L0, mean and 95% t-interval over seeds."""
    rows = long[long["sae"] == sae]
    cell = [*CELL, "curve"]
    clean = rows[rows["frac_dead"].notna() & ~rows["from_endpoint"]]
    in_every_seed = (
        clean.groupby(cell, dropna=False)["seed"].transform("nunique") == rows["seed"].nunique()
    )
    used = clean[in_every_seed]
    total, n_cells = len(rows[cell].drop_duplicates()), len(used[cell].drop_duplicates())
    row = {"claim": f"dead latents: {name(sae)} frac_dead", "figure": "not a claim",
           "verdict": MEASURED, "cells": f"{n_cells}/{total}"}  # fmt: skip
    if total > n_cells:
        row["reason"] = f"{total - n_cells} cell(s) left out (no value at this L0, an end point, "
        row["reason"] += "or not measured in every seed)"
    if used.empty:
        return row | {"evidence": "no cell measured in every seed"}
    per_seed = used.groupby("seed")["frac_dead"].mean()
    fmt, half = METRICS["frac_dead"].fmt, ci95_half_width(per_seed)
    spread = f" ± {fmt.format(half)} over {len(per_seed)} seeds" if np.isfinite(half) else ""
    spread = spread or " (one seed, no interval)"
    by_cell = used.groupby(cell, dropna=False)["frac_dead"].mean()
    cells = f"cells in [{fmt.format(by_cell.min())}, {fmt.format(by_cell.max())}]"
    return row | {"evidence": f"mean {fmt.format(per_seed.mean())}{spread}; {cells}"}


# ---------------------------------------------------------------------------- text


def method_lines(judged: Judged) -> list[str]:
    """How the verdicts were reached, printed under the claims table."""
    targets = ", ".join(f"{t:g}" for t in judged.targets)
    return [
        f"Judged at L0 {targets}: each seed's values linear in log L0 between its measured "
        f"points, as table 1 computes them (end-point tolerance {judged.l0_tolerance:g}). "
        "The report judges at the targets inside the swept range and the geometric midpoints "
        "of consecutive targets (`claim_points`; `--claims-l0` sets other points): a curve "
        "calibrated to an end target lands a few % to either side of it, so its value there "
        "is often an end point, which is never counted.",
        "",
        "Intervals: 95% Student-t over seeds of d = A - B, seed s of A paired with seed s of B "
        "(the seed fixes the batch stream): mean(d) ± t(0.975, n - 1) sd(d) / sqrt(n). Dead "
        "latents: over seeds of each seed's mean over the same matched-L0 cells.",
        "",
        "L0 axes: delta_lm_loss is read at splice_l0, the L0 measured on the LM set's own "
        "positions; frac_freq_over_10pct and frac_dead at l0, the held-out activation set's "
        "(so the LM set need not be representative of the activation set).",
        "",
        "Left out of the evidence (a cell left with no counted seed is missing, so the claim "
        "cannot hold): values from a curve's end point (†) on the metric's L0 axis.",
        "",
        "Verdicts: a cell with fewer than two counted seeds is inconclusive (its numbers and "
        "their direction are still shown); otherwise, by the claim's relation:",
        *(f"- `{relation}`: {rule.text}." for relation, rule in RULES.items()),
        "",
        "Overall: refuted if any cell is refuted; holds if every cell holds; otherwise "
        "inconclusive, with the count of each cause. A claim without runs of one of its "
        "architectures is inconclusive. `cells`: cells holding / cells compared (for a "
        "measurement: cells used / cells).",
    ]


def claims_markdown(judged: Judged) -> str:
    """The claims table (claims, then measurements) and the method under it."""
    table = judged.summary.to_markdown(index=False, disable_numparse=True)
    return "\n".join(["# Claims of the paper, judged at matched L0", "", table, "",
                      *method_lines(judged), ""])  # fmt: skip


def cells_markdown(cells: pd.DataFrame) -> str:
    """Every claim's cells: A, B and d = A - B ± its interval in the metric's format."""
    title = "# Claims per cell (A - B over the counted seeds)"
    if cells.empty:
        return f"{title}\n\nNo cell: every claim lacks one of its architectures.\n"
    several = cells.duplicated(["claim", *CELL]).any()  # two curves of one architecture
    rows = []
    for cell in cells.to_dict("records"):
        fmt = METRICS[cell["metric"]].fmt
        d = _number(fmt.replace("{:", "{:+"), cell["diff"])
        if d and np.isfinite(cell["diff_ci95"]):
            d += " ± " + fmt.format(cell["diff_ci95"])
        rows.append({
            "figure": cell["figure"], "claim": cell["claim"], "cell": label(cell, cells),
            **({"curves": f"{cell['curve_a']} vs {cell['curve_b']}"} if several else {}),
            "seeds": str(cell["n_seeds"]), "A": _number(fmt, cell["value_a"]),
            "B": _number(fmt, cell["value_b"]), "A - B": d, "verdict": cell["verdict"],
            "why": "; ".join(text for text in (cell["cause"], cell["note"]) if text),
        })  # fmt: skip
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    return f"{title}\n\n{table}\n"


def _number(fmt: str, value: float) -> str:
    return fmt.format(value) if np.isfinite(value) else ""


def claims_latex(summary: pd.DataFrame) -> str:
    """The claims table as a booktabs ``tabular``, long text columns wrapped."""
    styler = summary.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis=1)
    latex = styler.to_latex(column_format="p{3.5cm}lllp{6cm}p{4cm}", hrules=True)
    for text, tex in (("<=", r"$\le$"), (">", "$>$"), ("±", r"$\pm$")):
        latex = latex.replace(text, tex)
    return latex
