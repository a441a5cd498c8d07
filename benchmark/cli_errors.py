"""User errors of the command lines as one line on stderr and exit status 2; Ctrl-C as one line
and exit status 130.

Owns the translation of what Hydra raises before (or around) the job: a bad or unparsable
override, an unknown option of a config group (`sae=nope`), an unknown group or key, an output
folder that cannot be created or written (`results_dir=/proc/x`, a read-only results folder:
Hydra writes multirun.yaml, run.log and .hydra/ on every launch, a finished run's folder
included), and a SLURM launcher where there is no SLURM (submitit's "Could not detect srun").
Hydra reports these through `hydra._internal.utils.run_and_report` as several lines (some with
a traceback) and exit status 1; `one_line_errors()` wraps that function for the duration of one
CLI call. Anything else (a bug) keeps Hydra's report and status 1. `HYDRA_FULL_ERROR=1` turns
all of this off and shows full tracebacks, the suite's ConfigError included
(`benchmark.run.main`).

Also the small pieces every CLI (benchmark.run, report, export, examples) shares: `fail`,
`interrupted` (Ctrl-C: one line saying how to resume, status 130), `file_error` (an OSError as
`<file>: <why>`), `unwritable` (a real write probe of a folder: root ignores permission bits,
and os.access does not see every read-only mount), and strict readers of a run folder's
config.yaml / result.json whose errors name the file.

Must not know the pipeline: it sees only exceptions, files and the command line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import yaml
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from omegaconf.errors import (
    GrammarParseError,
    InterpolationKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    UnsupportedInterpolationType,
)

from benchmark.compose import CONF_DIR
from benchmark.errors import ConfigError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
# What a Ctrl-C of benchmark.run prints (run.py: finished runs are skipped, a run with a
# checkpoint resumes from it).
RESUME = (
    "interrupted: re-run the same command to resume (finished runs are skipped, a killed run "
    "resumes from its last checkpoint when train.checkpoint_every saved one)"
)
# OmegaConf errors that only a config value can cause (raised while Hydra resolves the run
# folder's name, which reads the whole config); other OmegaConf errors may be bugs.
CONFIG_VALUE_ERRORS = (
    GrammarParseError,
    InterpolationKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    UnsupportedInterpolationType,
)


def debug() -> bool:
    """Full tracebacks for every error (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> NoReturn:
    """Print `error: <message>` (one line) to stderr and exit with status 2."""
    raise SystemExit(error(message))


def user_error(e: Exception) -> int:
    """A tool's user error (an unreadable file, a bad value) as one `error:` line and status 2:
    an OSError worded by `file_error`, anything else by its message. With HYDRA_FULL_ERROR=1 it
    is raised again, traceback and all."""
    if debug():
        raise e
    return error(file_error(e) if isinstance(e, OSError) else str(e))


def error(message: str) -> int:
    """Print `error: <message>` (one line) to stderr; returns the exit status 2 (for a CLI's
    `main` that returns its status)."""
    line = " ".join(message.split())  # never more than one line, whatever the source wrote
    print(f"error: {line}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


@contextmanager
def on_interrupt(message: str = "interrupted: nothing else was done; re-run the same command"
                 ) -> Iterator[None]:  # fmt: skip
    """Ctrl-C (KeyboardInterrupt) inside this block: `message` as one line on stderr and exit
    status 130, no traceback (HYDRA_FULL_ERROR=1: the traceback)."""
    try:
        yield
    except KeyboardInterrupt:
        if debug():
            raise
        interrupted(message)


def interrupted(message: str) -> NoReturn:
    """Print `message` (one line) to stderr and exit with status 130."""
    print(" ".join(message.split()), file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_STATUS)


def file_error(e: OSError) -> str:
    """`<file>: <why>` for an OSError (`<why>` alone when it names no file)."""
    why = e.strerror or str(e)
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {why}" if names else why


def unwritable(folder: str | Path) -> str | None:
    """Why a file cannot be written in `folder` (created if missing), or None when it can.

    Creates the folder and a temporary file in it, then removes the file: only a real write
    tells, since root ignores permission bits and os.access does not see every read-only
    mount or file system (sysfs, a read-only bind mount)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def read_json_file(path: str | Path) -> Any:
    """The JSON document in `path`; ValueError / OSError name the file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")  # OSError: names the file
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); is the file "
                         "truncated?") from None  # fmt: skip


def read_yaml_mapping(path: str | Path) -> Any:
    """The YAML mapping in `path` as an OmegaConf DictConfig; ValueError / OSError name the file."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        why = f"{problem} at line {mark.line + 1}" if mark and problem else first_line(e)
        raise ValueError(
            f"{path}: not a readable YAML file ({why}); is the file truncated?"
        ) from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a YAML mapping (key: value), found a list")
    return cfg


def first_line(text: object) -> str:
    """The first non-blank line of `text`, stripped (one line of a multi-line message)."""
    return next((s.strip() for s in str(text).splitlines() if s.strip()), "")


def _groups() -> str:
    return ", ".join(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"))


def _cli_value(key: str) -> str | None:
    """The last `key=value` (or `+key=` / `++key=`) on the command line, or None."""
    value = None
    for arg in sys.argv[1:]:
        name, eq, v = arg.lstrip("+").partition("=")
        if eq and name == key:
            value = v
    return value


def _made_by_hydra(ex: BaseException) -> bool:
    """True if the innermost frame outside pathlib/os/OmegaConf is Hydra's (its run or sweep
    folder, or a file it writes there: multirun.yaml, .hydra/*.yaml)."""
    for frame in reversed(traceback.extract_tb(ex.__traceback__)):
        if os.path.basename(frame.filename) in ("pathlib.py", "os.py"):
            continue
        if f"{os.sep}omegaconf{os.sep}" in frame.filename:
            continue
        return f"{os.sep}hydra{os.sep}" in frame.filename
    return False


def _made_by(ex: BaseException, package: str) -> bool:
    """True if the exception was raised inside `package` (a folder name on the frame's path)."""
    frames = traceback.extract_tb(ex.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def _output_error(e: OSError) -> str:
    """One line for a run or sweep folder (or a file in it) that Hydra cannot create or write:
    the results_dir of the command line when there is one, the file and what to do."""
    making = any(f.name in ("mkdir", "makedirs") for f in traceback.extract_tb(e.__traceback__))
    where = (
        f"cannot {'create the run folder' if making else 'write'} {e.filename}: {e.strerror or e}"
    )
    results_dir = _cli_value("results_dir")
    hint = ""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; use a writable results_dir"
        if not making:  # an existing folder, maybe of finished runs
            hint = (
                "; Hydra writes its log and config into the run folders on every launch, "
                "finished runs included: use a writable results_dir (a copy of this one "
                "resumes it), or read the results with python -m benchmark.report "
                f"{results_dir or '<folder>'} --out <writable folder>"
            )
    if results_dir is not None:
        return f"results_dir={results_dir}: {where}{hint}"
    return f"{where} (set results_dir, experiment_name or hydra.run.dir to a writable place){hint}"


def launcher_choice() -> str:
    """The hydra/launcher choice of this run (the command line's, else the composed config's)."""
    choice = _cli_value("hydra/launcher")
    if choice is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choice = HydraConfig.get().runtime.choices.get("hydra/launcher")
        except Exception:  # noqa: BLE001  (a best-effort name only)
            choice = None
    return str(choice or "slurm")


def no_slurm() -> str | None:
    """Why SLURM cannot take jobs here (no srun or sbatch on PATH), or None."""
    missing = [tool for tool in ("srun", "sbatch") if shutil.which(tool) is None]
    return f"no {'/'.join(missing)} on PATH" if missing else None


def slurm_missing(launcher: str, why: str) -> str:
    """The one-line message for a SLURM launcher used where there is no SLURM."""
    local = "slurm_local_fanout" if "fanout" in launcher else "slurm_local"
    return (
        f"hydra/launcher={launcher}: no SLURM here ({why}); use hydra/launcher=local "
        f"(processes on this machine) or {local} to test the SLURM path"
    )


def _composition(ex: ConfigCompositionException) -> str:
    """One line for Hydra's composition errors: the override, what is wrong, what is valid."""
    if isinstance(ex, MissingConfigException):
        path = str(ex.missing_cfg_file or "")
        group, _, choice = path.rpartition("/")
        if group and ex.options:
            return f"{group}={choice}: no such option; valid: {', '.join(ex.options)}"
        if group:
            return f"{group}={choice}: no such option"
        return first_line(ex)
    text, cause = str(ex), ex.__cause__
    if m := re.search(r"Override (\S+) looks like a config group override, but config group "
                      r"'([^']+)' does not exist", text):  # fmt: skip
        return f"{m[1]}: no config group {m[2]!r}; groups: {_groups()}"
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m[1]
        line = first_line(text.split("use +", 1)[1]) if "use +" in text else key
        valid = _valid_keys(cause)
        hint = f"; valid keys here: {valid}" if valid else ""
        return f"{line}: no such key {key!r}{hint} (+{line} adds a new key)"
    if m := re.search(r"An item is already at '([^']+)'", text):
        return f"+{m[1]}: {m[1]} already exists; set it without the +"
    if m := re.search(r"Sweep parameters? '([^']+)' requires --multirun", text):
        return f"{m[1]}: a sweep needs -m (--multirun)"
    if m := re.search(r"Ambiguous value for argument '([^']+)'", text):
        return (
            f"{m[1]}: a comma-separated value sweeps only with -m (--multirun); for a list write "
            "key=[a,b], for a string quote it: key='a,b'"
        )
    line = first_line(text) or type(ex).__name__
    if isinstance(cause, (OmegaConfBaseException, ConfigError)):
        line = f"{line}: {first_line(cause)}"
    return line


def _non_name_choice(ex: ValueError) -> str:
    """`group=<a number, bool or null>`: name the override from the command line if we can."""
    for arg in sys.argv[1:]:
        group, eq, choice = arg.partition("=")
        folder = CONF_DIR / group
        if eq and folder.is_dir() and not (folder / f"{choice}.yaml").exists():
            valid = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            return f"{arg}: no such option; valid: {valid}"
    return f"a config group option must be a name ({first_line(ex)})"


def _valid_keys(cause: BaseException | None) -> str:
    """The keys of the node an unknown key was set in (OmegaConf names the parent node)."""
    parent = getattr(cause, "parent_node", None)
    try:
        keys = sorted(str(k) for k in parent.keys()) if parent is not None else []  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001  (a best-effort hint only)
        return ""
    shown = ", ".join(keys[:25])
    return shown + (", ..." if len(keys) > 25 else "")


def describe(ex: BaseException) -> str | None:
    """The one-line message for a user error raised around the job, or None (a bug)."""
    if isinstance(ex, OverrideParseException):
        return f"{ex.override}: cannot parse this override ({first_line(ex.message)})"
    if isinstance(ex, ConfigCompositionException):
        return _composition(ex)
    if isinstance(ex, SearchPathException):
        return first_line(ex)
    if isinstance(ex, ValueError) and str(ex).startswith("Config group override must be"):
        return _non_name_choice(ex)  # `sae=0`, `model=null`: Hydra's plain ValueError
    if isinstance(ex, ConfigError):  # e.g. raised by a resolver while Hydra names the folder
        return str(ex)
    if isinstance(ex, OmegaConfBaseException) and isinstance(ex.__cause__, ConfigError):
        return str(ex.__cause__)
    if isinstance(ex, CONFIG_VALUE_ERRORS):  # a bad ${...} or a ??? left unset
        key = getattr(ex, "full_key", None)
        return f"{key}: {first_line(ex)}" if key else first_line(ex)
    if isinstance(ex, OSError) and _made_by_hydra(ex):
        return _output_error(ex)
    if (  # Hydra's job logging cannot open <run folder>/run.log (a read-only results folder)
        isinstance(ex, ValueError)
        and str(ex).startswith("Unable to configure handler")
        and isinstance(ex.__cause__, OSError)
    ):
        return _output_error(ex.__cause__)
    if isinstance(ex, RuntimeError) and _made_by(ex, "submitit") and "srun" in str(ex):
        return slurm_missing(launcher_choice(), no_slurm() or "no srun on PATH")
    if isinstance(ex, FileNotFoundError) and ex.filename in ("sbatch", "srun"):  # submitit's call
        return slurm_missing(launcher_choice(), no_slurm() or f"no {ex.filename} on PATH")
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Within this block, Hydra reports user errors as `error: ...` + exit 2 (see the module
    docstring); with HYDRA_FULL_ERROR=1 it is a no-op."""
    if debug():
        yield
        return
    import hydra._internal.utils as hydra_utils

    original: Callable[[Any], Any] = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as ex:
                message = describe(ex)
                if message is None:
                    raise  # a bug: Hydra's own report, status 1
                fail(message)

        return original(guarded)

    hydra_utils.run_and_report = run_and_report  # type: ignore[assignment]
    try:
        yield
    finally:
        hydra_utils.run_and_report = original  # type: ignore[assignment]
