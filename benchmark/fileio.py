"""Atomic file writes: every file the suite keeps (caches, checkpoints, weights, results) is
written to a temporary file in the same folder and then renamed over its target, so a reader
never sees a half-written file and a killed process leaves the previous version intact.

- Permissions: the final file gets the mode a plain `open` would give it (0666 minus the
  user's umask), not mkstemp's private 0600, so a cache or results folder shared by a team
  (umask 002 or 022) is readable by the others.
- Stale temporaries: a temp name carries the writer's host and pid
  (`.<name>.tmp-<host>-<pid>-<random>`); `sweep_stale` removes those whose writer is gone (same
  host, pid no longer alive) or that are older than a day (another host), so a killed writer
  leaves nothing behind after the next run.
- A full disk raises `DiskFullError` naming the path and the free space, instead of numpy's or
  torch's "N requested and M written".

Owns nothing else; knows no other benchmark module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STALE_SECONDS = 24 * 3600  # a temp file of another host is stale after this long


class DiskFullError(OSError):
    """No space left where the suite writes: names the path and the free space."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> Path:
    """Give `path` the mode a plain `open` would have given it (0666 minus the umask): for a
    file some writer created private (mkstemp, safetensors' own temporary file)."""
    os.chmod(path, 0o666 & ~current_umask())
    return Path(path)


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_")[:32]


def temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_host()}-{os.getpid()}-"


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    sweep_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:
            raise _disk_full(e, path) from e
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _disk_full(e: BaseException, path: Path) -> BaseException:
    """`e` as a DiskFullError when it means a full disk, else `e` itself."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and "requested and" in str(e) and "written" in str(e):  # numpy / torch wording
        full = True
    if not full:
        return e
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device writing {path} ({free / 2**20:.0f} MiB free); free some "
        "space or point cache_dir / results_dir at a larger disk",
    )


def save_npy_atomic(path: str | Path, array: Any) -> Path:
    """np.save(path, array), atomically (a file handle: np.save would append .npy to a temp
    name); never pickled (allow_pickle=False), so the file is plain data."""
    import numpy as np

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)

    return atomic_write(path, dump)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)

    return atomic_write(path, dump)


_swept: set[Path] = set()


def sweep_stale(folder: str | Path) -> list[Path]:
    """Remove the temporaries of dead writers in `folder` (once per folder per process)."""
    folder = Path(folder)
    if folder in _swept or not folder.is_dir():
        return []
    _swept.add(folder)
    removed = []
    for entry in folder.glob(".*.tmp-*"):
        if _is_stale(entry.name.rsplit(".tmp-", 1)[1], entry):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(True)
            removed.append(entry)
    for entry in folder.glob("*.tmp-*"):  # temp folders (model conversion) have no dot
        if not entry.name.startswith(".") and _is_stale(entry.name.rsplit(".tmp-", 1)[1], entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _is_stale(tag: str, entry: Path) -> bool:
    parts = tag.split("-")
    if len(parts) >= 3 and parts[0] == _host() and parts[1].isdigit():
        return not _alive(int(parts[1]))
    try:  # another host's, or an old-style name: stale only when old
        return time.time() - entry.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
