"""Harvest throughput on the bundled model: a bare truncated forward pass against the full
harvest (capture hooks, BOS masking, shard writes, manifest), three sites of one layer.

    .venv/bin/python scripts/bench_harvest.py [--tokens 16384] [--repeats 3] [--layer 6]

Prints tokens/s (window tokens, BOS included) of each and their ratio (target >= 0.9), plus
the two ways of reading sites without writing (`run_with_hooks` capture vs `run_with_cache`).
Runs are interleaved; the median and the best of `--repeats` are reported (the CPU may be
shared with other jobs, so the best is the less noisy estimate of what the code costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmark.activations import get_activation_stores, read_sites  # noqa: E402
from benchmark.data import non_special_mask, token_windows  # noqa: E402
from benchmark.models import load_model, resolve_device  # noqa: E402
from benchmark.specs import SiteSpec, SourceSpec  # noqa: E402

SITES = ("residual", "mlp", "attention")


def main() -> None:
    args = _parse()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = [f"layer.index={args.layer}", f"data.n_train_tokens={args.tokens}"]
        cfg = compose(config_name="config", overrides=base)
        site_nodes = [compose(config_name="config", overrides=[f"site={s}"]).site for s in SITES]
    source, sites = SourceSpec.of(cfg), [SiteSpec.of(s) for s in site_nodes]
    device = resolve_device(source.device)
    bridge = load_model(source.model, device, REPO / ".cache")
    windows = token_windows(source.data, bridge.tokenizer, "train", args.tokens)  # (N, T)
    mask = non_special_mask(windows, bridge.tokenizer)
    hooks = {s.name: f"blocks.{args.layer}.{s.hook}" for s in sites}
    batch = int(source.data.harvest.batch_size)
    n = windows.numel()
    print(f"{device}, layer {args.layer}, {len(windows)} windows x {windows.shape[1]} tokens")

    def bare() -> None:
        with torch.inference_mode():
            for b in range(0, len(windows), batch):
                bridge(
                    windows[b : b + batch].to(device),
                    stop_at_layer=args.layer + 1,
                    return_type=None,
                )

    def capture() -> None:
        for b in range(0, len(windows), batch):
            w, m = windows[b : b + batch].to(device), mask[b : b + batch].to(device)
            read_sites(bridge, w, m, hooks, args.layer)

    def with_cache() -> None:
        with torch.inference_mode():
            for b in range(0, len(windows), batch):
                bridge.run_with_cache(
                    windows[b : b + batch].to(device),
                    names_filter=list(hooks.values()),
                    stop_at_layer=args.layer + 1,
                    return_type=None,
                )

    def harvest() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            get_activation_stores(bridge, replace(source, cache_dir=Path(tmp)), sites=sites)

    runs = {"bare": bare, "capture": capture, "run_with_cache": with_cache, "harvest": harvest}
    bare()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    print(f"{'tokens/s':30s} {'median':>8s} {'best':>8s}")
    for label, k in (
        ("bare truncated forward", "bare"),
        ("  + capture hooks, no writes", "capture"),
        ("  run_with_cache, no writes", "run_with_cache"),
        ("harvest incl. cache writes", "harvest"),
    ):
        print(f"{label:30s} {med[k]:8.0f} {best[k]:8.0f}")
    ratio_med, ratio_best = med["harvest"] / med["bare"], best["harvest"] / best["bare"]
    print(f"{'ratio harvest / bare':30s} {ratio_med:8.3f} {ratio_best:8.3f}  (target >= 0.9)")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16_384, help="non-special tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer", type=int, default=6)
    return p.parse_args()


if __name__ == "__main__":
    main()
