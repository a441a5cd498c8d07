"""Training throughput of every architecture in conf/sae/ on synthetic activations.

    python scripts/bench_train.py [--d-in 576] [--width 4608] [--batch 4096] [--steps 8]
                                  [--k 40] [--device auto] [--precision fp32] [--sparse auto]
                                  [--crossover]

Prints tokens/s per architecture (forward + backward + Adam step through `train_sae`, so with
the trainer's before/after_optimizer_step hooks and bookkeeping), and its ratio to the *dense
bound*: the time of the six dense products of one SAE step at the same shapes (x @ W_enc,
f @ W_dec and the four backward matmuls), measured in the same run right before each
architecture, so that both sides of a ratio see the same machine load. A ratio above 1 means
the step costs less than its six dense products (a sparse step); a dense architecture cannot
reach 1. JumpReLU, ReLU and Gated start at the matched L0 (their `set_density`: the threshold or
the encoder / gate bias that gives L0 ~ k on the data, as after training): at their initial
values they fire on ~40-50% of the latents of this data, the regime of a run's first steps only.

--crossover compares the sparse and the dense path of TopK, JumpReLU and Gated at several densities
on this device (the measurement behind baselines/sparse.py's MAX_SPARSE_DENSITY).
Synthetic data makes it runnable anywhere (a GPU machine needs no model or corpus).
--precision is train.precision (fp32 | tf32 | bf16; tf32 and bf16 need CUDA): the trainer's
steps and the dense bound's six products both run at it, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from baselines.base import SparseAutoencoder
from benchmark.saes import build_sae
from benchmark.train import PRECISIONS, Sparsity, TrainConfig, matmul_precision, train_sae

CONF = Path(__file__).resolve().parents[1] / "conf" / "sae"


def nodes(k: int) -> dict[str, dict]:
    from omegaconf import OmegaConf

    out = {}
    for path in sorted(CONF.glob("*.yaml")):
        raw = OmegaConf.load(path)
        if "bandwidth" in raw:  # JumpReLU's: the values this bench has always timed
            raw.bandwidth, raw.threshold_init = 0.01, 0.01
        root = OmegaConf.create({"sae": raw, "sparsity": {"target_l0": k, "coefficient": 1e-3}})
        out[path.stem] = OmegaConf.to_container(root.sae, resolve=True)
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    """Mean wall time of fn over reps calls, after one warm-up call."""
    fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def dense_bound(
    batch: int, d_in: int, width: int, dev: torch.device, precision: str = "fp32"
) -> Callable[[], None]:
    """The six dense products of one SAE step: forward x @ W_enc and f @ W_dec, backward
    grad_f = g @ W_dec^T, grad_W_dec = f^T @ g, grad_x = grad_pre @ W_enc^T and
    grad_W_enc = x^T @ grad_pre; at train.precision `precision` (tf32: the TF32 flags, bf16:
    autocast, as the trainer's forward)."""
    x, g = torch.randn(batch, d_in, device=dev), torch.randn(batch, d_in, device=dev)
    W_enc, W_dec = torch.randn(d_in, width, device=dev), torch.randn(width, d_in, device=dev)

    def six() -> None:
        with matmul_precision(precision, dev.type):
            f = x @ W_enc
            f @ W_dec
            grad_f = g @ W_dec.t()
            f.t() @ g
            grad_f @ W_enc.t()
            x.t() @ grad_f

    return six


def build(name: str, node: dict, a: argparse.Namespace, x: torch.Tensor, sparse: object):
    torch.manual_seed(0)
    node = {**node, "sparse": sparse}
    sae = build_sae(node, a.d_in, a.width).to(x.device)
    sae.set_density(x, a.k)  # L0 ~ k, as after training (TopK-like: already at k)
    return sae


def train_rate(sae: SparseAutoencoder, x: torch.Tensor, cfg: TrainConfig, warm: int) -> tuple:
    """(tokens/s, L0) over cfg's steps, after `warm` untimed steps."""
    dev, B = x.device, x.shape[0]
    batches = lambda s: itertools.repeat(x)  # noqa: E731
    warm_cfg = TrainConfig(**{**cfg.__dict__, "n_tokens": B * warm})
    train_sae(sae, batches, warm_cfg, Sparsity("coefficient"), progress=False)
    sync(dev)
    t = time.perf_counter()
    res = train_sae(sae, batches, cfg, Sparsity("coefficient"), progress=False)
    sync(dev)
    return cfg.n_tokens / (time.perf_counter() - t), res.train_l0


def crossover(a: argparse.Namespace, x: torch.Tensor, cfg: TrainConfig) -> None:
    all_nodes = nodes(a.k)
    for k in (a.k // 2, a.k, 4 * a.k, 16 * a.k, 32 * a.k):
        if not 0 < k <= a.width:
            continue
        a_k = argparse.Namespace(**{**vars(a), "k": k})
        for name in ("topk", "jumprelu", "gated"):
            node = {**all_nodes[name], **({"k": k} if name == "topk" else {})}
            rate = {s: train_rate(build(name, node, a_k, x, s), x, cfg, 1) for s in (True, False)}
            print(f"{name:>10} k={k:5d} density={k / a.width:.4f}: sparse/dense step speed "
                  f"{rate[True][0] / rate[False][0]:.2f}x (L0 {rate[True][1]:.0f})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="train.precision; tf32 and bf16 need CUDA")  # fmt: skip
    p.add_argument("--sparse", default="auto", choices=["auto", "true", "false"],
                   help="sparse path of every architecture that has one")  # fmt: skip
    p.add_argument("--crossover", action="store_true", help="sparse vs dense speed by density")
    a = p.parse_args()
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))  # fmt: skip
    if a.precision != "fp32" and dev.type != "cuda":
        print(f"error: --precision {a.precision} needs CUDA, but the device is {dev}; "
              "use --precision fp32 there", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    sparse = {"auto": "auto", "true": True, "false": False}[a.sparse]
    x = torch.randn(a.batch, a.d_in, device=dev) / a.d_in**0.5
    cfg = TrainConfig(n_tokens=a.batch * a.steps, batch_size=a.batch, lr=1e-3, lr_warmup_steps=1,
                      log_every=10**9, dead_window_tokens=a.batch * 4,
                      precision=a.precision)  # fmt: skip
    print(f"device={dev} d_in={a.d_in} d_sae={a.width} batch={a.batch} steps={a.steps} k={a.k} "
          f"{a.precision} threads={torch.get_num_threads()} sparse={a.sparse}")  # fmt: skip
    if a.crossover:
        return crossover(a, x, cfg)
    six = dense_bound(a.batch, a.d_in, a.width, dev, a.precision)
    bounds = []
    for name in ("jumprelu", "gated", "topk", "batchtopk", "matryoshka_batchtopk", "relu"):
        sae = build(name, nodes(a.k)[name], a, x, sparse)
        bound = a.batch / seconds(six, dev, reps=max(2, a.steps // 2))  # tokens/s
        rate, l0 = train_rate(sae, x, cfg, warm=2)
        bounds.append(bound)
        print(f"{name:>10}: {rate:9.0f} tokens/s   ratio {rate / bound:5.2f}x the dense bound "
              f"({bound:.0f} tokens/s)   L0 {l0:.0f}", flush=True)  # fmt: skip
    print(
        f"{'dense':>10}: {statistics.median(bounds):9.0f} tokens/s   (six dense products, median)"
    )


if __name__ == "__main__":
    main()
