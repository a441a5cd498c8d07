"""Where a model has massive activations: per layer and site, the activation norms of the
training split's first --tokens positions (BOS and other special tokens excluded, as the
harvester does), relative to the median norm of that (layer, site).

    python scripts/massive_activations.py [model=smollm2_135m] [--tokens 20000] [--multiple 10]

Prints, per (layer, site): the median norm, max / median, the share of positions over
--multiple x the median, and the share of the total squared norm (the variance an SAE is
asked to fit, up to the mean) those positions hold. A (layer, site) where a handful of
positions hold most of the squared norm is one where every SAE fits those positions first
(results/reference/paper_cpu_round1: delta LM loss up to 10.6 nats at SmolLM2's layers 14 and 22):
the model config's `massive_activations` rule names them (conf/model/smollm2_135m.yaml).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from benchmark.compose import compose_config
from benchmark.data import non_special_mask, token_windows
from benchmark.models import load_model
from benchmark.specs import SourceSpec

SITES = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., data=...)")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--multiple", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    cfg = compose_config([*args.overrides, "progress=false"])
    source = SourceSpec.of(cfg)
    bridge = load_model(source.model, torch.device("cpu"), source.cache_dir)
    windows = token_windows(source.data, bridge.tokenizer, "train", args.tokens)
    keep = non_special_mask(windows, bridge.tokenizer)
    n_layers = int(cfg.model.n_layers)
    names = {f"blocks.{layer}.{hook}": (layer, site)
             for layer in range(n_layers) for site, hook in SITES.items()}  # fmt: skip
    norms: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in names.values()}

    def grab(key: tuple[int, str]):
        def hook_fn(t: torch.Tensor, hook) -> None:  # noqa: ANN001
            norms[key].append(t.detach().float().norm(dim=-1).flatten())

        return hook_fn

    hooks = [(name, grab(key)) for name, key in names.items()]
    with torch.no_grad():
        for i in range(0, len(windows), args.batch):
            bridge.run_with_hooks(windows[i : i + args.batch], fwd_hooks=hooks)
    mask = keep.flatten()
    rows = []
    for (layer, site), parts in norms.items():
        n = torch.cat(parts)[mask]
        median = n.median()
        over = n > args.multiple * median
        sq = n.pow(2)
        rows.append({"layer": layer, "site": site, "median_norm": float(median),
                     "max_over_median": float(n.max() / median),
                     "frac_over": float(over.float().mean()),
                     "sq_norm_share_over": float(sq[over].sum() / sq.sum())})  # fmt: skip
    table = pd.DataFrame(rows).pivot(index="layer", columns="site")
    print(f"{int(mask.sum()):,} positions of the training split; over = norm > "
          f"{args.multiple:g} x the (layer, site) median")  # fmt: skip
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table[["max_over_median", "sq_norm_share_over"]].round(4).to_string())


if __name__ == "__main__":
    main()
