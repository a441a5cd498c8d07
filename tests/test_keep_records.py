"""scripts/keep_records.py: a sweep's complete records are copied, weights and failed runs are
not, and a second copy changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def _run(folder, status):
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": status}))
    for name in ("config.yaml", "history.csv", "firing_frequency.npy", "sae.safetensors",
                 "checkpoint.pt"):  # fmt: skip
        (folder / name).write_text(name)


def test_complete_records_are_kept_without_weights(tmp_path):
    src, dest = tmp_path / "sweep", tmp_path / "kept"
    _run(src / "a_done", "complete")
    _run(src / "b_failed", "failed")
    (src / "c_broken").mkdir()
    (src / "c_broken" / "result.json").write_text("{not json")
    script = [sys.executable, str(ROOT / "scripts" / "keep_records.py"), str(src), str(dest)]
    first = subprocess.run(script, capture_output=True, text=True, check=True)
    assert first.stdout.startswith("1 runs copied, 0 already there unchanged")
    assert sorted(p.name for p in (dest / "a_done").iterdir()) == [
        "config.yaml", "firing_frequency.npy", "history.csv", "result.json"]  # fmt: skip
    assert not (dest / "b_failed").exists() and not (dest / "c_broken").exists()
    second = subprocess.run(script, capture_output=True, text=True, check=True)
    assert second.stdout.startswith("0 runs copied, 1 already there unchanged")
    bad = subprocess.run([*script[:2], str(tmp_path / "missing"), str(dest)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("usage:")
