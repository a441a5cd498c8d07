"""The command line: `python -m benchmark.plan [-m] [flags] [overrides]` (see __main__.py)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmark import cli_errors
from benchmark.errors import ConfigError
from benchmark.plan.assumptions import MODEL_EFFICIENCY, PRECISION_RATIO
from benchmark.plan.basis import Options
from benchmark.plan.build import build_plan
from benchmark.plan.render import render


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and status 2, as for a bad override
        cli_errors.fail(message)


def parse_size(text: str, flag: str) -> float:
    """'500GB', '2T', '1.5TB', '1e12' -> bytes (SI)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]?)B?\s*", text)
    if not m:
        raise ConfigError(f"{flag}={text}: not a size; e.g. 500GB, 2TB, 1e12")
    scale = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[m[2]]
    return float(m[1]) * scale


def parse_args(argv: Sequence[str]) -> tuple[list[str], Options]:
    p = Parser(
        prog="python -m benchmark.plan",
        description="Plan a run or a sweep; takes the overrides of python -m benchmark.run.",
    )
    p.add_argument("-m", "--multirun", action="store_true", help="a sweep (as the run's -m)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--tflops", type=float, help="the device's matmul TFLOP/s in the model's "
                   "dtype, instead of measuring it here (x the efficiency)")  # fmt: skip
    p.add_argument("--sae-tflops", type=float, help="TFLOP/s of SAE steps that cannot be "
                   "timed here (default: --tflops x the train.precision ratio, "
                   f"{PRECISION_RATIO})")  # fmt: skip
    p.add_argument("--efficiency", type=float, help="model forward FLOP/s over the matmul's "
                   f"(default: {MODEL_EFFICIENCY})")  # fmt: skip
    p.add_argument("--disk-budget", metavar="SIZE", help="disk a cache may use, e.g. 2TB "
                   "(default: 50%% of the free space at cache_dir)")  # fmt: skip
    p.add_argument("--device-memory", metavar="SIZE", help="the device's memory (default: "
                   "this machine's; 80GB for a CUDA device it lacks)")  # fmt: skip
    p.add_argument("--no-timing", action="store_true", help="skip the SAE step timings")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for benchmark.run")
    a = p.parse_intermixed_args(list(argv))
    opts = Options(
        multirun=a.multirun, json=a.json, tflops=a.tflops, sae_tflops=a.sae_tflops,
        efficiency=a.efficiency,
        disk_budget=parse_size(a.disk_budget, "--disk-budget") if a.disk_budget else None,
        device_memory=parse_size(a.device_memory, "--device-memory") if a.device_memory else None,
        timing=not a.no_timing,
    )  # fmt: skip
    return list(a.overrides), opts


def jsonable(obj: Any) -> Any:
    """The plan with non-finite floats as null (JSON has no nan or inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmark.plan [-m] [flags] [overrides]`: print the plan (exit 0), or one
    `error: ...` line on stderr and exit 2 for a user error (HYDRA_FULL_ERROR=1: traceback)."""
    try:
        overrides, opts = parse_args(sys.argv[1:] if argv is None else argv)
        plan = build_plan(overrides, opts)
        if opts.json:
            Path(opts.json).write_text(json.dumps(jsonable(plan), indent=1) + "\n")
        print(render(plan), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ConfigError as e:
        if cli_errors.debug():
            raise
        cli_errors.fail(str(e))
    except Exception as e:
        message = None if cli_errors.debug() else cli_errors.describe(e)
        if message is None:
            raise
        cli_errors.fail(message)
    return 0
