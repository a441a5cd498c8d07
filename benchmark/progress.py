"""Progress of long loops: a tqdm bar on a terminal, periodic log lines elsewhere (SLURM logs).

    bar = progress(n_tokens, "harvest layer 6", unit="tok")
    for rows in ...:
        bar.update(len(rows))
    bar.close()  # or: with progress(...) as bar:

`progress(total, desc, unit="it", enabled=True, initial=0)` returns a `Progress`:
- `update(n)`: n more units done;
- `set_postfix(**kw)`: extra `key=value` fields shown after the rate (replacing earlier ones);
- `close()`: ends it; in log mode it writes one last line with the mean rate.
Where stderr is a terminal it is a tqdm bar. Elsewhere (batch jobs, SLURM logs, pytest) it
logs one INFO line on the `benchmark.progress` logger every `LOG_FRACTION` of the total or
every `LOG_SECONDS`, whichever comes first: done/total, percent, rate (units/s) and ETA, e.g.
`harvest layer 6: 49,152/100,000 tok (49%), 1,650 tok/s, ETA 0:00:31`. `total=None` (endless)
drops the percent and ETA. `enabled=False` shows nothing (the config's `progress: false`).
`initial` counts units done before (a resumed loop): they are shown but not in the rate.

Owns nothing else; knows no other benchmark module.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

log = logging.getLogger("benchmark.progress")
LOG_FRACTION = 0.1  # a log line every 10% of the total ...
LOG_SECONDS = 30.0  # ... or every 30 s, whichever comes first


class Progress:
    """What `progress` returns: `update(n)`, `set_postfix(**kw)`, `close()`; a context manager."""

    def update(self, n: float = 1) -> None:
        raise NotImplementedError

    def set_postfix(self, **kw: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: float | None, desc: str, unit: str = "it", *, enabled: bool = True, initial: float = 0
) -> Progress:
    """A tqdm bar when stderr is a terminal, else periodic log lines (see the module docstring)."""
    if enabled and _is_tty():
        return _Bar(total, desc, unit, initial)
    return _Lines(total, desc, unit, initial, enabled)


def _is_tty() -> bool:
    return sys.stderr.isatty()


class _Bar(Progress):
    def __init__(self, total: float | None, desc: str, unit: str, initial: float):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=desc, unit=unit, unit_scale=True,
            mininterval=1.0, dynamic_ncols=True,
        )  # fmt: skip

    def update(self, n: float = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kw: Any) -> None:
        self.bar.set_postfix(kw, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Lines(Progress):
    def __init__(self, total: float | None, desc: str, unit: str, initial: float, enabled: bool):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = self.initial = initial
        self.started = self.last_time = time.perf_counter()
        self.last_done = initial
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter()
        step = LOG_FRACTION * self.total if self.total else float("inf")
        if self.done - self.last_done >= step or now - self.last_time >= LOG_SECONDS:
            self._line(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def close(self) -> None:
        if not self.closed and self.done > self.last_done:
            self._line(time.perf_counter())
        self.closed = True

    def _line(self, now: float) -> None:
        self.last_time, self.last_done = now, self.done
        if not self.enabled:
            return
        rate = (self.done - self.initial) / max(now - self.started, 1e-9)
        parts = [f"{self.done:,.0f}{f'/{self.total:,.0f}' if self.total else ''} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(format_rate(rate, self.unit))
        if self.total and rate > 0 and self.done < self.total:
            eta = datetime.timedelta(seconds=round((self.total - self.done) / rate))
            parts.append(f"ETA {eta}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        log.info("%s: %s", self.desc, ", ".join(parts))


def format_rate(rate: float, unit: str) -> str:
    """`1,650 tok/s`, `2.4 window/s`, or below one unit a second `3.1 s/window` (never a
    rounded `0 window/s`); `0 tok/s` only when nothing was done."""
    if rate >= 10:
        return f"{rate:,.0f} {unit}/s"
    if rate >= 1:
        return f"{rate:.1f} {unit}/s"
    if rate > 0:
        return f"{1 / rate:,.1f} s/{unit}"
    return f"0 {unit}/s"
