"""Where a sweep's wall time goes, with and without fan-out, measured in the same run.

    python scripts/bench_sweep.py                        # the quickstart, both ways
    python scripts/bench_sweep.py --modes fanout         # one way only
    python scripts/bench_sweep.py --experiment smoke     # a quick check of the script

For each mode the preset runs from nothing (a fresh cache folder: model conversion and harvest
included, as on a fresh install) through `python -m benchmark.run -m +experiment=<name>`, then
`python -m benchmark.report` on its results (with `--l0-tolerance 0.05`, as `make quickstart`).
Modes: `fanout` (the default launcher: the jobs that share an activation source run as one
group) and `separate` (`hydra.launcher.group=false`: one job after another, as before fan-out).

The split comes from the `stage_seconds` each result records (setup = model load and
conversion, harvest = both activation splits, train = the trainers' own step time, evaluate =
held-out activation metrics and the LM passes); a group's shared stages count once. `other` is
the sweep's wall time minus those stages: Python and library imports, Hydra composition, job
bookkeeping and writing the results. The last line compares the two modes' metrics: grouping
must change no number. Run it on a quiet machine: timings are wall clock.

Each stage against its bound (the second table, per mode): the stage's arithmetic as
`benchmark.plan` counts it for the same sweep (harvest and LM evaluation: the model's forward
FLOPs, as the mode runs them; training: 12 d_in d_sae FLOPs per token and SAE, the dense
step's six products, per architecture; activation metrics: 4 d_in d_sae per held-out token),
divided by this machine's fp32 matmul rate measured in the same run (`benchmark.plan`'s
`matmul_flops`, before the mode runs). `x bound` = measured / bound: 1.0 would be every FLOP at
the matmul's rate; a sparse training step can beat the dense bound (< 1). Setup, report and
other have no arithmetic bound.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("setup", "harvest", "train", "evaluate")
EVAL_PARTS = ("activation_metrics", "lm_eval")  # evaluate's two parts (benchmark/run.py)
METRICS = ("l0", "fvu", "delta_lm_loss", "frac_dead")


def overrides(experiment: str, mode: str, results: Path, cache: Path) -> list[str]:
    return [f"+experiment={experiment}", f"results_dir={results}", f"cache_dir={cache}",
            "progress=false", f"hydra.launcher.group={'true' if mode == 'fanout' else 'false'}"]  # fmt: skip


def stage_bounds(plan: dict, mode: str) -> tuple[float, dict[str, float], dict[str, float]]:
    """(fp32 matmul FLOP/s, FLOPs per stage, training FLOPs per architecture) from a plan."""
    flops = plan["flops"]
    kind = "fanout" if mode == "fanout" else "independent"
    per_arch: dict[str, float] = {}
    sae_of = {Path(j["run_dir"]).name: j["sae"] for j in plan["jobs"]}
    for run, f in flops["sae_training_per_sae"].items():
        per_arch[sae_of[run]] = per_arch.get(sae_of[run], 0.0) + f
    stages = {
        "harvest": flops[f"harvest_{kind}"],
        "train": flops["sae_training_total"],
        "activation_metrics": flops["sae_activation_metrics"],
        "lm_eval": flops[f"lm_eval_{kind}"],
    }
    return float(plan["throughput"]["matmul_flops_per_s"]["float32"]), stages, per_arch


def bound_table(rate: float, flops: dict[str, float], per_arch: dict[str, float],
                measured: dict[str, float], arch_seconds: dict[str, float]) -> pd.DataFrame:  # fmt: skip
    """Per stage (and training per architecture): measured s, FLOPs, bound s, measured / bound."""
    rows = [(stage, measured.get(stage, float("nan")), f) for stage, f in flops.items()]
    rows[2:2] = [
        (f"  train {a}", arch_seconds.get(a, float("nan")), f) for a, f in per_arch.items()
    ]
    df = pd.DataFrame(rows, columns=["stage", "measured s", "FLOPs"]).set_index("stage")
    df["bound s"] = df["FLOPs"] / rate
    df["x bound"] = df["measured s"] / df["bound s"]
    return df


def run_mode(
    experiment: str, mode: str, work: Path
) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame]:
    from benchmark.plan import Options, build_plan

    results, cache = work / mode / "results", work / mode / "cache"
    args = overrides(experiment, mode, results, cache)
    plan = build_plan(args, Options(multirun=True, timing=False))
    rate, flops, per_arch = stage_bounds(plan, mode)
    cmd = [sys.executable, "-m", "benchmark.run", "-m", *args]
    t0 = time.perf_counter()
    sweep = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sweep_s = time.perf_counter() - t0
    if sweep.returncode != 0:
        sys.exit(f"{mode}: the sweep failed:\n{sweep.stdout[-3000:]}\n{sweep.stderr[-3000:]}")
    t0 = time.perf_counter()
    report = subprocess.run(
        [sys.executable, "-m", "benchmark.report", str(results / experiment), "--out",
         str(work / mode / "report"), "--l0-tolerance", "0.05"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    report_s = time.perf_counter() - t0
    if report.returncode != 0:
        sys.exit(f"{mode}: the report failed:\n{report.stderr[-3000:]}")
    records = [
        json.loads(p.read_text()) for p in sorted((results / experiment).glob("*/result.json"))
    ]
    split = dict.fromkeys((*STAGES, *EVAL_PARTS), 0.0)
    arch_seconds: dict[str, float] = {}
    seen: set[str] = set()
    for r in records:
        sae = r["choices"]["sae"]
        arch_seconds[sae] = arch_seconds.get(sae, 0.0) + float(r["train_seconds"])
        group = r.get("trained_in_group") or r["run_id"]  # a group's shared stages count once
        if group in seen:
            continue
        seen.add(group)
        for stage in (*STAGES, *EVAL_PARTS):
            split[stage] += float((r.get("stage_seconds") or {}).get(stage, 0.0))
    split["other"] = sweep_s - sum(split[s] for s in STAGES)
    split["report"] = report_s
    split["total"] = sweep_s + report_s
    split["jobs"] = len(records)
    split["groups"] = len(seen)
    split["peak_memory_gb"] = max(r.get("peak_memory_mb") or 0 for r in records) / 1024
    table = pd.DataFrame([{"run_id": r["run_id"], **{m: r[m] for m in METRICS}} for r in records])
    bounds = bound_table(rate, flops, per_arch, split, arch_seconds)
    bounds.attrs["matmul_flops_per_s"] = rate
    return split, table.set_index("run_id"), bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="quickstart")
    ap.add_argument("--modes", default="fanout,separate", help="comma-separated: fanout, separate")
    ap.add_argument(
        "--work", default=None, help="folder for results and caches (default: a temp dir)"
    )
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fanout", "separate")]
    if bad:
        sys.exit(f"error: --modes {','.join(bad)}: valid modes are fanout, separate")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    print(f"{args.experiment} from a fresh cache, results under {work}", flush=True)
    splits, tables, bounds = {}, {}, {}
    for mode in modes:
        print(f"  running {mode} ...", flush=True)
        splits[mode], tables[mode], bounds[mode] = run_mode(args.experiment, mode, work)
    df = pd.DataFrame(splits).T
    cols = [*STAGES, "report", "other", "total"]
    print()
    print(f"wall seconds per stage ({args.experiment}):")
    print(df[cols].round(1).to_markdown())
    print()
    print(df[["jobs", "groups", "peak_memory_gb"]].round(2).to_markdown())
    for mode in modes:
        b = bounds[mode]
        print(f"\neach stage against its bound ({mode}; fp32 matmul measured at "
              f"{b.attrs['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s in this run):")  # fmt: skip
        shown = b.assign(FLOPs=b["FLOPs"].map(lambda f: f"{f:.3g}"))
        print(shown.round({"measured s": 1, "bound s": 1, "x bound": 2}).to_markdown())
    if len(modes) == 2:
        a, b = (splits[m]["total"] for m in modes)
        print(f"\n{modes[1]} / {modes[0]} total wall time: {b / a:.2f}x")
        diff = (tables[modes[0]] - tables[modes[1]]).abs().max()
        print("largest metric difference between the modes: "
              + ", ".join(f"{m} {diff[m]:.2e}" for m in METRICS))  # fmt: skip


if __name__ == "__main__":
    main()
