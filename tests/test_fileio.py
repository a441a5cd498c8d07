"""Atomic writes (benchmark/fileio.py): shared-cache permissions, stale temporaries of killed
writers, and a full disk named as such."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from benchmark import fileio
from benchmark.fileio import DiskFullError, atomic_write, sweep_stale, write_json_atomic


def test_files_honour_the_umask_so_a_team_can_share_a_cache(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o644  # group and others can read (mkstemp alone gives 0600)


def test_stale_temporaries_of_a_dead_writer_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = fileio._host()
    stale = tmp_path / f".result.json.tmp-{host}-{dead}-abc"
    stale.write_text("half")
    stale_dir = tmp_path / f"Model.tmp-{host}-{dead}-xyz"
    stale_dir.mkdir()
    live = tmp_path / f".shard.npy.tmp-{host}-{os.getpid()}-def"  # ours: a writer still running
    live.write_text("busy")
    removed = sweep_stale(tmp_path)
    assert set(removed) == {stale, stale_dir}
    assert live.exists() and not stale.exists() and not stale_dir.exists()


def test_a_full_disk_names_the_path_and_says_so(tmp_path):
    def write(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*x\.npy"):
        atomic_write(tmp_path / "x.npy", write)

    def numpy_style(tmp):  # numpy/torch report a short write without errno
        raise OSError("2359296 requested and 1429472 written")

    with pytest.raises(DiskFullError, match="MiB free"):
        atomic_write(tmp_path / "y.npy", numpy_style)
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
