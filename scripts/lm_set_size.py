"""How large the LM set must be: which paired differences between architectures a results
folder's LM set resolves, and whether a smaller LM set would still resolve them.

    python scripts/lm_set_size.py RESULTS_DIR [--sizes 1,2,4,8] [--points 28.3,40,56.6] [--save]

Reads each run's `lm_windows.npy` (per LM window: clean and spliced CE sums and the scored
positions; `benchmark.evaluate.WINDOW_COLUMNS`). A run without it but with its saved SAE
(`sae.safetensors`) is evaluated again on its LM set, all such runs in one shared pass, and
the recomputed delta LM loss is checked against its record; --save writes the recomputed
lm_windows.npy into those run folders (atomically).

For every pair of architectures and seed, at each claim point L (the report's `claim_points`
of the runs' targets, or --points): each window's CE difference d_w = spliced_w - clean_w is
interpolated linearly in log splice_l0 between the two runs of the curve around L (as table 1
interpolates delta LM loss), the paired difference is D = sum_w (d_w^A - d_w^B) / sum_w n_w,
and its standard error the window-cluster ratio SE (`benchmark.evaluate.ratio_se`). A pair
*separates* when |D| > t(0.975, W - 1) SE. For an LM set 1/k the size (each --sizes k), the W
windows are split into k interleaved subsets (every k-th window, offsets 0 .. k-1: each subset
still spread over the split, as `benchmark.data.eval_windows` spreads a smaller set); a
separation *holds at 1/k* when every one of the k subsets separates with the same sign. The
last line names the smallest LM set at which every separation of the full set holds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmark.evaluate import ratio_se
from benchmark.fileio import save_npy_atomic
from benchmark.report.claims import claim_points
from benchmark.report.stats import t_quantile_975


def read_runs(results: Path) -> list[dict]:
    """One dict per finished run: folder, architecture, seed, target and LM-set L0."""
    runs = []
    for path in sorted(results.rglob("result.json")):
        r = json.loads(path.read_text())
        if r.get("status", "complete") != "complete" or r.get("splice_l0") is None:
            continue
        runs.append({"dir": path.parent, "sae": r["choices"]["sae"], "seed": r["config"]["seed"],
                     "target_l0": r.get("target_l0"), "splice_l0": float(r["splice_l0"]),
                     "delta_lm_loss": float(r["delta_lm_loss"])})  # fmt: skip
    return runs


def recompute_windows(runs: list[dict], save: bool = False) -> None:
    """Evaluate the runs lacking lm_windows.npy again, from their saved SAEs, in one pass."""
    from omegaconf import OmegaConf

    from benchmark import models
    from benchmark.saes import load_sae
    from benchmark.specs import EvalSpec, SourceSpec
    from benchmark.stages import evaluate_stage, held_out_stores

    cfg = OmegaConf.load(runs[0]["dir"] / "config.yaml")
    source, ev = SourceSpec.of(cfg), EvalSpec.of(cfg.eval)
    dev = models.resolve_device("cpu")
    lm = models.load_model(source.model, dev, source.cache_dir)
    members, limits = [], {}
    for run in runs:
        rs = SourceSpec.of(OmegaConf.load(run["dir"] / "config.yaml"))
        hook = models.hook_name(rs.model, rs.layer, rs.site)
        limits[hook] = held_out_stores(lm, rs, [rs.site], ev.n_activation_tokens)[
            rs.site.name
        ].max_norm
        members.append((load_sae(run["dir"], dev), hook))
    windows: list[torch.Tensor] = []
    metrics = evaluate_stage(source, ev, members, lm, dev, limits, windows)
    for run, m, w in zip(runs, metrics, windows, strict=True):
        if not math.isclose(m["delta_lm_loss"], run["delta_lm_loss"], rel_tol=1e-6, abs_tol=1e-9):
            sys.exit(f"error: {run['dir'].name}: re-evaluated delta LM loss {m['delta_lm_loss']} "
                     f"differs from its record's {run['delta_lm_loss']}")  # fmt: skip
        run["windows"] = w.numpy()
        if save:
            save_npy_atomic(run["dir"] / "lm_windows.npy", run["windows"])


def load_windows(runs: list[dict], save: bool = False) -> None:
    missing = []
    for run in runs:
        path = run["dir"] / "lm_windows.npy"
        if path.exists():
            run["windows"] = np.load(path, allow_pickle=False)
        elif (run["dir"] / "sae.safetensors").exists():
            missing.append(run)
        else:
            sys.exit(f"error: {run['dir']}: neither lm_windows.npy nor sae.safetensors")
    if missing:
        print(f"re-evaluating {len(missing)} run(s) without lm_windows.npy ...", flush=True)
        recompute_windows(missing, save)


def window_deltas(curve: list[dict], point: float) -> np.ndarray | None:
    """Per-window CE-difference sums d_w at L0 = point, linear in log splice_l0 between the
    curve's runs around it; None outside the curve's measured range (no extrapolation)."""
    curve = sorted(curve, key=lambda r: r["splice_l0"])
    for lo, hi in zip(curve, curve[1:]):
        if lo["splice_l0"] <= point <= hi["splice_l0"]:
            t = math.log(point / lo["splice_l0"]) / math.log(hi["splice_l0"] / lo["splice_l0"])
            d = [r["windows"][:, 1] - r["windows"][:, 0] for r in (lo, hi)]
            return (1 - t) * d[0] + t * d[1]
    return None


def separation(d: np.ndarray, n: np.ndarray) -> tuple[float, float, bool]:
    """(paired difference, its SE, whether it separates at 95%)."""
    diff = float(d.sum() / n.sum())
    se = ratio_se(torch.from_numpy(d), torch.from_numpy(n))
    return diff, se, abs(diff) > t_quantile_975(len(d) - 1) * se


def size_table(runs: list[dict], points: list[float], sizes: list[int]) -> pd.DataFrame:
    rows = []
    archs = sorted({r["sae"] for r in runs})
    for seed in sorted({r["seed"] for r in runs}):
        curves = {a: [r for r in runs if r["sae"] == a and r["seed"] == seed] for a in archs}
        n = curves[archs[0]][0]["windows"][:, 2]
        for point, (a, b) in ((p, pair) for p in points for pair in combinations(archs, 2)):
            da, db = window_deltas(curves[a], point), window_deltas(curves[b], point)
            if da is None or db is None:
                continue
            diff, se, sep = separation(da - db, n)
            row = {"seed": seed, "L0": point, "pair": f"{a} - {b}", "diff": diff, "se": se,
                   "separates": sep}  # fmt: skip
            for k in sizes:
                if len(n) // k < 2:  # one window has no standard error
                    row[f"1/{k}: {len(n) // k} windows"] = "n/a"
                    continue
                parts = [separation((da - db)[o::k], n[o::k]) for o in range(k)]
                same = all(s and math.copysign(1, d) == math.copysign(1, diff) for d, _, s in parts)
                row[f"1/{k}: {len(n) // k} windows"] = f"{sum(s for *_, s in parts)}/{k}" + (
                    " holds" if same else "")  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--sizes", default="1,2,4,8", help="LM-set fractions 1/k to test (k values)")
    ap.add_argument("--points", default=None, help="L0 points (default: the report's claim points)")
    ap.add_argument("--save", action="store_true", help="write recomputed lm_windows.npy files")
    a = ap.parse_args()
    runs = read_runs(a.results)
    if not runs:
        sys.exit(f"error: {a.results}: no finished run with LM metrics")
    load_windows(runs, a.save)
    targets = sorted({float(r["target_l0"]) for r in runs if r["target_l0"] is not None})
    points = [float(p) for p in a.points.split(",")] if a.points else claim_points(targets)
    sizes = [int(k) for k in a.sizes.split(",")]
    df = size_table(runs, points, sizes)
    n_tokens = int(runs[0]["windows"][:, 2].sum())
    print(f"{len(runs)} runs; LM set: {len(runs[0]['windows'])} windows, {n_tokens:,} scored "
          f"positions; points {points}")  # fmt: skip
    print(df.round({"diff": 4, "se": 4}).to_markdown(index=False))
    full = df[df["separates"]]
    for k in sorted(sizes, reverse=True):
        col = next(c for c in df.columns if c.startswith(f"1/{k}:"))
        if len(full) and full[col].str.endswith("holds").all():
            print(f"\nsmallest LM set that keeps all {len(full)} separation(s) of the full set: "
                  f"{col} (~{n_tokens // k:,} scored positions)")  # fmt: skip
            return
    print("\nno smaller LM set keeps every separation of the full set")


if __name__ == "__main__":
    main()
