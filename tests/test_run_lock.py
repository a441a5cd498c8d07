"""One process per run folder (benchmark.runfolder.claim), a fan-out group handed over once
(benchmark.fanout.Group.value -> run.run_jobs), each job's lines in its own run.log
(member_logs), a kill after the SAE was saved resuming at the evaluation (trained.json), no
folder left by a refused run (remove_unused), result.json kept aside only for a rerun, and
files written with the umask's mode (fileio.atomic_write, benchmark.export).

The unit tests need no model (the run itself is replaced where it would start); the two marked
integration run the real bundled model: a kill-and-resume in-process, and two identical sweeps
started together as two processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmark.run as run_mod
import benchmark.stages as stages_mod
from benchmark import fanout, fileio
from benchmark.errors import ConfigError
from benchmark.results import read_result, write_result
from benchmark.run import Member, run_members
from benchmark.runfolder import RUN_LOCK, claim, member_logs
from benchmark.stages import TRAINED
from tests.helpers import ROOT, compose_config, sae_from_conf

HOLD = (  # a process that takes a run folder's lock and keeps it until it is killed
    "import sys, time\nfrom filelock import FileLock\n"
    "lock = FileLock(sys.argv[1]); lock.acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / RUN_LOCK)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config([f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}",
                           "sae=topk", "sparsity=l0_10", *overrides])  # fmt: skip


@pytest.fixture
def fake_run(monkeypatch):
    """run_group replaced: records which folders it was asked to run, writes their results."""
    calls: list[list[str]] = []

    def run_group(members, group=None):
        calls.append([m.out.name for m in members])
        for m in members:
            write_result(m.out, {"status": "complete", "delta_lm_loss": 0.5})
        return [SimpleNamespace(metrics={"delta_lm_loss": 0.5}) for _ in members]

    monkeypatch.setattr(run_mod, "run_group", run_group)
    return calls


def test_a_folder_held_by_another_process_is_skipped_until_that_process_dies(
    tmp_path, fake_run, caplog
):
    cfg, out = _cfg(tmp_path), tmp_path / "run"
    holder = _holder(out)
    try:
        with caplog.at_level(logging.INFO, "benchmark.run"):
            assert run_members([Member(cfg, out, {})]) == [None]  # skipped, not waited for
    finally:
        holder.kill()  # SIGKILL: no release by the holder; the OS drops its flock
        holder.wait(timeout=30)
    assert fake_run == []
    skipped = [r.getMessage() for r in caplog.records if "another process" in r.getMessage()]
    assert skipped == ["[run] being run by another process: skipped"]
    assert not (out / "result.json").exists()
    # the holder was killed: its lock is free, the run is computed once, then skipped
    assert run_members([Member(cfg, out, {})]) == [0.5]
    assert run_members([Member(cfg, out, {})]) == [0.5]
    assert fake_run == [["run"]]
    assert list(out.glob("result.*.json")) == []


def test_a_group_runs_only_the_members_it_could_claim(tmp_path, fake_run):
    cfg = _cfg(tmp_path)
    members = [Member(cfg, tmp_path / name, {}) for name in ("c", "a", "b")]
    holder = _holder(tmp_path / "a")
    try:
        assert run_members(members, "k") == [0.5, None, 0.5]  # a: the other process's
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert fake_run == [["c", "b"]]  # launch order, one group of the two claimed
    assert not (tmp_path / "a" / "result.json").exists()


def test_the_fanout_launcher_hands_each_group_to_run_jobs_once(tmp_path, monkeypatch):
    """benchmark.fanout.Group.value, each grouped job's task: the first job of a group hands the
    whole group to run.run_jobs; the others return their member's value, or its failure."""
    calls = []

    def run_jobs(members, key=None):
        calls.append((key, [m.out.name for m in members]))
        if key == "bad":
            raise ValueError("boom")
        return [0.5, None]

    monkeypatch.setattr(run_mod, "run_jobs", run_jobs)
    members = [Member(None, tmp_path / n, {}) for n in ("a", "b")]  # type: ignore[arg-type]
    group = fanout.Group("k", members)
    assert [group.value(tmp_path / "b"), group.value(tmp_path / "a")] == [None, 0.5]
    assert calls == [("k", ["a", "b"])]
    failed = fanout.Group("bad", members)
    with pytest.raises(ValueError, match="boom"):  # the job that ran it: the failure itself
        failed.value(tmp_path / "a")
    with pytest.raises(RuntimeError, match="its fan-out group bad failed: ValueError: boom"):
        failed.value(tmp_path / "b")
    assert len(calls) == 2


def test_claims_are_released_and_a_job_listed_twice_is_claimed_once(tmp_path):
    cfg = _cfg(tmp_path)
    a, again, b = (Member(cfg, tmp_path / n, {}) for n in ("a", "a", "b"))
    with claim([b, a, again]) as mine:
        assert mine == [b, a]
        with claim([a]) as inner:  # held (here by this same process): not claimed twice
            assert inner == []
    with claim([a, b]) as mine:  # released on exit
        assert mine == [a, b]


def test_a_refused_run_leaves_no_folder_and_the_report_lists_nothing(tmp_path):
    from benchmark.report.load import load_results

    root = tmp_path / "exp"
    bad = _cfg(tmp_path, "sparsity.target_l0=100000")  # refused by plan_run (check_run)
    lead, member, kept = root / "lead", root / "member", root / "kept"
    (lead / ".hydra").mkdir(parents=True)  # what Hydra writes when a job starts
    (lead / ".hydra" / "config.yaml").write_text("x: 1\n")
    (lead / "run.log").write_text("")
    (kept / ".hydra").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")  # a folder holding anything else stays
    members = [Member(bad, p, {}) for p in (lead, member, kept)]
    with pytest.raises(ConfigError, match=r"sparsity\.target_l0=100000 must be in \[1, d_sae="):
        run_members(members, "k")
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    assert sorted(p.name for p in kept.iterdir()) == [".hydra", ".run.lock", "notes.txt"]
    (kept / ".hydra").rmdir()  # the report lists a folder with .hydra and no result
    _, problems = load_results(root)
    assert problems.empty
    single = root / "single"
    (single / ".hydra").mkdir(parents=True)
    with pytest.raises(ConfigError):
        run_members([Member(bad, single, {})])
    assert not single.exists()


def test_a_refused_cli_run_leaves_no_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.run", "+experiment=smoke", "hydra.mode=RUN",
         "sparsity.target_l0=100000", f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: sparsity.target_l0=100000 must be in [1, d_sae=" in proc.stderr
    assert [p.name for p in (tmp_path / "smoke").iterdir()] == []


def test_a_complete_record_is_moved_aside_only_by_a_rerun_and_a_failed_one_is_replaced(tmp_path):
    write_result(tmp_path, {"status": "failed", "error": "boom", "time": "2026-01-01T00:00:00"})
    write_result(tmp_path, {"status": "complete", "time": "2026-01-02T00:00:00"})
    assert read_result(tmp_path) == {"status": "complete", "time": "2026-01-02T00:00:00"}
    assert list(tmp_path.glob("result.*.json")) == []
    write_result(tmp_path, {"status": "complete", "time": "2026-01-03T00:00:00"})  # rerun=true
    assert read_result(tmp_path) == {"status": "complete", "time": "2026-01-03T00:00:00",
                                     "replaces": "result.2026-01-02T000000.json"}  # fmt: skip
    (kept,) = tmp_path.glob("result.*.json")
    assert json.loads(kept.read_text())["time"] == "2026-01-02T00:00:00"


def test_each_member_gets_its_own_lines_in_its_own_run_log(tmp_path):
    members = [Member(None, tmp_path / n, {}) for n in ("lead", "m1", "m2")]  # type: ignore[arg-type]
    for m in members:
        m.out.mkdir()
    root = logging.getLogger()
    hydra_file = logging.FileHandler(tmp_path / "lead" / "run.log")  # the running job's log
    hydra_file.setFormatter(logging.Formatter("H %(levelname)s %(message)s"))
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(hydra_file)
    n_handlers = len(root.handlers)
    log = logging.getLogger("benchmark.run")
    try:
        with member_logs(members):
            for name in ("lead", "m1", "m2"):
                log.info("[%s] train", name)
            logging.getLogger("benchmark.train").info("step 8/16")  # names no member: shared
            log.info("[m2] done in 3s")
        log.info("[m1] after the group")  # the member handlers are gone
        assert len(root.handlers) == n_handlers
    finally:
        root.removeHandler(hydra_file)
        hydra_file.close()
        root.setLevel(old_level)
    lines = {m.out.name: (m.out / "run.log").read_text().splitlines() for m in members}
    # the running job's log is Hydra's handler's, unchanged (no line twice); the others get
    # their own lines and the shared ones, in the job log's format
    assert lines["lead"] == ["H INFO [lead] train", "H INFO [m1] train", "H INFO [m2] train",
                             "H INFO step 8/16", "H INFO [m2] done in 3s",
                             "H INFO [m1] after the group"]  # fmt: skip
    assert lines["m1"] == ["H INFO [m1] train", "H INFO step 8/16"]
    assert lines["m2"] == ["H INFO [m2] train", "H INFO step 8/16", "H INFO [m2] done in 3s"]


@pytest.mark.parametrize(
    "umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"]
)
def test_written_and_exported_files_have_the_umask_s_mode(tmp_path, umask, mode):
    from benchmark.export import export
    from benchmark.saes import sae_node, save_sae

    sae = sae_from_conf("jumprelu", 16, 32)
    node = sae_node(compose_config(["sae=jumprelu", "sparsity=l0_10"]).sae, 16, 32)
    run_dir = tmp_path / "run"
    old = os.umask(umask)
    try:
        save_sae(sae, run_dir, node)
        fileio.write_json_atomic(run_dir / "result.json",
                                 {"hook": "blocks.2.hook_resid_post", "d_in": 16, "d_sae": 32})  # fmt: skip
        written = [*run_dir.iterdir()]
        written += export(run_dir, "saelens", tmp_path / "saelens")
        written += export(run_dir, "gemma_scope", tmp_path / "gemma_scope")
    finally:
        os.umask(old)
    names = sorted(p.name for p in written)
    assert names == ["cfg.json", "params.npz", "result.json", "sae.safetensors",
                     "sae_config.yaml", "sae_weights.safetensors"]  # fmt: skip
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        n: oct(mode) for n in names
    }


# ---- the real model ----------------------------------------------------------------------------

TINY = ["+experiment=smoke", "progress=false", "eval.n_activation_tokens=1024",
        "data.n_eval_tokens=256", "eval.kl_div=false"]  # fmt: skip
TRAIN_FIELDS = ("train_l0", "train_tokens", "train_frac_dead", "coefficient", "dead_window_tokens",
                "resumed_from_step", "norm_scale", "activation_cache", "history_file",
                "train_seconds", "train_tokens_per_s", "peak_memory_mb")  # fmt: skip
METRICS = ("l0", "fvu", "frac_dead", "clean_ce_loss", "spliced_ce_loss", "zero_ce_loss",
           "delta_lm_loss", "ce_loss_recovered", "splice_l0", "n_activation_tokens",
           "n_lm_tokens", "frac_freq_over_1pct", "frac_freq_over_10pct")  # fmt: skip


class Killed(BaseException):
    """A kill: nothing is recorded (a SIGKILL leaves no failed record either)."""


@pytest.mark.integration
def test_a_run_killed_after_its_sae_was_saved_resumes_at_the_evaluation(tmp_path, monkeypatch):
    cfg = compose_config([*TINY, "sae=topk", "sparsity=l0_10", f"results_dir={tmp_path}",
                          f"cache_dir={ROOT / '.cache'}"])  # fmt: skip
    choices = {"sae": "topk", "sparsity": "l0_10"}
    whole = run_mod.run_members([Member(cfg, tmp_path / "whole", choices)])[0]  # uninterrupted
    reference = read_result(tmp_path / "whole")
    assert reference is not None and reference["delta_lm_loss"] == whole
    assert not (tmp_path / "whole" / TRAINED).exists()  # the record holds it now

    killed = tmp_path / "killed"
    trained = []
    train_group = stages_mod.train_group

    def recording(*a, **k):
        trained.extend(train_group(*a, **k))
        return trained

    def kill(*a, **k):
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(stages_mod, "train_group", recording)
        mp.setattr(run_mod, "evaluate_stage", kill)
        with pytest.raises(Killed):
            run_mod.run_members([Member(cfg, killed, choices)])
    assert len(trained) == 1 and not (killed / "result.json").exists()
    assert {"sae.safetensors", "sae_config.yaml", "history.csv", TRAINED} <= {
        p.name for p in killed.iterdir()
    }

    def no_training(*a, **k):
        raise AssertionError("trained again")

    splits = []
    stores = stages_mod.activations.get_activation_stores

    def harvest(model, c, split, **k):
        splits.append(split)
        return stores(model, c, split, **k)

    monkeypatch.setattr(stages_mod, "train_group", no_training)
    monkeypatch.setattr(stages_mod.activations, "get_activation_stores", harvest)
    assert run_mod.run_members([Member(cfg, killed, choices)]) == [whole]
    assert splits == ["eval"]  # not even the training split was opened
    resumed = read_result(killed)
    assert resumed is not None and resumed["status"] == "complete"
    for key in METRICS:
        assert resumed[key] == reference[key], key
    for key in TRAIN_FIELDS[:9]:  # the training's numbers: those of an uninterrupted run
        assert resumed[key] == reference[key], key
    t = trained[0]  # its cost: that of the training the kill interrupted
    assert (resumed["train_seconds"], resumed["train_tokens_per_s"],
            resumed["peak_memory_mb"]) == (t.seconds, t.tokens_per_s, t.peak_memory_mb)  # fmt: skip
    assert "replaces" not in resumed and list(killed.glob("result.*.json")) == []
    assert not (killed / TRAINED).exists()


@pytest.mark.integration
def test_two_identical_sweeps_started_together_compute_each_run_once(tmp_path):
    cmd = [sys.executable, "-m", "benchmark.run", "-m", *TINY, "sae=topk",
           "sparsity=l0_10,l0_20", f"results_dir={tmp_path}", f"cache_dir={ROOT / '.cache'}"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    both = "\n".join(outs)
    folders = sorted(p for p in (tmp_path / "smoke").iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        name = folder.name
        # computed by exactly one of the two processes; the other skipped it
        assert both.count(f"[{name}] done in") == 1, both[-3000:]
        assert len(re.findall(rf"\[{name}\] train TopKSAE", both)) == 1
        skipped = both.count(f"[{name}] being run by another process: skipped")
        assert skipped + both.count(f"[{name}] already complete") == 1, both[-3000:]
        record = read_result(folder)
        assert record is not None and record["status"] == "complete"
        assert "replaces" not in record and list(folder.glob("result.*.json")) == []
        # its own lines in its own run.log, whichever job or process ran it
        assert (folder / "run.log").read_text().count(f"[{name}] done in") == 1
