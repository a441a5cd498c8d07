"""The entry point's checks of a job before and after it runs, from its composed config.

Owns what `benchmark/run.py` asks of a run folder and of this machine, all in seconds and
before any model, data or training work: whether the folder already holds this config's
complete result (`check_folder`), whether the results and cache folders are writable
(`check_writable`), the pre-flight of the config, device and hub sources (`preflight`), a
checkpoint read as plain data (`check_checkpoint`); and, when a run fails, its failed record
(`record_failure`) and the one-line message for an SAE file its loader cannot read
(`loader_error`). Reads the config tree, like run.py (the stages below it get typed specs).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from benchmark import cli_errors, identity, models
from benchmark.errors import ConfigError
from benchmark.hub import check_sources
from benchmark.results import git_commit, read_result, write_result
from benchmark.stages import CHECKPOINT
from benchmark.train import read_checkpoint
from benchmark.validate import check_run

log = logging.getLogger("benchmark.run")


def check_folder(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The complete result already in `out` for this config, or None (run it).

    A folder holding a result or a checkpoint of a *different* config (possible only when the
    user points hydra.run.dir somewhere by hand: folder names carry the config hash) is never
    reused: ConfigError names the differing keys. A result from other code (git commit) is
    reused with a warning; `rerun=true` recomputes it.
    """
    if cfg.get("rerun", False):
        return None
    mine = identity.identity_dict(cfg)
    done = read_result(out)
    saved = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").exists() else None
    theirs = identity.identity_dict(saved) if isinstance(saved, DictConfig) else None
    if theirs is not None and theirs != mine:
        diff = "; ".join(identity.diff_keys(theirs, mine)[:6])
        raise ConfigError(
            f"{out} holds a run of a different config ({diff}); use another results_dir or "
            "experiment_name, or delete that folder"
        )
    if not (done and done.get("status") == "complete"):
        return None
    commit, dirty = git_commit()
    if done.get("git_commit") != commit or done.get("git_dirty") or dirty:
        log.warning(
            "[%s] already complete, computed by code %s%s (now %s%s): reused; rerun=true "
            "recomputes it", out.name, str(done.get("git_commit"))[:10],
            "+changes" if done.get("git_dirty") else "", commit[:10], "+changes" if dirty else "",
        )  # fmt: skip
    else:
        log.info("[%s] already complete, skipped (rerun=true to run it again)", out.name)
    return done


def record_failure(out: Path, e: BaseException, choices: dict[str, Any], cfg: DictConfig) -> None:
    """A failed record with the traceback, unless a complete one is already there: a finished
    run is never turned into a failed one by something that broke after it was written."""
    done = read_result(out)
    if done and done.get("status") == "complete":
        return
    write_result(out, {
        "run_id": out.name, "status": "failed", "error": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(), "choices": choices, "run_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=False),
    })  # fmt: skip


def check_writable(cfg: DictConfig) -> None:
    """results_dir and cache_dir are folders this process can create and write in; checked
    before any model, data or training work (ConfigError names the key and the path). The test
    writes a file (`cli_errors.unwritable`): root ignores permission bits, and a read-only
    mount is read-only for root too.

    A read-only results folder usually fails earlier, in Hydra: it writes run.log, .hydra/ and
    (with -m) multirun.yaml into the run folders on every launch, a finished run's included,
    so re-launching a sweep whose folder is read-only cannot simply skip its finished runs; it
    ends with one line naming results_dir (benchmark.cli_errors)."""
    for key in ("results_dir", "cache_dir"):
        path = Path(str(cfg[key]))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={path}: is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{key}={path}: cannot create this folder ({e.strerror or e})"
            ) from None
        why = cli_errors.unwritable(path)
        if why is not None:
            raise ConfigError(f"{key}={path}: this folder is not writable ({why})")


def preflight(cfg: DictConfig) -> None:
    """The checks of this machine that a run needs and that take seconds at most, before the
    SAE is built or the model loads: the config's own checks (check_run), `device` exists here
    (cuda without CUDA, mps without Metal: models.resolve_device), and the hub sources
    (model, data and an `hf://` sae.path) are in the local cache or the hub answers
    (benchmark.hub.check_sources: offline fails in seconds, naming sae.path). Each failure is a
    ConfigError of one line."""
    check_run(cfg)
    models.resolve_device(str(cfg.device))
    check_sources(cfg)


def check_checkpoint(cfg: DictConfig, out: Path) -> None:
    """A checkpoint in the run's folder is read as plain data (`train.read_checkpoint`, its
    tensors memory-mapped: no I/O) before any model or data work, so a hostile, damaged or
    outdated one fails in a second, not after the harvest. rerun=true ignores it: training
    starts from scratch and overwrites it."""
    path = out / CHECKPOINT
    if path.exists() and not cfg.get("rerun", False):
        read_checkpoint(path, mmap=True)


def loader_error(cfg: DictConfig, e: BaseException) -> str | None:
    """The one-line message when the SAE loader of `sae.path` (train=none) could not read a
    file (an OSError: permissions, a folder where a file should be, ...), else None.
    benchmark.saes.build_sae already turns a loader's ValueError, TypeError and
    FileNotFoundError into a ConfigError; any other exception stays a bug."""
    cause = e.__cause__ if isinstance(e, InstantiationException) else None
    target = str(cfg.sae.get("_target_", ""))
    if isinstance(cause, OSError) and target and target in str(e):
        return f"sae.path={cfg.sae.get('path')}: {cli_errors.file_error(cause)}"
    return None
