"""Hydra's own user errors as one line on stderr and exit status 2, like the suite's ConfigError.

Owns the translation of what Hydra raises before (or around) the job: a bad or unparsable
override, an unknown option of a config group (`sae=nope`), an unknown group or key, and an
output folder that cannot be created (`results_dir=/proc/x`). Hydra reports these through
`hydra._internal.utils.run_and_report` as several lines (some with a traceback) and exit
status 1; `one_line_errors()` wraps that function for the duration of one CLI call. Anything
else (a bug) keeps Hydra's report and status 1. `HYDRA_FULL_ERROR=1` turns all of this off and
shows full tracebacks, the suite's ConfigError included (`benchmark.run.main`).

Must not know the pipeline: it sees only exceptions and the command line.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

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
    line = " ".join(message.split())  # never more than one line, whatever the source wrote
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_STATUS)


def _first_line(text: object) -> str:
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
    """True if the innermost frame outside pathlib/os is Hydra's (its run or sweep folder)."""
    for frame in reversed(traceback.extract_tb(ex.__traceback__)):
        if os.path.basename(frame.filename) in ("pathlib.py", "os.py"):
            continue
        return f"{os.sep}hydra{os.sep}" in frame.filename
    return False


def _composition(ex: ConfigCompositionException) -> str:
    """One line for Hydra's composition errors: the override, what is wrong, what is valid."""
    if isinstance(ex, MissingConfigException):
        path = str(ex.missing_cfg_file or "")
        group, _, choice = path.rpartition("/")
        if group and ex.options:
            return f"{group}={choice}: no such option; valid: {', '.join(ex.options)}"
        if group:
            return f"{group}={choice}: no such option"
        return _first_line(ex)
    text, cause = str(ex), ex.__cause__
    if m := re.search(r"Override (\S+) looks like a config group override, but config group "
                      r"'([^']+)' does not exist", text):  # fmt: skip
        return f"{m[1]}: no config group {m[2]!r}; groups: {_groups()}"
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m[1]
        line = _first_line(text.split("use +", 1)[1]) if "use +" in text else key
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
    line = _first_line(text) or type(ex).__name__
    if isinstance(cause, (OmegaConfBaseException, ConfigError)):
        line = f"{line}: {_first_line(cause)}"
    return line


def _non_name_choice(ex: ValueError) -> str:
    """`group=<a number, bool or null>`: name the override from the command line if we can."""
    for arg in sys.argv[1:]:
        group, eq, choice = arg.partition("=")
        folder = CONF_DIR / group
        if eq and folder.is_dir() and not (folder / f"{choice}.yaml").exists():
            valid = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            return f"{arg}: no such option; valid: {valid}"
    return f"a config group option must be a name ({_first_line(ex)})"


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
        return f"{ex.override}: cannot parse this override ({_first_line(ex.message)})"
    if isinstance(ex, ConfigCompositionException):
        return _composition(ex)
    if isinstance(ex, SearchPathException):
        return _first_line(ex)
    if isinstance(ex, ValueError) and str(ex).startswith("Config group override must be"):
        return _non_name_choice(ex)  # `sae=0`, `model=null`: Hydra's plain ValueError
    if isinstance(ex, ConfigError):  # e.g. raised by a resolver while Hydra names the folder
        return str(ex)
    if isinstance(ex, OmegaConfBaseException) and isinstance(ex.__cause__, ConfigError):
        return str(ex.__cause__)
    if isinstance(ex, CONFIG_VALUE_ERRORS):  # a bad ${...} or a ??? left unset
        key = getattr(ex, "full_key", None)
        return f"{key}: {_first_line(ex)}" if key else _first_line(ex)
    if isinstance(ex, OSError) and _made_by_hydra(ex):
        where = f"cannot create the run folder {ex.filename}: {ex.strerror or ex}"
        results_dir = _cli_value("results_dir")
        if results_dir is not None:
            return f"results_dir={results_dir}: {where}"
        return f"{where} (set results_dir, experiment_name or hydra.run.dir to a writable place)"
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
