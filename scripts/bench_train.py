"""Training throughput of every architecture in conf/sae/ on synthetic activations.

    python scripts/bench_train.py [--d-in 576] [--width 2304] [--batch 1024] [--steps 30]
                                  [--device auto]

Prints tokens/s per architecture, and the ratio to a plain ReLU-SAE step measured in the same
run (the cheapest possible step: one matmul each way, no sparsity bookkeeping). Synthetic data
makes it runnable anywhere (a GPU machine needs no model or corpus).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, train_sae

CONF = Path(__file__).resolve().parents[1] / "conf" / "sae"


def nodes(k: int) -> dict[str, dict]:
    from omegaconf import OmegaConf

    out = {}
    for path in sorted(CONF.glob("*.yaml")):
        raw = OmegaConf.load(path)
        root = OmegaConf.create({"sae": raw, "sparsity": {"target_l0": k, "coefficient": 1e-3},
                                 "train": {"jumprelu": {"bandwidth": 0.01, "threshold_init": 0.01}}})  # fmt: skip
        out[path.stem] = OmegaConf.to_container(root.sae, resolve=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))  # fmt: skip
    x = torch.randn(a.batch, a.d_in, device=dev) / a.d_in**0.5
    cfg = TrainConfig(n_tokens=a.batch * a.steps, batch_size=a.batch, lr=1e-3, lr_warmup_steps=1,
                      log_every=10**9, dead_window_tokens=a.batch * 4)  # fmt: skip
    print(f"device={dev} d_in={a.d_in} d_sae={a.width} batch={a.batch} steps={a.steps} "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    rates = {}
    for name, node in nodes(a.k).items():
        torch.manual_seed(0)
        sae = build_sae(node, a.d_in, a.width).to(dev)
        warm = TrainConfig(**{**cfg.__dict__, "n_tokens": a.batch * 3})
        train_sae(sae, lambda s: itertools.repeat(x), warm, Sparsity("coefficient"), progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_sae(sae, lambda s: itertools.repeat(x), cfg, Sparsity("coefficient"), progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = a.batch * a.steps / (time.perf_counter() - t)
    ref = rates.get("relu", max(rates.values()))
    for name, r in rates.items():
        print(f"{name:>10}: {r:10.0f} tokens/s   ({r / ref:.2f}x the ReLU step)")


if __name__ == "__main__":
    main()
