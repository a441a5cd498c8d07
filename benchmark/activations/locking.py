"""Activation cache locks and health: who harvests a key, and whether a cache may be read.

Owns the file lock per key (taken in sorted order: two processes never deadlock), completeness
(a cache without manifest.json is never read), the integrity checks on every read
(benchmark/integrity.py), the in-place upgrade of a manifest written before those checks, and
discarding a damaged cache or norm.json so that it is made again. The design is in the package
docstring (benchmark/activations/__init__.py).

Must not know how a cache is harvested (beyond `shard_ok`: does a shard hold its rows) or read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from benchmark import integrity
from benchmark.activations.harvest import shard_ok
from benchmark.activations.keys import MANIFEST, NORM_FILE
from benchmark.fileio import write_json_atomic

log = logging.getLogger("benchmark.activations")


@contextmanager
def key_locks(paths: Any) -> Iterator[None]:
    """One file lock per key, taken in sorted order (two processes never deadlock)."""
    with ExitStack() as stack:
        for path in sorted(paths):
            lock = FileLock(f"{path}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another process harvesting %s", path.name)
                lock.acquire()
            stack.callback(lock.release)
        yield


def _complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def cache_usable(path: Path, repair: bool = False) -> bool:
    """A complete and intact cache (see "Integrity" in the module docstring). With `repair`
    (under the key's lock) an old manifest is upgraded where it can be, and a damaged cache is
    reported in one warning and discarded, so that it is harvested again."""
    if not _complete(path):
        return False
    problem = cache_damage(path)
    if problem is None:
        return True
    if repair:
        problem = _upgrade(path, problem)
        if problem is None:
            return True
        log.warning("activation cache %s: %s; harvesting it again", path.name, problem)
        integrity.discard(path)
    return False


def _upgrade(path: Path, problem: str) -> str | None:
    """Seal a manifest from before the integrity checks whose shards all hold their recorded
    rows, with their sizes and checksums as they are now (see the module docstring): None.
    Else what is wrong: `problem`, or the first shard that does not hold its rows."""
    file = path / MANIFEST
    try:
        integrity.unseal(file.read_text())
        return problem  # sealed: damaged, not old
    except integrity.Unsealed:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError):
        return problem
    try:
        shards = [(s["file"], int(s["rows"])) for s in manifest["shards"]]
    except (KeyError, TypeError, ValueError):
        return problem
    for name, rows in shards:
        if not shard_ok(path / name, rows):
            return f"{path / name} does not hold its {rows} rows (old manifest)"
    names = [s["file"] for s in manifest["shards"]]
    files = integrity.file_records(path, names)
    manifest["shards"] = [{**s, **files[s["file"]]} for s in manifest["shards"]]
    write_json_atomic(file, integrity.seal(manifest))
    integrity.mark_verified(path, file)
    log.warning(
        "activation cache %s: its manifest predates the integrity checks; recorded the sizes "
        "and checksums of its %d shards as they are now",
        path.name,
        len(names),
    )
    return None


def cache_damage(path: Path) -> str | None:
    """None when the cache at `path` is intact, else what is wrong (naming the file)."""
    manifest = path / MANIFEST
    try:
        shards = integrity.unseal(manifest.read_text())["shards"]
        records = {s["file"]: {"bytes": s["bytes"], "crc32": s["crc32"]} for s in shards}
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        return f"{manifest} is unreadable or predates integrity checks ({type(e).__name__}: {e})"
    return integrity.damage(path, records, manifest)


def norm_file_usable(path: Path, repair: bool = False) -> bool:
    """norm.json exists and is intact; with `repair` (under the lock) a damaged one is
    reported in one warning and removed, so that it is estimated again (one from before the
    integrity checks is sealed as it is, with a warning)."""
    file = path / NORM_FILE
    if not file.is_file():
        return False
    try:
        integrity.unseal(file.read_text())
        return True
    except integrity.Unsealed:  # from before the integrity checks: sealed as it is
        if repair:
            write_json_atomic(file, integrity.seal(json.loads(file.read_text())))
            log.warning("stream norm %s predates the integrity checks; sealed as it is", file)
        return repair
    except (OSError, ValueError) as e:
        if repair:
            log.warning("stream norm %s is unreadable (%s); estimating it again", file, e)
            file.unlink()
        return False
