"""The measurements behind conf/train/cpu.yaml: short-run recipes on real cached activations.

    python scripts/tune_cpu_recipe.py [--layer 6] [--site residual] [--target 40]
        [--tokens 600000] [--width 2304] [--grid lr=1e-3,3e-3 jumprelu.bandwidth=0.01,0.03]

Trains each architecture with each point of the grid on the cached training activations of the
bundled model and reports, on the held-out evaluation activations (no LM pass: this is a proxy,
the real metrics come from `benchmark.run`): L0, FVU and the fraction of dead latents, plus the
calibrated lambda and tokens/s. Grid keys are train.* keys (dots reach nested ones).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmark.activations import get_activation_store
from benchmark.compose import compose_config
from benchmark.evaluate import SpliceStats
from benchmark.saes import build_sae
from benchmark.train import Sparsity, TrainConfig, train_sae


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    keys, values = [], []
    for item in items:
        k, v = item.split("=", 1)
        keys.append(k)
        values.append(v.split(","))
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--site", default="residual")
    p.add_argument("--target", type=int, default=40)
    p.add_argument("--tokens", type=int, default=600_000)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--saes", default="jumprelu,gated,topk,relu")
    p.add_argument("--grid", nargs="*", default=[])
    a = p.parse_args()
    base = [f"layer.index={a.layer}", f"site={a.site}", f"sparsity=l0_{a.target}", "train=cpu"]
    cfg = compose_config(base)
    train_store = get_activation_store(None, cfg, split="train")
    eval_store = get_activation_store(None, cfg, split="eval")
    x_eval = torch.cat(list(eval_store.batches(4096, seed=0, epochs=1, shuffle=False)))
    print(
        f"train {train_store.n_tokens} tokens, eval {len(x_eval)}; c={train_store.norm_scale:.2f}"
    )
    for point in parse_grid(a.grid) or [{}]:
        overrides = [f"train.{k}={v}" for k, v in point.items()]
        for name in a.saes.split(","):
            cfg = compose_config([*base, f"sae={name}", f"train.n_tokens={a.tokens}", *overrides])
            torch.manual_seed(0)
            sae = build_sae(cfg.sae, train_store.d_in, a.width)
            tc = TrainConfig.from_dict(dict(cfg.train))
            sp = Sparsity(cfg.sparsity.mode, cfg.sparsity.target_l0)
            t = time.perf_counter()
            res = train_sae(sae, lambda s, b=tc.batch_size: train_store.batches(b, seed=0), tc, sp,
                            progress=False)  # fmt: skip
            secs = time.perf_counter() - t
            stats = SpliceStats()
            with torch.no_grad():
                sae.eval()
                for xb in x_eval.split(4096):
                    out = sae(xb)
                    stats.add(xb, out.x_hat, out.f)
            freq = stats.fired.double() / stats.n
            print(f"{name:>9} {point} l0={stats.active / stats.n:6.1f} fvu={stats.fvu():.4f} "
                  f"dead={(freq == 0).double().mean():.3f} coef={res.coefficient:.3g} "
                  f"train_l0={res.train_l0:.1f} {res.tokens / secs:.0f} tok/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
