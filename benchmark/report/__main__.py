"""The command line: ``python -m benchmark.report RESULTS_DIR [--out DIR] [--latex]
[--targets 10,20,40] [--l0-tolerance X] [--resolution R] [--claims-l0 28,40,57]``. Prints table 1, the paper's claims judged, the
problems and the files written; adds ``probe.md`` when RESULTS_DIR/probe/probe.csv exists
(``python -m benchmark.probe``) and ``interp.md`` with ``fig_interp`` when
RESULTS_DIR/interp/interp.csv exists (``python -m benchmark.interp``).

Errors end as one `error: ...` line on stderr and exit status 2: RESULTS_DIR missing, not a
folder, or without any result.json (or Hydra run folder) under it; an output folder that cannot
be written (the default RESULTS_DIR/report of a read-only results folder: use --out), checked
before anything is computed; a file that cannot be written. A result.json that does not parse
is not an error: it is listed under the report's problems, like a failed run. Ctrl-C: one line,
exit status 130. HYDRA_FULL_ERROR=1 shows the tracebacks instead."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmark import cli_errors
from benchmark.report.interp import write_interp
from benchmark.report.load import load_results
from benchmark.report.probe import write_probe
from benchmark.report.tables import to_markdown
from benchmark.report.write import TABLE1_TITLE, write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmark.report", description=__doc__)
    parser.add_argument("results_dir", type=Path, help="folder searched recursively for runs")
    parser.add_argument("--out", type=Path, help="output folder (default RESULTS_DIR/report)")
    parser.add_argument(
        "--latex", action="store_true", help="also write table1_matched_l0.tex, claims.tex"
    )
    parser.add_argument("--targets", help="comma-separated L0 values for table 1, e.g. 10,20,40")
    parser.add_argument(
        "--l0-tolerance",
        type=float,
        default=0.0,
        help="relative L0 distance within which a curve's end point fills a target outside "
        "its measured range (marked † / from_endpoint; default 0: never)",
    )
    parser.add_argument(
        "--resolution",
        type=float,
        default=0.0,
        help="relative run-to-run spread: table 1 bolds the best only where it leads the "
        "runner-up by more than this fraction (and the 95%% intervals); default 0",
    )
    parser.add_argument(
        "--claims-l0",
        help="comma-separated L0 values at which the claims are judged (default: the targets "
        "inside the swept range and the geometric midpoints of consecutive targets)",
    )
    return parser.parse_args(argv)


def l0_list(option: str, text: str | None) -> list[float] | None:
    """A comma-separated list of positive L0 values, or a one-line error (exit 2)."""
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        print(f"error: {option}={text!r}: expected comma-separated positive L0 values, e.g. "
              "20,40,80", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = l0_list("--targets", args.targets)
    claims_l0 = l0_list("--claims-l0", args.claims_l0)
    if not (math.isfinite(args.resolution) and 0 <= args.resolution < 1):
        print(f"error: --resolution={args.resolution!r}: expected a fraction in [0, 1), e.g. "
              "0.06 for a 6% run-to-run spread", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    with cli_errors.on_interrupt("interrupted: the report may be incomplete; re-run the same "
                                 "command"):  # fmt: skip
        try:
            return report(args, targets, claims_l0)
        except OSError as e:
            if cli_errors.debug():
                raise
            cli_errors.fail(cli_errors.file_error(e))


def report(args: argparse.Namespace, targets: list[float] | None,
           claims_l0: list[float] | None) -> int:  # fmt: skip
    """Load, check the output folder, write and print (`main` without its error handling)."""
    root = args.results_dir
    if not root.exists():
        cli_errors.fail(f"{root}: no such folder")
    if not root.is_dir():
        cli_errors.fail(f"{root}: not a folder (give the folder holding the runs)")
    df, problems = load_results(root)
    if df.empty and problems.empty:
        cli_errors.fail(f"{root}: no result.json under this folder (run a sweep first, or point "
                        "at results/<experiment>)")  # fmt: skip
    out = args.out or root / "report"
    why = cli_errors.unwritable(out)
    if why is not None:
        if args.out is None:
            cli_errors.fail(f"{root}: cannot write the report into {out} ({why}); give a "
                            "writable folder with --out DIR")  # fmt: skip
        cli_errors.fail(f"--out {out}: cannot write the report here ({why})")
    table, written, notes = write_report(
        df, problems, out, targets, args.latex, args.l0_tolerance, claims_l0, args.resolution
    )
    extras = (("probe", "probe.csv", write_probe, "probe table"),  # python -m benchmark.probe
              ("interp", "interp.csv", write_interp, "interp summary"))  # benchmark.interp  # fmt: skip
    for folder, name, writer, what in extras:
        csv = root / folder / name
        if csv.is_file():
            try:
                written += writer(csv, out)
            except ValueError as e:  # a damaged CSV leaves its summary out, nothing else
                notes.append(f"{what} left out: {e}")
    if not table.empty:
        print(f"# Matched-L0 table ({len(df)} complete runs)\n")
        print(to_markdown(table, TABLE1_TITLE))
    if out / "claims.md" in written:
        print((out / "claims.md").read_text())
    print(f"# Problems ({len(problems)})")
    for run in problems.itertuples(index=False):
        print(f"- {run.status}: {run.run_dir}: {run.reason}")
    for note in notes:
        print(f"note: {note}")
    print("\n# Written")
    print("\n".join(f"- {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
