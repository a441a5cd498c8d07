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
METRICS = ("l0", "fvu", "delta_lm_loss", "frac_dead")


def run_mode(experiment: str, mode: str, work: Path) -> tuple[dict[str, float], pd.DataFrame]:
    results, cache = work / mode / "results", work / mode / "cache"
    cmd = [sys.executable, "-m", "benchmark.run", "-m", f"+experiment={experiment}",
           f"results_dir={results}", f"cache_dir={cache}", "progress=false",
           f"hydra.launcher.group={'true' if mode == 'fanout' else 'false'}"]  # fmt: skip
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
    split = dict.fromkeys(STAGES, 0.0)
    seen: set[str] = set()
    for r in records:
        group = r.get("trained_in_group") or r["run_id"]  # a group's shared stages count once
        if group in seen:
            continue
        seen.add(group)
        for stage in STAGES:
            split[stage] += float((r.get("stage_seconds") or {}).get(stage, 0.0))
    split["other"] = sweep_s - sum(split[s] for s in STAGES)
    split["report"] = report_s
    split["total"] = sweep_s + report_s
    split["jobs"] = len(records)
    split["groups"] = len(seen)
    split["peak_memory_gb"] = max(r.get("peak_memory_mb") or 0 for r in records) / 1024
    table = pd.DataFrame([{"run_id": r["run_id"], **{m: r[m] for m in METRICS}} for r in records])
    return split, table.set_index("run_id")


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
    splits, tables = {}, {}
    for mode in modes:
        print(f"  running {mode} ...", flush=True)
        splits[mode], tables[mode] = run_mode(args.experiment, mode, work)
    df = pd.DataFrame(splits).T
    cols = [*STAGES, "report", "other", "total"]
    print()
    print(f"wall seconds per stage ({args.experiment}):")
    print(df[cols].round(1).to_markdown())
    print()
    print(df[["jobs", "groups", "peak_memory_gb"]].round(2).to_markdown())
    if len(modes) == 2:
        a, b = (splits[m]["total"] for m in modes)
        print(f"\n{modes[1]} / {modes[0]} total wall time: {b / a:.2f}x")
        diff = (tables[modes[0]] - tables[modes[1]]).abs().max()
        print("largest metric difference between the modes: "
              + ", ".join(f"{m} {diff[m]:.2e}" for m in METRICS))  # fmt: skip


if __name__ == "__main__":
    main()
