"""A run's folder while a process runs it: its lock, its own log, and what a refused run leaves.

Owns: the file lock that makes one process per run folder (`claim`: <folder>/.run.lock, taken
in sorted order so two groups never deadlock; flock, so the OS frees it when its process dies
and a killed run never blocks the next), each fan-out member's lines in its own run.log
(`member_logs`), and removing the folder of a run refused before it started
(`remove_unused`). Hydra creates the folder and its job log; benchmark.run decides what runs.

Must not know the pipeline: it sees folders (anything with an `out` path) and log records.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig

log = logging.getLogger("benchmark.run")  # the lines read as the run's own
RUN_LOCK = ".run.lock"  # in the run folder: held by the process training and evaluating it


class InFolder(Protocol):
    out: Path


M = TypeVar("M", bound=InFolder)


@contextmanager
def claim(members: Sequence[M]) -> Iterator[list[M]]:
    """Lock the members' run folders (<folder>/.run.lock, in sorted order) for as long as the
    context lasts; yields the members this process holds, in launch order. A folder locked by
    another process is not waited for: one line says so and the member is left out (that
    process trains and evaluates it; a complete result is then skipped by
    benchmark.runchecks.check_folder). The
    locks are flock locks: the OS releases them when their process ends, killed or not, so a
    stale lock never blocks a later run. A job listed twice (same folder) is claimed once."""
    held: dict[str, M] = {}
    with ExitStack() as stack:
        for m in sorted(members, key=lambda m: str(m.out)):
            if str(m.out) in held:
                continue
            lock = FileLock(str(m.out / RUN_LOCK))  # makes the folder if it is missing
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("[%s] being run by another process: skipped", m.out.name)
                continue
            stack.callback(lock.release)
            held[str(m.out)] = m
        yield [m for m in members if held.get(str(m.out)) is m]


def _job_log() -> str:
    """The file name of Hydra's per-job log (hydra/job_logging: <job name>.log)."""
    try:
        return f"{HydraConfig.get().job.name}.log"
    except ValueError:  # no Hydra job (the Python API)
        return "run.log"


def remove_unused(out: Path) -> bool:
    """Remove the run folder `out` if it holds nothing of a run: only what Hydra writes when a
    job starts (.hydra/, the job's log) and the run lock. Called under the folder's lock, for a
    run refused by a pre-run check. A folder that holds anything else (config.yaml, a
    checkpoint, the SAE, a result, a file of the user's) is never removed."""
    allowed = {".hydra", RUN_LOCK, _job_log(), "run.log"}
    try:
        entries = list(out.iterdir())
    except OSError:
        return False
    if any(e.name not in allowed or (e.name == ".hydra") != e.is_dir() for e in entries):
        return False
    shutil.rmtree(out / ".hydra", ignore_errors=True)
    for e in entries:
        if e.name != ".hydra":
            e.unlink(missing_ok=True)
    try:
        out.rmdir()
    except OSError:  # something appeared meanwhile: leave it
        return False
    log.debug("[%s] refused before it started: folder removed", out.name)
    return True


class _NamesMember(logging.Filter):
    """Passes the lines that name `name` (`[<folder name>] ...`) and the lines that name no
    member of the group (shared: progress, cache locks)."""

    def __init__(self, name: str, names: set[str]) -> None:
        super().__init__()
        self.own, self.others = f"[{name}]", tuple(f"[{n}]" for n in names if n != name)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return msg.startswith(self.own) or not msg.startswith(self.others)


@contextmanager
def member_logs(members: Sequence[InFolder]) -> Iterator[None]:
    """Each member's log lines also in its own run.log while its group runs. Hydra's job log
    (hydra/job_logging: a file handler on the root logger, <job folder>/<job name>.log) is the
    running job's; in a fan-out group the first job runs every member, so without this every
    member's lines would be in the first job's log only. A member whose log already has a
    handler (the running job's own) gets none; a member's file gets the lines naming it and
    the lines naming no member (`_NamesMember`)."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    have = {os.path.abspath(h.baseFilename) for h in files}
    folders = {os.path.abspath(m.out) for m in members}
    job = next((h for h in files if os.path.dirname(h.baseFilename) in folders), None)
    fmt = (job.formatter if job is not None else None) or logging.Formatter(
        "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default
    )
    names = {m.out.name for m in members}
    added = []
    for m in members:
        path = os.path.abspath(m.out / _job_log())
        if path in have:
            continue
        have.add(path)
        handler = logging.FileHandler(path, delay=True)
        handler.setFormatter(fmt)
        handler.addFilter(_NamesMember(m.out.name, names))
        root.addHandler(handler)
        added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
