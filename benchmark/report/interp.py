"""The automated-interpretability summary: ``interp.csv`` (written by ``benchmark.interp``) ->
``interp.md`` and ``fig_interp.{png,pdf}``.

Owns the interpretability tables' text, the figure and the comparison's rule. Reads the tidy
frame with pandas alone (one row per scored latent: run_id, sae, target_l0, l0, seed, model,
hook, latent, frequency, band, explanation, score, n_scored, explainer, simulator); must not
know torch or the model. ``benchmark.report`` adds this summary to a report when
``RESULTS_DIR/interp/interp.csv`` exists.

Rules, stated once:
- A latent's score is Bills et al. (2023)'s correlation score: the Pearson r between the
  simulated and the true activations. A NaN score is undefined (a constant simulation or a
  constant truth): it is counted ("undefined") and never averaged in; every mean, median,
  interval and violin is over the defined scores only.
- Latents at different (model, hook) are never compared. Within one, the summary gives per
  architecture and target L0 the mean ± 95% Student-t half-width over latents
  (``stats.ci95_half_width``), the median, the seeds and the mean achieved L0 over runs.
- The comparison (the claim "JumpReLU's interpretability is within noise of Gated's and
  TopK's"): the reference architecture (jumprelu, else the first present in ``ORDER["sae"]``
  order) against each other one; the defined scores of all latents pooled over target L0s and
  seeds, then again per target L0. d = mean(A) - mean(B) with a Welch 95% interval:
  half-width t(0.975, df) * sqrt(s_A^2/n_A + s_B^2/n_B), df the Welch-Satterthwaite value
  rounded down (conservative). ``holds (no difference resolved)`` when the interval contains
  0, ``<A> lower`` / ``<A> higher`` when it excludes 0, ``inconclusive`` when either side has
  fewer than 2 defined scores; and ``not judged: scores at chance`` for every row of a (model,
  hook) whose defined scores, all architectures together, do not have a mean above 0 by more
  than its 95% t half-width (``above_chance``): differences measured by a simulator that
  predicts nothing are not evidence. The unit is the latent: the latents of one SAE are not
  independent draws of the architecture and seeds are pooled, so the interval says whether
  the scored latents differ, not how a retrained SAE would.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmark.report.claims import name
from benchmark.report.figures import OTHER_STYLES, STYLE, data_ylim
from benchmark.report.load import ORDER, checked_columns
from benchmark.report.stats import ci95_half_width, t_quantile_975
from benchmark.report.write import save

REQUIRED = ("run_id", "sae", "target_l0", "seed", "hook", "latent", "score")
OPTIONAL = ("model", "l0", "frequency", "band", "explanation", "n_scored", "explainer",
            "simulator")  # fmt: skip
NUMERIC = ("target_l0", "l0", "seed", "latent", "frequency", "score", "n_scored")
GROUP = ("model", "hook")  # latents at different hooks are never compared
REFERENCE = "jumprelu"
HOLDS, INCONCLUSIVE = "holds (no difference resolved)", "inconclusive"
AT_CHANCE = "not judged: scores at chance"
CLAIM = "JumpReLU's interpretability is within noise of Gated's and TopK's"
TITLE = "# Automated interpretability (explain, simulate, score)"
EXPLANATION_CHARS = 120  # an example explanation is cut to this many characters


def read_interp_csv(path: str | Path) -> pd.DataFrame:
    """The scored latents of ``path``, the optional columns filled when absent; ValueError
    naming the file if a required column is missing or the file is not a CSV. Text is kept as
    written (an explanation "None" stays "None"); the numeric columns are numbers, NaN where
    empty."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a CSV ({e})") from e
    checked_columns(frame, path, REQUIRED, OPTIONAL, "benchmark.interp")
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _order(sae: str) -> tuple[int, str]:
    known = ORDER["sae"]
    return (known.index(sae) if sae in known else len(known), sae)


def architectures(frame: pd.DataFrame) -> list[str]:
    """The architectures present, in the paper's order, the others after it alphabetically."""
    return sorted(frame["sae"].astype(str).unique(), key=_order)


def _cell(mean: float, half: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def escape(text: object, limit: int = EXPLANATION_CHARS) -> str:
    """Free text as one markdown table cell: whitespace runs (newlines) as one space, HTML
    characters as entities, backslashes and ``|`` escaped, cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return html.escape(flat, quote=False).replace("\\", "\\\\").replace("|", "\\|")


def summary(group: pd.DataFrame) -> pd.DataFrame:
    """One row per architecture and target L0 of one (model, hook): latents, undefined, the
    mean of the defined scores with its 95% half-width over latents, median, seeds, mean L0."""
    rows = []
    for sae in architectures(group):
        for target, cell in group[group["sae"] == sae].groupby("target_l0", dropna=False):
            defined = cell["score"].dropna()
            rows.append({"sae": sae, "target_l0": target, "latents": len(cell),
                         "undefined": len(cell) - len(defined), "mean": defined.mean(),
                         "ci95": ci95_half_width(defined), "median": defined.median(),
                         "seeds": cell["seed"].nunique(),
                         "l0": cell.drop_duplicates("run_id")["l0"].mean()})  # fmt: skip
    return pd.DataFrame(rows)


def summary_markdown(table: pd.DataFrame) -> str:
    lines = ["| architecture | target L0 | L0 | seeds | latents | undefined | score (95%) | "
             "median |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in table.itertuples(index=False):
        l0 = f"{r.l0:.1f}" if math.isfinite(r.l0) else "n/a"
        median = f"{r.median:.3f}" if math.isfinite(r.median) else "n/a"
        lines.append(f"| {name(r.sae)} | {r.target_l0:g} | {l0} | {r.seeds} | {r.latents} | "
                     f"{r.undefined} | {_cell(r.mean, r.ci95)} | {median} |")  # fmt: skip
    return "\n".join(lines)


def _band_key(band: str) -> tuple[float, str]:
    """Bands by their lower edge (``1e-4..1e-3`` -> 1e-4); an unreadable label last."""
    try:
        return (float(band.split("..")[0]), band)
    except ValueError:
        return (math.inf, band)


def band_markdown(group: pd.DataFrame) -> str:
    """Markdown: per firing-frequency band (rows) and architecture (columns), the mean of the
    defined scores and their number n."""
    saes = architectures(group)
    bands = group["band"].astype(str).replace("", "n/a")
    lines = ["| band | " + " | ".join(name(s) for s in saes) + " |",
             "|---|" + "---:|" * len(saes)]  # fmt: skip
    for band in sorted(bands.unique(), key=_band_key):
        cells = []
        for sae in saes:
            defined = group[(bands == band) & (group["sae"] == sae)]["score"].dropna()
            cells.append(f"{defined.mean():.3f} (n={len(defined)})" if len(defined) else "n=0")
        lines.append(f"| {escape(band)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def welch(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its Welch 95% half-width, the Welch-Satterthwaite df); half-width
    and df NaN below two values on either side; half-width 0 and df NaN when both are
    constant (the interval is the difference itself)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, 0.0, math.nan
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, t_quantile_975(math.floor(df)) * math.sqrt(va + vb), float(df)


def verdict(ref: str, diff: float, half: float, n_a: int, n_b: int) -> str:
    """The module rule's verdict for reference ``ref`` minus another architecture."""
    if n_a < 2 or n_b < 2:
        return INCONCLUSIVE
    if diff - half > 0:
        return f"{name(ref)} higher"
    if diff + half < 0:
        return f"{name(ref)} lower"
    return HOLDS


def reference(saes: list[str]) -> str:
    return REFERENCE if REFERENCE in saes else sorted(saes, key=_order)[0]


def _compare(ref: str, other: str, cell: pd.DataFrame, target: float) -> dict:
    a = cell.loc[cell["sae"] == ref, "score"].dropna()
    b = cell.loc[cell["sae"] == other, "score"].dropna()
    diff, half, df = welch(a, b)
    return {"a": ref, "b": other, "target_l0": target, "n_a": len(a), "n_b": len(b),
            "mean_a": a.mean(), "mean_b": b.mean(), "diff": diff, "ci95": half, "df": df,
            "verdict": verdict(ref, diff, half, len(a), len(b))}  # fmt: skip


def above_chance(group: pd.DataFrame) -> bool:
    """The gate of the module rule: the mean of every defined score at this (model, hook) is
    above 0 by more than its 95% t half-width, i.e. the explainer and simulator beat chance."""
    scores = group["score"].dropna()
    return len(scores) >= 2 and scores.mean() - ci95_half_width(scores) > 0


def comparison(group: pd.DataFrame) -> pd.DataFrame:
    """The reference against each other architecture of one (model, hook) (module rule): the
    pooled row first (``target_l0`` NaN), then one row per target L0 either has (none when
    there is only one: it would repeat the pooled row). When the scores as a whole are not
    above chance (``above_chance``) every verdict is ``AT_CHANCE``: differences between
    architectures measured by a simulator that predicts nothing are not evidence."""
    saes = architectures(group)
    if len(saes) < 2:
        return pd.DataFrame()
    ref, rows = reference(saes), []
    for other in (s for s in saes if s != ref):
        rows.append(_compare(ref, other, group, math.nan))
        pair = group[group["sae"].isin([ref, other])]
        targets = sorted(pair["target_l0"].dropna().unique())
        for target in targets if len(targets) > 1 else []:
            rows.append(_compare(ref, other, pair[pair["target_l0"] == target], target))
    table = pd.DataFrame(rows)
    if not above_chance(group):
        table["verdict"] = AT_CHANCE
    return table


def comparison_markdown(table: pd.DataFrame) -> str:
    lines = ["| A | B | target L0 | latents A | latents B | mean A | mean B | "
             "A - B (Welch 95%) | df | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in table.itertuples(index=False):
        target = "all (pooled)" if math.isnan(r.target_l0) else f"{r.target_l0:g}"
        means = [f"{m:.3f}" if math.isfinite(m) else "n/a" for m in (r.mean_a, r.mean_b)]
        df = f"{r.df:.1f}" if math.isfinite(r.df) else "n/a"
        lines.append(f"| {name(r.a)} | {name(r.b)} | {target} | {r.n_a} | {r.n_b} | "
                     f"{means[0]} | {means[1]} | {_cell(r.diff, r.ci95)} | {df} | "
                     f"{r.verdict} |")  # fmt: skip
    return "\n".join(lines)


def examples_markdown(group: pd.DataFrame) -> str:
    """Markdown: per architecture, the explanation of its best-scored latent (text escaped)."""
    lines = ["| architecture | run | latent | score | explanation |", "|---|---|---:|---:|---|"]
    for sae in architectures(group):
        defined = group[(group["sae"] == sae) & group["score"].notna()]
        if defined.empty:
            continue
        r = defined.loc[defined["score"].idxmax()]
        latent = f"{r['latent']:.0f}" if math.isfinite(r["latent"]) else "n/a"
        lines.append(f"| {name(sae)} | {escape(r['run_id'])} | {latent} | {r['score']:.3f} | "
                     f"{escape(r['explanation'])} |")  # fmt: skip
    return "\n".join(lines)


def _distinct(frame: pd.DataFrame, column: str) -> str:
    values = sorted({str(v) for v in frame[column] if str(v).strip()})
    return ", ".join(f"`{escape(v, 80)}`" for v in values) or "not recorded"


def _intro(frame: pd.DataFrame) -> list[str]:
    undefined = int(frame["score"].isna().sum())
    return [TITLE, "",
            "Per latent, Bills et al. (2023)'s correlation score: the Pearson r between the "
            "activations a simulator predicts from the latent's explanation and its true "
            "activations on held-out text. An undefined score (constant simulation or constant "
            f"truth; {undefined} of {len(frame)} latents here) is counted, never averaged in. "
            f"Explainer: {_distinct(frame, 'explainer')}; simulator: "
            f"{_distinct(frame, 'simulator')}. With the bundled 135M model as explainer the "
            "scores test the plumbing; they are not the paper's numbers.", "",
            f"Claim: {CLAIM}. Rule: the reference architecture (JumpReLU, else the first "
            "present) against each other one at the same model and hook; the defined scores "
            "of all latents pooled over target L0s and seeds (then per target L0); mean A - "
            "mean B with a Welch 95% interval (Welch-Satterthwaite df, rounded down). "
            f"`{HOLDS}` when the interval contains 0, `JumpReLU lower` / `JumpReLU higher` when "
            f"it excludes 0, `{INCONCLUSIVE}` below 2 defined scores on either side. The unit "
            "is the latent: the latents of one SAE are not independent draws of the "
            "architecture and seeds are pooled, so the interval says whether these scored "
            "latents differ, not how a retrained SAE would. Gate: when the mean of all "
            "defined scores at a hook is not above 0 by more than its 95% interval (the "
            f"explainer and simulator do not beat chance), every verdict there is `{AT_CHANCE}`."]  # fmt: skip


def interp_markdown(frame: pd.DataFrame) -> str:
    """The whole summary: per (model, hook) the summary, the bands, the comparison and the
    best-scored explanation of each architecture."""
    parts = _intro(frame)
    if frame.empty:
        return "\n".join([*parts, "", "No scored latents."]) + "\n"
    for (model, hook), group in frame.groupby(list(GROUP), dropna=False, sort=True):
        title = " ".join(escape(part) for part in (model, hook) if str(part).strip())
        parts += ["", f"## {title or 'model and hook not recorded'}", "",
                  "Score per architecture and target L0 (mean ± 95% t-interval over latents):",
                  "", summary_markdown(summary(group)), "",
                  "Mean score per firing-frequency band (n: defined scores):", "",
                  band_markdown(group)]  # fmt: skip
        table = comparison(group)
        if not table.empty:
            parts += ["", f"{CLAIM} (A - B in mean score):", "", comparison_markdown(table)]
        parts += ["", "Best-scored latent per architecture:", "", examples_markdown(group)]
    return "\n".join(parts) + "\n"


def _styles(saes: list[str]) -> dict[str, tuple[str, str]]:
    others = iter(OTHER_STYLES * 10)
    return {sae: STYLE.get(sae) or next(others) for sae in saes}


def _violins(ax: Axes, group: pd.DataFrame, styles: dict[str, tuple[str, str]]) -> None:
    saes = architectures(group)
    for x, sae in enumerate(saes, start=1):
        scores = group.loc[group["sae"] == sae, "score"].dropna().to_numpy()
        colour, marker = styles[sae]
        if len(np.unique(scores)) >= 2:  # a density needs two distinct values
            parts = ax.violinplot([scores], positions=[x], showextrema=False, widths=0.8)
            bodies: Any = parts["bodies"]  # a list of PolyCollection (typed as one Collection)
            for body in bodies:
                body.set(facecolor=colour, edgecolor=colour, alpha=0.35)
        if len(scores):
            ax.scatter([x], [scores.mean()], marker=marker, s=50, color=colour,
                       edgecolors="black", zorder=3)  # fmt: skip
    ax.set_xticks(range(1, len(saes) + 1), [name(s) for s in saes])
    ax.set_xlim(0.4, len(saes) + 0.6)
    ax.axhline(0, color="grey", linewidth=0.8, alpha=0.6)
    data_ylim(ax, group["score"].dropna())


def plot_interp(frame: pd.DataFrame) -> Figure:
    """One panel per (model, hook): a violin of the defined scores per architecture, its mean
    marked with the architecture's marker; the y-range is the data's."""
    groups = list(frame.groupby(list(GROUP), dropna=False, sort=True))
    ncols = max(1, min(3, len(groups)))
    nrows = max(1, math.ceil(len(groups) / ncols))
    width = max(4.0, 1.2 * frame["sae"].nunique() + 1.5)
    fig = Figure(figsize=(width * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    styles = _styles(architectures(frame))
    for ax, ((model, hook), group) in zip(axes, groups):
        _violins(ax, group, styles)
        ax.set_title(f"{model} {hook}".strip())
        ax.set_ylabel("score (Pearson r)")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    return fig


def write_interp(csv: Path, out: Path) -> list[Path]:
    """``out``/interp.md and ``out``/fig_interp.{png,pdf} from ``csv``; the paths written."""
    frame = read_interp_csv(csv)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "interp.md"
    path.write_text(interp_markdown(frame))
    return [path, *save(plot_interp(frame), out / "fig_interp")]
