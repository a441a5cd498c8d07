"""Evaluation of one SAE on held-out tokens: the paper's metrics, with the SAE spliced into the LM.

Owns the computation of the metrics whose definitions live in `benchmark.metrics` (one registry,
read by the report too) and the splice. Two sets (see benchmark.metrics): `activation_metrics`
encodes a large held-out activation set with the SAE alone (L0, FVU, firing frequencies);
`evaluate_sae` runs the LM clean and spliced on the LM set (cross-entropy metrics). Must not know the trainer, Hydra, or any architecture: the SAE is
any module whose forward returns an `SAEOutput` on *raw* activations (normalisation folded in).

Positions: `mask` (N, T) marks the positions that count; BOS (and EOS/pad) positions are False.
At masked-out positions the splice keeps the original activation, and no metric averages over
them. Next-token cross-entropy at position t predicts token t+1 and counts where mask[:, t] and
mask[:, t + 1] both hold: a position whose *target* is BOS (a document boundary inside a
window) is not scored either, since predicting the separator is not language modelling (it
scored ~11.5 nats on SmolLM2, ~1% of the clean loss from 0.4% of positions).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.fileio import write_json_atomic
from benchmark.metrics import CE_RECOVERED_MIN_GAP, METRICS_VERSION, definitions
from benchmark.progress import progress as progress_display

__all__ = ["METRICS_VERSION", "METRIC_DEFINITIONS", "activation_metrics", "evaluate_sae"]

METRIC_DEFINITIONS = definitions()


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


def scored_positions(mask: Tensor) -> Tensor:
    """(B, T) -> (B, T-1): predictor positions t whose input t and target t+1 both count."""
    return mask[:, :-1] & mask[:, 1:]


def _ce_sum(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """[sum of CE, count] over the scored predictor positions (float64)."""
    pm = scored_positions(mask)
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
def mean_ce(
    model, tokens: Tensor, mask: Tensor, batch_size: int, hook=None, replace=None, *,
    progress: bool = False,
) -> float:  # fmt: skip
    """Mean CE over the eval set, clean or with a fixed splice (e.g. `zero_splice`) at `hook`."""
    total = torch.zeros(2, dtype=torch.float64)
    desc = "evaluate LM (clean)" if replace is None else "evaluate LM (ablated)"
    bar = progress_display(len(tokens), desc, unit="window", enabled=progress)
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        hooks = [(hook, _splice_hook(replace, m))] if replace is not None else []
        total += _ce_sum(_run(model, t, hooks), t, m).cpu()
        bar.update(len(t))
    bar.close()
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
    progress: bool = False,
) -> dict[str, float | None]:
    """The paper's LM metrics for `sae` spliced at `hook` on `tokens` (N, T).

    model_key identifies the model for the cached clean loss (the zero-ablation cache adds the
    hook): it must name everything that changes the model's outputs (source, path, dtype, BOS;
    `activations.model_key`), since the eval tokens' digest covers only the tokens. With no
    cache_dir both are computed here. Returns the LM-set metrics (`splice_l0` and `n_lm_tokens`
    included; L0, FVU and frequencies come from `activation_metrics`). progress: windows
    done, rate and ETA (a bar on a terminal, periodic log lines elsewhere).
    """
    # Only L0 is read on the LM set (FVU and frequencies come from the activation set).
    stats = {"n": 0, "active": 0}

    def splice(act: Tensor, m: Tensor) -> Tensor:
        x = _flatten(act)  # (B, T, d)
        sel = x[m]  # (n, d): only the positions that count
        out = sae(sel.float())
        stats["n"] += sel.shape[0]
        stats["active"] += int((out.f > 0).sum())
        x_new = x.clone()
        x_new[m] = out.x_hat.to(x.dtype)
        return x_new.view_as(act)

    spliced, clean = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    kl_sum = 0.0
    bar = progress_display(len(tokens), "evaluate LM (spliced)", unit="window", enabled=progress)
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        logits = _run(model, t, [(hook, _splice_hook(splice, m))])  # (B, T, V)
        spliced += _ce_sum(logits, t, m).cpu()
        if kl_div:
            clean_logits = _run(model, t, [])
            clean += _ce_sum(clean_logits, t, m).cpu()
            pm = scored_positions(m)
            lp_clean = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)[pm]  # (n, V)
            lp_spliced = F.log_softmax(logits[:, :-1].float(), dim=-1)[pm]
            kl_sum += (lp_clean.exp() * (lp_clean - lp_spliced)).sum().item()
        bar.update(len(t))
    bar.close()

    digest = tokens_digest(tokens)
    folder = Path(cache_dir) / "losses" if cache_dir is not None else None
    # The metrics version is in the key: a change in which positions are scored changes both.
    stem = f"v{METRICS_VERSION}-{model_key}"
    clean_path = folder / f"clean-{stem}-{digest}.json" if folder else None
    zero_path = folder / f"zero-{stem}-{hook}-{digest}.json" if folder else None
    if kl_div:  # the clean loss came out of this pass; keep it for runs without KL
        clean_ce = (clean[0] / clean[1]).item()
        cached_scalar(clean_path, lambda: clean_ce)
    else:
        clean_ce = cached_scalar(
            clean_path, lambda: mean_ce(model, tokens, mask, batch_size, progress=progress)
        )
    zero_ce = cached_scalar(
        zero_path,
        lambda: mean_ce(model, tokens, mask, batch_size, hook, zero_splice, progress=progress),
    )
    spliced_ce = (spliced[0] / spliced[1]).item()
    assert stats["n"] > 0, "no evaluation position passed the mask"
    gap = zero_ce - clean_ce
    return {
        "clean_ce_loss": clean_ce,
        "spliced_ce_loss": spliced_ce,
        "zero_ce_loss": zero_ce,
        "delta_lm_loss": spliced_ce - clean_ce,
        "ce_loss_recovered": (zero_ce - spliced_ce) / gap if gap >= CE_RECOVERED_MIN_GAP else None,
        "kl_div": kl_sum / clean[1].item() if kl_div else float("nan"),
        "splice_l0": stats["active"] / stats["n"],
        "n_lm_tokens": float(spliced[1].item()),
    }


@torch.no_grad()
def activation_metrics(
    sae: nn.Module,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    *,
    total: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """L0, FVU and firing-frequency statistics of `sae` on raw (unnormalised) activation
    batches (n, d_in): the held-out activation set. Returns (metrics, firing_frequency).
    progress: rows done out of `total` (if known), rate and ETA."""
    stats = SpliceStats()
    bar = progress_display(total, "evaluate activations", unit="tok", enabled=progress)
    for x in batches:
        x = x.to(device)
        out = sae(x)
        stats.add(x, out.x_hat, out.f)
        bar.update(x.shape[0])
    bar.close()
    if stats.fired is None:
        raise ValueError("activation_metrics: no activations to evaluate on")
    freq = stats.fired.double().cpu() / stats.n
    metrics = {
        "l0": stats.active / stats.n,
        "fvu": stats.fvu(),
        "frac_dead": (freq == 0).double().mean().item(),
        "frac_freq_over_10pct": (freq > 0.10).double().mean().item(),
        "frac_freq_over_1pct": (freq > 0.01).double().mean().item(),
        "n_activation_tokens": float(stats.n),
    }
    return metrics, freq
