"""Export a trained run's SAE in a released format others can load.

    python -m benchmark.export RUN_DIR --format saelens --out OUT       # cfg.json + sae_weights.safetensors
    python -m benchmark.export RUN_DIR --format gemma_scope --out OUT   # OUT/params.npz (JumpReLU)

RUN_DIR is a finished run's folder: sae.safetensors + sae_config.yaml (the scale-folded SAE,
reading raw activations) and result.json (hook, model, d_in, d_sae); config.yaml, when present,
adds the model's hub name and the context length to SAE-Lens's metadata. The formats and their
exact weight maps are in interop/saelens.py and interop/gemma_scope.py; the same modules load
them back (tests/test_interop.py checks the round trip).

Knows the run folder's files and the two writers; loads no model and no data.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from benchmark import cli_errors
from benchmark.fileio import honour_umask
from benchmark.results import read_result
from benchmark.saes import load_sae
from interop.gemma_scope import PARAMS, write_gemma_scope
from interop.saelens import write_saelens

FORMATS = ("saelens", "gemma_scope")


def saelens_metadata(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """SAE-Lens metadata of a run: hook_name, model_name (the hub name TransformerLens knows,
    else the suite's model name), context_size, and where it came from."""
    meta: dict[str, Any] = {"hook_name": result["hook"], "model_name": result.get("model")}
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        cfg = OmegaConf.load(cfg_file)
        meta["model_name"] = OmegaConf.select(cfg, "model.architecture") or meta["model_name"]
        meta["context_size"] = OmegaConf.select(cfg, "data.context_length")
    meta["sae_bench_run"] = result.get("run_id") or run_dir.name
    return meta


def export(run_dir: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Write RUN_DIR's SAE in `fmt` under `out`; returns the files written."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    result = read_result(run_dir)
    if not result or "hook" not in result:
        raise ValueError(f"{run_dir}: no result.json with a hook (is the run finished?)")
    sae = load_sae(run_dir).eval()
    for key in ("d_in", "d_sae"):
        if key in result and int(result[key]) != getattr(sae, key):
            raise ValueError(f"{run_dir}: result.json says {key}={result[key]}, the SAE has "
                             f"{getattr(sae, key)}")  # fmt: skip
    if fmt == "gemma_scope":
        written = [write_gemma_scope(sae, out / PARAMS)]  # type: ignore[arg-type]
    else:
        written = list(write_saelens(sae, out, saelens_metadata(run_dir, result)))
    # safetensors writes through its own temporary file, created 0600: the files get the mode
    # a plain `open` gives (0666 minus the umask), like every other file the suite writes.
    return [honour_umask(p) for p in written]


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Every user error is one `error: ...` line on stderr and exit status 2, before
    anything is written: RUN_DIR missing or not a folder; its result.json missing or not valid
    JSON, or its config.yaml (optional) not a YAML mapping, each named; an SAE file its loader
    cannot read (benchmark.saes.load_sae: ValueError / OSError, naming the file); a file that
    cannot be read or written (any OSError: its file and why). Ctrl-C: one line, status 130;
    HYDRA_FULL_ERROR=1: tracebacks instead."""
    parser = argparse.ArgumentParser(prog="python -m benchmark.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", type=Path, help="a finished run's folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    with cli_errors.on_interrupt("interrupted: the export may be incomplete; re-run the same "
                                 "command"):  # fmt: skip
        try:
            if not run_dir.is_dir():
                raise FileNotFoundError(errno.ENOENT, "no such folder (give a finished run's "
                                        "folder)", str(run_dir))  # fmt: skip
            if not (run_dir / "result.json").is_file():
                raise FileNotFoundError(errno.ENOENT, "no such file (is the run finished?)",
                                        str(run_dir / "result.json"))  # fmt: skip
            result = cli_errors.read_json_file(run_dir / "result.json")
            if not isinstance(result, dict):
                raise ValueError(f"{run_dir / 'result.json'}: expected a JSON object")
            if (run_dir / "config.yaml").exists():
                cli_errors.read_yaml_mapping(run_dir / "config.yaml")
            written = export(run_dir, args.format, args.out)
        except (OSError, ValueError, TypeError) as e:
            return cli_errors.user_error(e)
    print(json.dumps([str(p) for p in written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
