"""Sparse probing on the SAE-Probes datasets: logistic-regression probes on the top-k latents of
each SAE against a probe on the dense activations at its hook.

    python -m benchmark.probe RESULTS_DIR [--datasets a,b] [--n-train N] [--n-test N]
                              [--ks 1,2,4,8,16] [--out DIR] [--data-dir DIR]
                              [--cache-dir DIR] [--device D] [--batch-size B]

The protocol is the "normal" setting of Kantamneni, Engels, Rajamanoharan, Tegmark, Nanda, *Are
Sparse Autoencoders Useful? A Case Study in Sparse Probing* (arXiv 2502.16681, 2025), as its
package `sae-probes` 0.4.2 runs it; written anew here on the suite's model and SAEs:
1. Data: a binary dataset's first 5,000 rows (`prompt`, `target`; labels 0/1 by sorted value).
   The datasets are read from the installed `sae-probes` wheel (`sae_probes/data/cleaned_data/
   *.csv.zst`, installed with --no-deps; its code is never imported) or from --data-dir.
2. Split: n_train and n_test texts drawn without overlap, half of each from each class.
3. Activations: each text tokenised alone, BOS first (the suite's training windows' BOS), the
   model run to the hook; the activation at the text's last token. Computed once per (model,
   hook) and shared by every SAE at that hook.
4. Latent choice, on the training split only: each latent scaled by its mean |activation| where
   it fires, then latents ranked by |mean over positives - mean over negatives|; the top k.
5. Probe and metric (`benchmark.probe_fit`): L2 logistic regression, C chosen by validation
   AUC, test AUC and accuracy; the dense baseline is the same probe on every dimension of the
   activation. docs/probing.md lists the deviations from the source.

Writes OUT/probe.csv (run_id, sae, target_l0, l0, seed, dataset, k, auc, accuracy, plus model,
hook, C, val_auc, n_train, n_test), OUT/probe.md (benchmark.report.probe) and OUT/probe.json
(the settings and wall time). OUT defaults to RESULTS_DIR/probe.

Knows the run folders (config.yaml, result.json, the SAE), the model loader and its hooks;
not the trainer, the activation cache or the data module.
"""

from __future__ import annotations

import argparse
import csv
import errno
import importlib.util
import io
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from benchmark import cli_errors, models
from benchmark.evaluate import hook_layer
from benchmark.fileio import write_json_atomic
from benchmark.probe_fit import CS, SPLIT_SEED, Probe, fit_probe, rank_latents
from benchmark.report.load import load_results
from benchmark.report.probe import probe_markdown
from benchmark.saes import load_sae
from benchmark.specs import ModelSpec, SiteSpec

# Short texts (names, one-line sentences and headlines) of six kinds, balanced classes, >= 1,772
# rows each: the whole default run takes minutes on a 2-core CPU (docs/probing.md).
DEFAULT_DATASETS = ("5_hist_fig_ismale", "6_hist_fig_isamerican", "154_athlete_sport_football",
                    "21_headline_istrump", "87_glue_cola", "92_glue_sst2")  # fmt: skip
DEFAULT_KS = (1, 2, 4, 8, 16)
MAX_ROWS = 5000  # the source's MAX_AMT: only a dataset's first 5,000 rows are used


@dataclass
class Dataset:
    name: str
    texts: list[str]
    labels: Tensor  # (n,) int64 in {0, 1}
    classes: tuple[str, str]  # the target values labelled 0 and 1


# ---- data ----


def dataset_dir() -> Path:
    """`sae_probes/data/cleaned_data` of the installed `sae-probes` package (not imported)."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the sae-probes package is not installed (scripts/setup.sh installs it "
                         "with --no-deps); or give --data-dir")  # fmt: skip
    return Path(spec.submodule_search_locations[0]) / "data" / "cleaned_data"


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a .csv or .csv.zst file, decompressed as a stream (never the whole file)."""
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            import zstandard

            stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        yield from io.TextIOWrapper(stream, encoding="utf-8", newline="")


def read_dataset(path: str | Path, max_rows: int = MAX_ROWS) -> Dataset:
    """A binary dataset: its first `max_rows` rows with a non-empty `prompt`. Read as data
    (the csv module); ValueError naming the file if it is not a two-class prompt/target CSV."""
    path = Path(path)
    try:
        reader = csv.DictReader(_text_lines(path))
        if not {"prompt", "target"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected the columns prompt and target, found "
                             f"{', '.join(reader.fieldnames or ()) or 'none'}")  # fmt: skip
        rows = [(r["prompt"], r["target"]) for _, r in zip(range(max_rows), reader)]
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    except Exception as e:  # zstandard.ZstdError: a damaged or truncated file
        if type(e).__module__.startswith("zstandard"):
            raise ValueError(f"{path}: not a readable .zst file ({e})") from None
        raise
    rows = [(text, target) for text, target in rows if text and text.strip()]
    values = sorted({t for _, t in rows}, key=_label_order)
    if len(values) != 2:
        raise ValueError(f"{path}: a binary dataset needs 2 target values, found {len(values)}")
    labels = torch.tensor([values.index(t) for _, t in rows], dtype=torch.int64)
    name = path.name.removesuffix(".zst").removesuffix(".csv")
    return Dataset(name, [text for text, _ in rows], labels, (values[0], values[1]))


def _label_order(value: str) -> tuple[int, float, str]:
    """Numbers by value, then text (False < True), like the source's LabelEncoder."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def balanced_split(labels: Tensor, n_train: int, n_test: int, seed: int = SPLIT_SEED,
                   name: str = "dataset") -> tuple[Tensor, Tensor]:  # fmt: skip
    """(train, test) indices, disjoint, each ceil(n/2) positives and the rest negatives, in a
    random order (the source's get_train_test_indices; torch's generator, not numpy's)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls, n_tr, n_te in ((1, -(-n_train // 2), -(-n_test // 2)),
                            (0, n_train // 2, n_test // 2)):  # fmt: skip
        pool = torch.nonzero(labels == cls).flatten()
        if len(pool) < n_tr + n_te:
            raise ValueError(f"--n-train={n_train} --n-test={n_test}: {name} has {len(pool)} "
                             f"texts of class {cls}, {n_tr + n_te} needed; lower them")  # fmt: skip
        pool = pool[torch.randperm(len(pool), generator=g)]
        train.append(pool[:n_tr])
        test.append(pool[n_tr : n_tr + n_te])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    return (train_idx[torch.randperm(len(train_idx), generator=g)],
            test_idx[torch.randperm(len(test_idx), generator=g)])  # fmt: skip


# ---- activations ----


@torch.inference_mode()
def last_token_activations(lm: Any, texts: Sequence[str], hook: str, batch_size: int = 64,
                           max_tokens: int = 128) -> Tensor:  # fmt: skip
    """(n, d_in) activation at `hook` on each text's last token; float32 on the CPU.

    Each text is [BOS] + its tokens, cut from the left to max_tokens; texts of similar length
    are batched, padded on the right (causal attention: the pad never reaches a real token)."""
    tok = lm.tokenizer
    bos = tok.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    ids = [
        [bos, *row][-max_tokens:] for row in tok(list(texts), add_special_tokens=False)["input_ids"]
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(lm.parameters()).device
    out = torch.empty(0)
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any = None) -> None:
        captured["x"] = act.reshape(*act.shape[:2], -1)  # (B, T, d_in); hook_z flattened

    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), T), pad, dtype=torch.int64)
        for b, i in enumerate(rows):
            batch[b, : len(ids[i])] = torch.tensor(ids[i])
        lm.run_with_hooks(batch.to(device), fwd_hooks=[(hook, capture)],
                          stop_at_layer=hook_layer(hook) + 1, return_type=None)  # fmt: skip
        last = torch.tensor([len(ids[i]) - 1 for i in rows])
        x = captured["x"][torch.arange(len(rows)), last.to(device)].float().cpu()  # (B, d_in)
        if out.numel() == 0:
            out = torch.empty(len(ids), x.shape[-1])
        out[torch.tensor(rows)] = x
    return out


# ---- runs -> rows ----


@dataclass
class Run:
    folder: Path
    record: dict  # the run's row of benchmark.report.load (run_id, sae, target_l0, l0, seed, ...)
    model: ModelSpec
    cache_dir: str
    hook: str


def find_runs(root: Path, cache_dir: str | None = None) -> list[Run]:
    """Every complete run under `root` with its hook; each SAE loaded once to check that it
    reads (ValueError / OSError name the file), before any model work."""
    frame, _ = load_results(root)
    runs = []
    for record in frame.to_dict("records"):
        folder = Path(record["run_dir"])
        cfg = cli_errors.read_yaml_mapping(folder / "config.yaml")
        missing = [k for k in ("model", "layer", "site", "cache_dir") if k not in cfg]
        if missing:
            raise ValueError(f"{folder / 'config.yaml'}: no {', '.join(missing)} (not a run's "
                             "config.yaml?)")  # fmt: skip
        result = cli_errors.read_json_file(folder / "result.json")
        hook = result.get("hook") if isinstance(result, dict) else None
        model = ModelSpec.of(cfg.model)
        hook = hook or models.hook_name(model, int(cfg.layer.index), SiteSpec.of(cfg.site))
        load_sae(folder, "cpu")
        runs.append(Run(folder, record, model, cache_dir or str(cfg.cache_dir), hook))
    return runs


def complete_runs(results_dir: str | Path, cache_dir: str | None = None) -> tuple[Path, list[Run]]:
    """(the folder, its complete runs) for a tool that reads SAEs (probe, interp): an OSError
    when the folder does not exist, ValueError when it holds no complete run."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder (give a results folder)", str(root))
    runs = find_runs(root, cache_dir)
    if not runs:
        raise ValueError(f"{root}: no complete run (result.json) under this folder")
    return root, runs


def probe_run(sae: Any, X_train: Tensor, y_train: Tensor, X_test: Tensor, y_test: Tensor,
              ks: Sequence[int]) -> Iterator[tuple[int, Probe]]:  # fmt: skip
    """(k, probe) for each k: the SAE's code on both splits, latents ranked on the training one."""
    with torch.inference_mode():
        device = next(sae.parameters()).device
        f_train = sae(X_train.to(device)).f.float().cpu()  # (n_train, d_sae)
        f_test = sae(X_test.to(device)).f.float().cpu()
    top = rank_latents(f_train, y_train)
    for k in ks:
        yield k, fit_probe(f_train[:, top[:k]], y_train, f_test[:, top[:k]], y_test)


def probe(results_dir: str | Path, *, datasets: Sequence[str] = DEFAULT_DATASETS,
          n_train: int = 1024, n_test: int = 512, ks: Sequence[int] = DEFAULT_KS,
          out: str | Path | None = None, data_dir: str | Path | None = None,
          device: str = "auto", cache_dir: str | None = None, batch_size: int = 64,
          log: Any = print) -> pd.DataFrame:  # fmt: skip
    """Probe every complete run under `results_dir` (module docstring); the tidy frame written
    to OUT/probe.csv. Runs, SAEs, datasets, splits and OUT are checked before the model loads:
    ValueError, or an OSError naming its file."""
    start = time.perf_counter()
    root, runs = complete_runs(results_dir, cache_dir)
    folder = Path(data_dir) if data_dir else dataset_dir()
    data = {}
    for name in datasets:
        path = next((p for p in (folder / f"{name}.csv.zst", folder / f"{name}.csv")
                     if p.is_file()), None)  # fmt: skip
        if path is None:
            raise ValueError(f"--datasets={name}: no {name}.csv.zst in {folder}; valid: the "
                             "names of its files, e.g. " + ", ".join(DEFAULT_DATASETS[:3]))  # fmt: skip
        ds = read_dataset(path)
        data[name] = (ds, *balanced_split(ds.labels, n_train, n_test, name=name))
    out_dir = Path(out) if out else root / "probe"
    why = cli_errors.unwritable(out_dir)
    if why is not None:
        raise ValueError(f"--out={out_dir}: cannot be written ({why}); give a writable --out")
    dev = models.resolve_device(device, "--device")

    rows: list[dict] = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((_model_key(run), run.hook), []).append(run)
    lms: dict[str, Any] = {}
    for (model_key, hook), members in sorted(groups.items(), key=lambda kv: kv[0]):
        first = members[0]
        if model_key not in lms:
            lms.clear()  # one model in memory at a time; groups of one model are adjacent
            lms[model_key] = models.load_model(first.model, dev, first.cache_dir)
        base = {"model": first.record["model"], "hook": hook}
        splits = {}  # dataset -> (X_train, y_train, X_test, y_test): one model pass each
        for name, (ds, tr, te) in data.items():
            t0 = time.perf_counter()
            X = last_token_activations(lms[model_key], [ds.texts[i] for i in torch.cat([tr, te])],
                                       hook, batch_size)  # fmt: skip
            splits[name] = (X[: len(tr)], ds.labels[tr], X[len(tr) :], ds.labels[te])
            dense = fit_probe(*splits[name])
            rows.append({"run_id": DENSE_ID, "sae": "dense", "target_l0": math.nan,
                         "l0": math.nan, "seed": math.nan, **base, "dataset": name,
                         "k": X.shape[1], **dense._asdict(), "n_train": len(tr),
                         "n_test": len(te)})  # fmt: skip
            log(f"[probe] {hook} {name}: activations and dense probe (AUC {dense.auc:.3f}) in "
                f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        for run in members:
            t0, r = time.perf_counter(), run.record
            sae = load_sae(run.folder, dev).eval()
            for name, split in splits.items():
                for k, p in probe_run(sae, *split, ks):
                    rows.append({"run_id": r["run_id"], "sae": r["sae"],
                                 "target_l0": r["target_l0"], "l0": r["l0"], "seed": r["seed"],
                                 **base, "dataset": name, "k": k, **p._asdict(),
                                 "n_train": len(split[0]), "n_test": len(split[2])})  # fmt: skip
            log(f"[probe] {r['run_id']}: {len(splits)} datasets in "
                f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    frame = pd.DataFrame(rows, columns=[*CSV_COLUMNS])
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "probe.csv", index=False)
    (out_dir / "probe.md").write_text(probe_markdown(frame))
    write_json_atomic(out_dir / "probe.json", {
        "eval": "sparse_probing", "source": "Kantamneni et al. 2025, arXiv 2502.16681; "
        "sae-probes 0.4.2 (normal setting)", "results_dir": str(root), "datasets": list(data),
        "data_dir": str(folder), "n_train": n_train, "n_test": n_test, "ks": list(ks),
        "split_seed": SPLIT_SEED, "C_grid": CS, "max_rows": MAX_ROWS, "n_runs": len(runs),
        "hooks": sorted({h for _, h in groups}), "device": str(dev),
        "wall_seconds": time.perf_counter() - start,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    return frame


DENSE_ID = "dense"
CSV_COLUMNS = ("run_id", "sae", "target_l0", "l0", "seed", "dataset", "k", "auc", "accuracy",
               "model", "hook", "C", "val_auc", "n_train", "n_test")  # fmt: skip


def _model_key(run: Run) -> str:
    """Runs share a loaded model when their model config and cache folder are the same."""
    return f"{run.model!r}|{run.cache_dir}"


def int_list(option: str, text: str, low: int) -> list[int]:
    """Comma-separated integers >= low; ValueError naming the option otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise ValueError(f"{option}={text!r}: expected comma-separated integers >= {low}, "
                         "e.g. 1,2,4,8,16")  # fmt: skip
    return values


def one_int(option: str, text: str, low: int) -> int:
    """An integer >= low; ValueError naming the option otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise ValueError(f"{option}={text!r}: expected an integer >= {low}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. A user error is one `error: ...` line on stderr and exit status 2, found before
    the model loads; Ctrl-C: one line, status 130; HYDRA_FULL_ERROR=1: tracebacks instead."""
    p = argparse.ArgumentParser(prog="python -m benchmark.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("results_dir", type=Path, help="a folder of runs (or one run's folder)")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated SAE-Probes dataset names (default: %(default)s)")  # fmt: skip
    p.add_argument("--n-train", default="1024", help="training texts per dataset (>= 16)")
    p.add_argument("--n-test", default="512", help="test texts per dataset (>= 2)")
    p.add_argument("--ks", default="1,2,4,8,16", help="numbers of latents to probe on")
    p.add_argument("--out", type=Path, help="output folder (default RESULTS_DIR/probe)")
    p.add_argument("--data-dir", type=Path, help="a folder of <name>.csv(.zst) files "
                   "(default: the installed sae-probes package's)")  # fmt: skip
    p.add_argument("--cache-dir", help="the model cache (default: each run's cache_dir)")
    p.add_argument("--batch-size", default="64", help="texts per forward pass")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    with cli_errors.on_interrupt("interrupted: nothing was written; re-run the same command"):
        try:
            n_train = one_int("--n-train", a.n_train, 16)
            n_test = one_int("--n-test", a.n_test, 2)
            batch_size = one_int("--batch-size", a.batch_size, 1)
            ks = int_list("--ks", a.ks, 1)
            datasets = [d for d in a.datasets.split(",") if d]
            if not datasets:
                raise ValueError(f"--datasets={a.datasets!r}: expected comma-separated names, "
                                 "e.g. " + ",".join(DEFAULT_DATASETS[:2]))  # fmt: skip
            frame = probe(a.results_dir, datasets=datasets, n_train=n_train, n_test=n_test,
                          ks=ks, out=a.out, data_dir=a.data_dir, device=a.device,
                          cache_dir=a.cache_dir, batch_size=batch_size)  # fmt: skip
        except (OSError, ValueError) as e:
            return cli_errors.user_error(e)
    out = a.out or a.results_dir / "probe"
    print(probe_markdown(frame))
    print(f"{len(frame)} probes: {out}/probe.csv, {out}/probe.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
