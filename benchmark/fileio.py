"""Atomic file writes: every file the suite keeps (caches, checkpoints, weights, results) is
written to a temporary file in the same folder and then renamed over its target, so a reader
never sees a half-written file and a killed process leaves the previous version intact.

Owns nothing else; knows no other benchmark module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)

    return atomic_write(path, dump)
