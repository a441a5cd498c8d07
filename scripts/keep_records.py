"""Copy the records of a sweep's complete runs (no weights, no checkpoints) into another folder.

    python scripts/keep_records.py results/paper_cpu results/reference/paper_cpu/runs

For each run folder under SRC whose result.json says `"status": "complete"`, the files a
report and a resumed sweep need are copied into DEST/<run folder name>/: config.yaml,
result.json, history.csv, firing_frequency.npy and lm_windows.npy (whichever exist). The SAE's
weights and the training checkpoints stay behind (a committed reference keeps records, not
SAEs). Copying them back into a sweep's results folder makes `benchmark.run` skip those runs
(a folder with the same config and a complete result.json is done), which is how a grid too
long for one sitting is carried across machines: keep the records, re-launch the same command.

Each file is written to a temporary name and renamed, so a killed copy leaves no half file.
Prints how many runs were copied and how many were already there unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

RECORD_FILES = ("config.yaml", "result.json", "history.csv", "firing_frequency.npy",
                "lm_windows.npy")  # fmt: skip


def complete(run: Path) -> bool:
    try:
        doc = json.loads((run / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("status") == "complete"


def copy_atomic(src: Path, dest: Path) -> bool:
    """Copy src to dest unless dest already holds the same bytes; True when it copied."""
    if dest.is_file() and dest.read_bytes() == src.read_bytes():
        return False
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def keep(src: Path, dest: Path) -> tuple[int, int]:
    """(runs copied or updated, runs already there unchanged)."""
    copied = same = 0
    for result in sorted(src.rglob("result.json")):
        run = result.parent
        if not complete(run):
            continue
        target = dest / run.name
        target.mkdir(parents=True, exist_ok=True)
        changed = [copy_atomic(run / name, target / name) for name in RECORD_FILES
                   if (run / name).is_file()]  # fmt: skip
        copied, same = copied + any(changed), same + (not any(changed))
    return copied, same


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not Path(argv[0]).is_dir():
        print("usage: python scripts/keep_records.py SRC_RESULTS_DIR DEST_DIR", file=sys.stderr)
        return 2
    copied, same = keep(Path(argv[0]), Path(argv[1]))
    print(f"{copied} runs copied, {same} already there unchanged: {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
