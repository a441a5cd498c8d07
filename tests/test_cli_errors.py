"""User errors of the command lines end in one line: `error: <message>` on stderr and exit status
2, found before heavy work (the model, the harvest); Ctrl-C ends in one line and status 130.

Covers what used to end in a traceback: a device this machine lacks, a SLURM launcher without
SLURM, a read-only results or output folder, an empty results folder for the report, Ctrl-C,
broken run folders for export / examples (checked before the model loads), an SAE file its
loader cannot read, and an `hf://` sae.path with the hub out of reach (seconds, naming
sae.path). No test makes a network request: the "hub" is a socket on 127.0.0.1 that never
answers, or HF_HUB_OFFLINE.

Read-only folders: the tests run as root, and root ignores permission bits (chmod a-w changes
nothing for it), so a folder is made truly read-only by a read-only bind mount in a private
mount namespace (`unshare -m`; skipped where that is not allowed), or a folder under /sys,
which not even root can write in. Subprocesses run from the checkout's root with this process's
environment (PYTHONPATH included), as tests/test_cli.py starts them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmark import cli_errors, hub, identity, models
from benchmark import examples as examples_cli
from benchmark import export as export_cli
from benchmark.errors import ConfigError
from benchmark.report import __main__ as report_cli
from benchmark.run import check_writable, loader_error, plan_run, preflight
from benchmark.saes import build_sae, sae_node, save_sae
from tests.helpers import ROOT, compose_config, one_error_line, run_cli

SMOKE_RUN = ["+experiment=smoke", "hydra.mode=RUN"]


def captured_error(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of an in-process CLI call: exactly one line, `error: ...`."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---- read-only folders that stay read-only for root ----


def _ro_prefix(folder: Path) -> tuple[str, ...]:
    """A command prefix running the rest with `folder` bind-mounted read-only (private mount
    namespace: nothing outside the command sees the mount)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ("unshare", "-m", "sh", "-c", script, str(folder))


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory):
    """`read_only(folder)`: the prefix above; skips where unshare + bind mounts are refused."""
    probe = tmp_path_factory.mktemp("ro_probe")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    done = subprocess.run([*_ro_prefix(probe), "touch", str(probe / "x")], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    if done.returncode == 0 or "Read-only file system" not in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()[:200]}")
    return _ro_prefix


def unwritable_sys_folder() -> Path:
    """An existing folder that even root cannot create files in (sysfs)."""
    folder = Path("/sys/kernel")
    if not folder.is_dir() or cli_errors.unwritable(folder) is None:
        pytest.skip("no unwritable /sys/kernel here")
    return folder


# ---- 1. a device this machine does not have ----


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_before_the_model(tmp_path):
    proc = run_cli(*SMOKE_RUN, "device=cuda", f"results_dir={tmp_path}")
    line = one_error_line(proc)
    assert line.startswith("error: device=cuda: CUDA is not available on this machine (torch "), (
        line
    )
    assert line.endswith("; use device=auto or cpu"), line
    assert "Loading weights" not in proc.stderr  # the model never loaded
    assert not list(tmp_path.glob("*/*/config.yaml"))  # run_group never started


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_resolve_device_names_the_key_and_the_fix(name):
    device = torch.device(name)
    if models.device_unavailable(device) is None:
        pytest.skip(f"{name} exists here")
    for key in ("device", "--device"):
        with pytest.raises(ConfigError) as err:
            models.resolve_device(name, key)
        message = str(err.value)
        assert message.startswith(f"{key}={name}: "), message
        assert "not available on this machine" in message or "CUDA device(s)" in message
        assert message.endswith(f"; use {key}=auto or cpu") and "\n" not in message
    assert models.resolve_device("cpu") == torch.device("cpu")


# ---- 2. a SLURM launcher where there is no SLURM ----


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    """hydra/launcher=slurm: submitit's "Could not detect srun" as one line, no job started."""
    proc = run_cli("-m", "hydra/launcher=slurm", "+experiment=smoke",
                   f"results_dir={tmp_path / 'results'}", env={"PATH": str(tmp_path)})  # fmt: skip
    assert one_error_line(proc) == (
        "error: hydra/launcher=slurm: no SLURM here (no srun/sbatch on PATH); use "
        "hydra/launcher=local (processes on this machine) or slurm_local to test the SLURM path"
    )
    assert "[sweep] job" not in proc.stdout
    assert not list(tmp_path.rglob(".submitit"))


def test_slurm_fanout_checks_for_slurm_before_composing_jobs(tmp_path, monkeypatch):
    """The fan-out SLURM launcher refuses before composing any job (its hydra_context is not
    even set here); an srun without sbatch is no SLURM either."""
    from hydra_plugins.benchmark_fanout.fanout_launcher import SlurmFanoutLauncher

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")  # a stand-in, never run
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["benchmark.run", "-m", "hydra/launcher=slurm_fanout"])
    launcher = SlurmFanoutLauncher(max_saes=2, split_sites=True, submitit_folder=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        launcher.launch([["sae=topk"]], 0)
    assert cli_errors.describe(err.value) == (
        "hydra/launcher=slurm_fanout: no SLURM here (no sbatch on PATH); use hydra/launcher=local "
        "(processes on this machine) or slurm_local_fanout to test the SLURM path"
    )


# ---- 3. read-only results and output folders ----


def test_report_into_a_read_only_folder_suggests_out(tmp_path, read_only):
    """(a) `benchmark.report DIR` without --out, DIR read-only: one line naming DIR and --out."""
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    runs = tmp_path / "runs"
    proc = run_cli(str(runs), module="benchmark.report", prefix=read_only(runs))
    assert one_error_line(proc) == (
        f"error: {runs}: cannot write the report into {runs / 'report'} (Read-only file system); "
        "give a writable folder with --out DIR"
    )
    assert not (runs / "report").exists()


def test_report_out_that_cannot_be_written(tmp_path, capsys):
    folder = unwritable_sys_folder()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(SystemExit) as exit_:
        report_cli.main([str(tmp_path), "--out", str(folder / "report")])
    assert exit_.value.code == 2
    assert captured_error(capsys).startswith(f"error: --out {folder / 'report'}: cannot write")


def test_sweep_into_a_read_only_results_dir_is_one_line(tmp_path, read_only):
    """(b) a -m sweep whose results_dir is read-only: Hydra's multirun.yaml cannot be written."""
    results = tmp_path / "results"
    (results / "smoke").mkdir(parents=True)
    proc = run_cli("-m", "+experiment=smoke", f"results_dir={results}", prefix=read_only(results))
    line = one_error_line(proc)
    assert line.startswith(
        f"error: results_dir={results}: cannot write {results / 'smoke' / 'multirun.yaml'}: "
        "Read-only file system; "
    ), line
    assert f"python -m benchmark.report {results} --out <writable folder>" in line


def test_rerun_of_a_finished_run_in_a_read_only_folder_is_one_line(tmp_path, read_only):
    """(c) Hydra writes run.log and .hydra/ into a run's folder on every launch, a finished
    run's too, so the re-run cannot be a silent skip there: one line naming results_dir."""
    results = tmp_path / "results"
    cfg = compose_config(["+experiment=smoke", f"results_dir={results}"])
    out = results / "smoke" / identity.run_name(cfg, "jumprelu")
    out.mkdir(parents=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    (out / "result.json").write_text(json.dumps({"status": "complete", "delta_lm_loss": 0.1}))
    proc = run_cli(*SMOKE_RUN, f"results_dir={results}", prefix=read_only(results))
    line = one_error_line(proc)
    assert line.startswith(
        f"error: results_dir={results}: cannot write {out / 'run.log'}: Read-only file system; "
    ), line


def test_check_writable_really_writes(tmp_path):
    """os.access says yes to root on /sys/kernel; a file cannot be created there."""
    folder = unwritable_sys_folder()
    cfg = compose_config([f"results_dir={folder}", f"cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"^results_dir={folder}: this folder is not writable"):
        check_writable(cfg)
    check_writable(compose_config([f"results_dir={tmp_path}", f"cache_dir={tmp_path}"]))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


# ---- 4. the report of a folder without results ----


def test_report_of_an_empty_or_missing_folder(tmp_path, capsys):
    for folder, expected in [
        (tmp_path, f"error: {tmp_path}: no result.json under this folder (run a sweep first, "
                   "or point at results/<experiment>)"),
        (tmp_path / "nope", f"error: {tmp_path / 'nope'}: no such folder"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            report_cli.main([str(folder)])
        assert exit_.value.code == 2
        assert captured_error(capsys) == expected
    assert not (tmp_path / "report").exists()


# ---- 5. Ctrl-C ----


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.integration
def test_ctrl_c_during_a_run_is_one_line_and_status_130(tmp_path):
    """SIGINT once the job has started (loading the model or harvesting): status 130, the last
    stderr line says how to resume, no traceback, and no failed result.json."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "benchmark.run", *SMOKE_RUN, f"results_dir={tmp_path}",
           "progress=false"]  # fmt: skip
    # The child gets the default SIGINT disposition: a shell without job control starts a
    # background command (`make test &`) with SIGINT ignored, which would be inherited and
    # make Python skip its Ctrl-C handler (the run would then finish with status 0).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_default_sigint)  # fmt: skip
    watchdog = threading.Timer(90, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[sweep] job 0" in line and "started" in line:
                break
        time.sleep(1.0)  # inside the job
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1] == cli_errors.RESUME, err[-3000:]
    assert len(lines) < 10, err[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert not any(r.get("status") == "failed" for r in results)


def test_ctrl_c_in_report_export_examples(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"status": "complete", "hook": "h"}))
    monkeypatch.setattr(report_cli, "load_results", interrupt)
    monkeypatch.setattr(export_cli, "export", interrupt)
    monkeypatch.setattr(examples_cli, "examples", interrupt)
    for main, argv in [
        (report_cli.main, [str(tmp_path)]),
        (export_cli.main, [str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path)]),
        (examples_cli.main, [str(tmp_path / "run"), "--top", "3"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 130
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("interrupted: "), lines
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback instead
    with pytest.raises(KeyboardInterrupt):
        report_cli.main([str(tmp_path)])


# ---- 6. broken run folders: export and examples fail before the model ----

D_IN, D_SAE = 576, 32


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the runner writes it (TopK SAE, composed config, result.json)."""
    cfg = compose_config(["sae=topk", "sparsity=l0_10"])
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_sae(build_sae(cfg.sae, D_IN, D_SAE), run, sae_node(cfg.sae, D_IN, D_SAE))
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    result = {"run_id": "run", "status": "complete", "hook": "blocks.3.hook_resid_post",
              "model": "smollm2_135m", "d_in": D_IN, "d_sae": D_SAE}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    return run


@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", load_model)


def _break(run: Path, how: str) -> str:
    """Break `run` one way; returns what the error line must contain."""
    if how == "no sae_config.yaml":
        (run / "sae_config.yaml").unlink()
        return str(run / "sae_config.yaml")
    if how == "no sae.safetensors":
        (run / "sae.safetensors").unlink()
        return str(run / "sae.safetensors")
    if how == "no config.yaml":
        (run / "config.yaml").unlink()
        return f"{run / 'config.yaml'}: no such file"
    if how == "bad config.yaml":
        (run / "config.yaml").write_text("model: [unclosed\n")
        return f"{run / 'config.yaml'}: not a readable YAML file"
    if how == "bad result.json":
        (run / "result.json").write_text('{"hook": "blocks.3.hook')
        return f"{run / 'result.json'}: not valid JSON"
    raise AssertionError(how)


BREAKS = ["no sae_config.yaml", "no sae.safetensors", "no config.yaml", "bad config.yaml",
          "bad result.json"]  # fmt: skip


@pytest.mark.parametrize("how", BREAKS)
def test_examples_checks_the_run_folder_before_the_model(run_dir, no_model, capsys, how):
    expected = _break(run_dir, how)
    assert examples_cli.main([str(run_dir), "--top", "3"]) == 2
    assert expected in captured_error(capsys)


@pytest.mark.parametrize("how", [b for b in BREAKS if b != "no config.yaml"])  # optional there
def test_export_names_the_broken_file(run_dir, tmp_path, capsys, how):
    expected = _break(run_dir, how)
    out = tmp_path / "out"
    assert export_cli.main([str(run_dir), "--format", "saelens", "--out", str(out)]) == 2
    assert expected in captured_error(capsys)


def test_examples_bad_arguments_before_the_model(run_dir, no_model, tmp_path, capsys):
    assert examples_cli.main([str(run_dir), "--latents", "1,x"]) == 2
    assert captured_error(capsys) == (
        "error: --latents='1,x': expected comma-separated latent indices, e.g. 0,5,17"
    )
    assert examples_cli.main([str(run_dir), "--latents", f"0,{D_SAE}"]) == 2
    assert captured_error(capsys) == f"error: --latents [{D_SAE}]: not in [0, d_sae={D_SAE})"
    assert examples_cli.main([str(tmp_path / "nope"), "--top", "3"]) == 2
    assert captured_error(capsys).startswith(f"error: {tmp_path / 'nope'}: no such folder")
    if models.device_unavailable(torch.device("cuda")) is not None:
        assert examples_cli.main([str(run_dir), "--top", "3", "--device", "cuda"]) == 2
        assert captured_error(capsys).startswith("error: --device=cuda: CUDA is not available")
    folder = unwritable_sys_folder()
    assert examples_cli.main([str(run_dir), "--top", "3", "--out", str(folder / "ex")]) == 2
    assert captured_error(capsys).startswith(f"error: --out {folder / 'ex'} cannot be written")


def test_export_oserror_names_the_file(run_dir, tmp_path, capsys):
    folder = unwritable_sys_folder()
    assert export_cli.main([str(run_dir), "--format", "saelens", "--out", str(folder / "x")]) == 2
    assert captured_error(capsys).startswith(f"error: {folder / 'x'}")
    (run_dir / "result.json").unlink()
    assert export_cli.main([str(run_dir), "--format", "saelens", "--out", str(tmp_path)]) == 2
    assert captured_error(capsys) == (
        f"error: {run_dir / 'result.json'}: no such file (is the run finished?)"
    )


def test_an_sae_file_its_loader_cannot_read_is_a_user_error():
    """train=none: an OSError inside the loader (here EIO reading /proc/self/mem as params.npz)
    is named by sae.path; a ValueError or missing file is build_sae's ConfigError."""
    cfg = compose_config(["train=none", "sae=gemma_scope", "sae.path=/proc/self/mem"])
    with pytest.raises(Exception) as err:
        plan_run(cfg)
    message = str(err.value) if isinstance(err.value, ConfigError) else loader_error(cfg, err.value)
    assert message is not None and "/proc/self/mem" in message, repr(err.value)
    cfg = compose_config(["train=none", "sae=saelens", f"sae.path={ROOT / 'no-such-sae'}"])
    with pytest.raises(ConfigError, match="no-such-sae"):
        plan_run(cfg)
    assert loader_error(cfg, RuntimeError("a bug")) is None


# ---- 7. an hf:// SAE with the hub out of reach ----

HUB_SAE = "hf://owner/some-saes/blocks.2.hook_resid_post"


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """The hub endpoint is a socket on 127.0.0.1 that accepts and never answers; an empty HF
    cache; no offline variable. Restores huggingface_hub's offline flag and the probe's cache."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub._probe.cache_clear()
    yield Path(constants.HF_HUB_CACHE)
    hub._probe.cache_clear()
    server.close()


def test_hub_sae_offline_fails_in_seconds_naming_sae_path(silent_hub, monkeypatch):
    cfg = compose_config(["train=none", "sae=saelens", f"sae.path={HUB_SAE}"])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        preflight(cfg)  # before the SAE is built (plan_run would call the hub)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith(f"sae.path={HUB_SAE}: not in the local Hugging Face cache and the "
                              "hub is unreachable (no answer from http://127.0.0.1:")  # fmt: skip
    assert "hf download owner/some-saes --include 'blocks.2.hook_resid_post/*'" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe at all
    with pytest.raises(ConfigError, match=r"unreachable \(HF_HUB_OFFLINE is set\)"):
        hub.check_sources(cfg)


def test_hub_sae_in_the_local_cache_is_read_offline(silent_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = silent_hub / "models--owner--some-saes" / "snapshots" / "abc123"
    (folder / "blocks.2.hook_resid_post").mkdir(parents=True)
    (folder / "blocks.2.hook_resid_post" / "cfg.json").write_text("{}")
    hub.check_sources(compose_config(["train=none", "sae=saelens", f"sae.path={HUB_SAE}"]))
    assert constants.HF_HUB_OFFLINE is True  # the loader reads the cache, no retries
