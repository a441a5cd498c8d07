"""The command line (`python -m benchmark.run`): a user error, whether Hydra finds it before the
job or the suite finds it inside, is exactly one `error:` line on stderr and exit status 2, with
no traceback; a bug keeps its traceback and status 1 (benchmark/cli_errors.py). ~5 s each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SAE_NAMES, one_error_line


def cli(*args: str, env: dict[str, str] | None = None, code: str | None = None):
    cmd = (
        [sys.executable, "-c", code, *args]
        if code
        else [sys.executable, "-m", "benchmark.run", *args]
    )
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sae=nope"], f"error: sae=nope: no such option; valid: {', '.join(SAE_NAMES)}"),
        (["+experiment=nope"], "error: experiment=nope: no such option; valid: gemma2_9b_full, "),
        (["train.lrr=1"], "error: train.lrr=1: no such key 'train.lrr'"),
        (["train.lr=[1,"], "error: train.lr=[1,: cannot parse this override"),
    ],
)  # fmt: skip
def test_hydra_errors_are_one_line_and_status_2(tmp_path, args, expected):
    line = one_error_line(cli(*args, f"results_dir={tmp_path}"))
    assert line.startswith(expected), line


def test_an_unusable_results_dir_or_cache_dir_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    line = one_error_line(cli(f"results_dir={a_file}/results"))  # Hydra cannot make the run folder
    assert line.startswith(f"error: results_dir={a_file}/results: cannot create"), line
    line = one_error_line(cli(f"results_dir={tmp_path}", f"cache_dir={a_file}"))  # the job's check
    assert line == f"error: cache_dir={a_file}: is a file, not a folder", line


def test_a_bug_keeps_its_traceback_and_status_1(tmp_path):
    code = (  # a bug inside the job: check_run raises a RuntimeError
        "import runpy, sys, benchmark.validate as v\n"
        "def boom(*a, **k): raise RuntimeError('a bug')\n"
        "v.check_run = boom\n"
        "sys.argv = ['benchmark.run', *sys.argv[1:]]\n"
        "runpy.run_module('benchmark.run', run_name='__main__', alter_sys=True)\n"
    )
    proc = cli(f"results_dir={tmp_path}", code=code)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = cli("sae=nope", f"results_dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert (
        proc.returncode == 1
        and "Traceback" in proc.stderr
        and "MissingConfigException" in proc.stderr
    )
