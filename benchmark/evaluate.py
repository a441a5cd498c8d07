"""Evaluation of one SAE on held-out tokens: the paper's metrics, with the SAE spliced into the LM.

Owns the metric definitions (METRIC_DEFINITIONS, versioned by METRICS_VERSION and written into
every result) and the splice. Must not know the trainer, Hydra, or any architecture: the SAE is
any module whose forward returns an `SAEOutput` on *raw* activations (normalisation folded in).

Positions: `mask` (N, T) marks the positions that count; BOS (and EOS/pad) positions are False.
At masked-out positions the splice keeps the original activation, and no metric averages over
them. Next-token cross-entropy at position t predicts token t+1 and counts where mask[:, t].

One pass per batch of evaluation windows: the clean forward (for KL and the clean loss) and the
spliced forward (the SAE reads the clean activation at the hook, which is also where FVU, L0 and
firing frequencies are accumulated, and writes its reconstruction). The zero-ablation loss
depends only on (model, layer, site, eval tokens), and the clean loss only on (model, eval
tokens): both are cached as small JSON files and reused by every SAE (`cached_scalar`).
With `kl_div=False` the clean forward is skipped and the cached clean loss is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.fileio import write_json_atomic

METRICS_VERSION = "1"
METRIC_DEFINITIONS = {
    "l0": "mean over evaluation tokens (BOS/EOS/pad excluded) of the number of latents > 0",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole evaluation set, "
    "dataset mean, float64 accumulation (not per batch)",
    "clean_ce_loss": "mean next-token cross-entropy (nats) of the unmodified model over "
    "positions whose input token is not BOS/EOS/pad",
    "spliced_ce_loss": "same positions, with the SAE reconstruction replacing the activation at "
    "the hook for every non-BOS/EOS/pad position (those keep the original activation)",
    "zero_ce_loss": "same positions, with zeros spliced in instead of the reconstruction",
    "delta_lm_loss": "spliced_ce_loss - clean_ce_loss (the paper's headline metric)",
    "ce_loss_recovered": "(zero_ce_loss - spliced_ce_loss) / (zero_ce_loss - clean_ce_loss)",
    "kl_div": "mean over the same positions of KL(clean || spliced) of the next-token "
    "distributions (nats)",
    "firing_frequency": "per latent: fraction of evaluation tokens on which it is > 0",
    "frac_dead": "fraction of latents that never fire on the evaluation tokens",
    "frac_freq_over_10pct": "fraction of latents firing on more than 10% of evaluation tokens",
    "frac_freq_over_1pct": "fraction of latents firing on more than 1% of evaluation tokens",
}


@dataclass
class SpliceStats:
    """Float64 running sums over the masked positions seen by the splice hook."""

    n: int = 0
    sse: float = 0.0  # sum ||x - x_hat||^2
    sum_sq: float = 0.0  # sum ||x||^2
    sum_x: Tensor | None = None  # (d,) sum of x
    active: float = 0.0  # sum over tokens of the number of active latents
    fired: Tensor | None = None  # (d_sae,) count of tokens on which each latent fired

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x64, xh64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sse += (x64 - xh64).pow(2).sum().item()
        self.sum_sq += x64.pow(2).sum().item()
        s = x64.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        on = f > 0
        self.active += on.sum().item()
        c = on.sum(dim=0, dtype=torch.long)
        self.fired = c if self.fired is None else self.fired + c

    def fvu(self) -> float:
        assert self.sum_x is not None
        total = self.sum_sq - self.sum_x.pow(2).sum().item() / self.n  # sum ||x - mean||^2
        return self.sse / total


def _flatten(act: Tensor) -> Tensor:
    """(B, T, ...) -> (B, T, d): attn.hook_z's (heads, d_head) become one vector."""
    return act.reshape(*act.shape[:2], -1)


def next_token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B, T-1) cross-entropy of predicting tokens[:, t+1] at t."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _run(model, tokens: Tensor, hooks: list) -> Tensor:
    return model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")


def _ce_sum(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """[sum of CE, count] over predictor positions t with mask[:, t] (float64)."""
    pm = mask[:, :-1]
    return torch.stack([next_token_losses(logits, tokens)[pm].double().sum(), pm.sum().double()])


def _splice_hook(replace: Callable[[Tensor, Tensor], Tensor], mask: Tensor):
    def fn(act: Tensor, hook: Any = None) -> Tensor:
        return replace(act, mask).to(act.dtype)

    return fn


def zero_splice(act: Tensor, mask: Tensor) -> Tensor:
    """Zeros at the positions that count, the original activation elsewhere."""
    m = mask.view(*mask.shape, *([1] * (act.ndim - 2)))
    return torch.where(m, torch.zeros_like(act), act)


@torch.no_grad()
def mean_ce(model, tokens: Tensor, mask: Tensor, batch_size: int, hook=None, replace=None) -> float:
    """Mean CE over the eval set, clean or with a fixed splice (e.g. `zero_splice`) at `hook`."""
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        hooks = [(hook, _splice_hook(replace, m))] if replace is not None else []
        total += _ce_sum(_run(model, t, hooks), t, m).cpu()
    return (total[0] / total[1]).item()


def cached_scalar(path: Path | None, compute: Callable[[], float]) -> float:
    """A float cached in a small JSON file, written atomically (safe under concurrent jobs)."""
    if path is None:
        return compute()
    if path.exists():
        return float(json.loads(path.read_text())["value"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"value": value})
    return value


def tokens_digest(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def evaluate_sae(
    model,
    sae: nn.Module,
    tokens: Tensor,
    mask: Tensor,
    hook: str,
    *,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    model_key: str = "model",
    kl_div: bool = True,
) -> tuple[dict[str, float], Tensor]:
    """The paper's metrics for `sae` spliced at `hook` on `tokens` (N, T).

    model_key names the model for the cached clean loss (the zero-ablation cache adds the hook);
    with no cache_dir both are computed here. Returns (metrics, firing_frequency (d_sae,)).
    """
    stats = SpliceStats()

    def splice(act: Tensor, m: Tensor) -> Tensor:
        x = _flatten(act)  # (B, T, d)
        sel = x[m]  # (n, d): only the positions that count
        out = sae(sel.float())
        stats.add(sel, out.x_hat, out.f)
        x_new = x.clone()
        x_new[m] = out.x_hat.to(x.dtype)
        return x_new.view_as(act)

    spliced, clean = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    kl_sum = 0.0
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        logits = _run(model, t, [(hook, _splice_hook(splice, m))])  # (B, T, V)
        spliced += _ce_sum(logits, t, m).cpu()
        if kl_div:
            clean_logits = _run(model, t, [])
            clean += _ce_sum(clean_logits, t, m).cpu()
            pm = m[:, :-1]
            lp_clean = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)[pm]  # (n, V)
            lp_spliced = F.log_softmax(logits[:, :-1].float(), dim=-1)[pm]
            kl_sum += (lp_clean.exp() * (lp_clean - lp_spliced)).sum().item()

    digest = tokens_digest(tokens)
    folder = Path(cache_dir) / "losses" if cache_dir is not None else None
    clean_path = folder / f"clean-{model_key}-{digest}.json" if folder else None
    zero_path = folder / f"zero-{model_key}-{hook}-{digest}.json" if folder else None
    if kl_div:  # the clean loss came out of this pass; keep it for runs without KL
        clean_ce = (clean[0] / clean[1]).item()
        cached_scalar(clean_path, lambda: clean_ce)
    else:
        clean_ce = cached_scalar(clean_path, lambda: mean_ce(model, tokens, mask, batch_size))
    zero_ce = cached_scalar(
        zero_path, lambda: mean_ce(model, tokens, mask, batch_size, hook, zero_splice)
    )
    spliced_ce = (spliced[0] / spliced[1]).item()
    assert stats.fired is not None, "no evaluation position passed the mask"
    freq = stats.fired.double().cpu() / stats.n
    metrics: dict[str, float] = {
        "l0": stats.active / stats.n,
        "fvu": stats.fvu(),
        "clean_ce_loss": clean_ce,
        "spliced_ce_loss": spliced_ce,
        "zero_ce_loss": zero_ce,
        "delta_lm_loss": spliced_ce - clean_ce,
        "ce_loss_recovered": (zero_ce - spliced_ce) / (zero_ce - clean_ce),
        "kl_div": kl_sum / clean[1].item() if kl_div else float("nan"),
        "frac_dead": (freq == 0).double().mean().item(),
        "frac_freq_over_10pct": (freq > 0.10).double().mean().item(),
        "frac_freq_over_1pct": (freq > 0.01).double().mean().item(),
        "n_eval_tokens": float(stats.n),
    }
    return metrics, freq
