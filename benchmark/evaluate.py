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

Per batch of evaluation windows (`evaluate_group`, for one SAE or a fan-out group): the model
runs once up to the hooked layer; from that residual, the clean pass (for KL, or for the clean
loss when it is not cached yet), the zero-ablation pass (when not cached yet) and each SAE's
spliced pass start at that layer (`run_from`: the blocks below are skipped, and the logits are
those of the full pass; tests/test_fanout.py). The SAE reads the clean activation at the hook
and writes its reconstruction. The zero-ablation loss depends only on (model, layer, site, eval
tokens), and the clean loss only on (model, eval tokens): both are cached as small JSON files
and reused by every SAE. With `kl_div=False` and the clean loss cached, only the spliced passes
run. Log-probabilities are taken LOGPROB_CHUNK rows at a time (bounded memory at a 256k
vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark import loss_cache
from benchmark.activation_eval import SpliceStats, activation_metrics, activation_metrics_group
from benchmark.loss_cache import cached_scalar, tokens_digest
from benchmark.metrics import CE_RECOVERED_MIN_GAP, METRICS_VERSION, definitions
from benchmark.progress import progress as progress_display

__all__ = [  # activation metrics (benchmark/activation_eval.py) and the loss cache re-exported
    "METRICS_VERSION", "METRIC_DEFINITIONS", "SpliceStats", "activation_metrics",
    "activation_metrics_group", "cached_scalar", "evaluate_group", "evaluate_sae", "tokens_digest",
]  # fmt: skip

METRIC_DEFINITIONS = definitions()


def _flatten(act: Tensor) -> Tensor:
    """(B, T, ...) -> (B, T, d): attn.hook_z's (heads, d_head) become one vector."""
    return act.reshape(*act.shape[:2], -1)


# Rows of logits turned into fp32 log-probabilities at a time: bounds the extra memory of the
# losses at ~LOGPROB_CHUNK * V * 4 bytes (256 MB at Gemma's 256k vocabulary), whatever the batch.
LOGPROB_CHUNK = 256


def _log_probs_chunks(logits: Tensor, pm: Tensor):
    """(B, T, V) logits, (B, T-1) scored positions -> fp32 log-probabilities of the scored
    predictor positions, LOGPROB_CHUNK rows at a time, with the chunk's row indices. Rows are
    gathered a chunk at a time by flat index: a boolean mask over the whole (B, T-1, V) would
    copy every scored row at once (as large as the logits)."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)  # a view of contiguous logits
    # (n,) flat row indices b * T + t of the scored positions, in the row-major order of pm
    idx = F.pad(pm, (0, 1)).reshape(-1).nonzero().squeeze(1)
    for i in range(0, idx.shape[0], LOGPROB_CHUNK):
        yield i, F.log_softmax(flat[idx[i : i + LOGPROB_CHUNK]].float(), dim=-1)


def next_token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B, T-1) cross-entropy of predicting tokens[:, t+1] at t (computed
    in chunks of LOGPROB_CHUNK rows, so the fp32 log-softmax never spans the whole batch)."""
    B, T = tokens.shape
    pm = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
    targets = tokens[:, 1:][pm]
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    for i, lp in _log_probs_chunks(logits, pm):
        out[i : i + lp.shape[0]] = -lp.gather(-1, targets[i : i + lp.shape[0], None]).squeeze(-1)
    return out.view(B, T - 1)


def _kl_sum(clean_logits: Tensor, logits: Tensor, pm: Tensor) -> float:
    """sum over the scored positions of KL(clean || spliced), in chunks of LOGPROB_CHUNK rows."""
    total = 0.0
    for (_, lp_clean), (_, lp) in zip(_log_probs_chunks(clean_logits, pm),
                                      _log_probs_chunks(logits, pm), strict=True):  # fmt: skip
        total += (lp_clean.exp() * (lp_clean - lp)).sum().item()
    return total


def _run(model, tokens: Tensor, hooks: list) -> Tensor:
    return model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")


def scored_positions(mask: Tensor) -> Tensor:
    """(B, T) -> (B, T-1): predictor positions t whose input t and target t+1 both count."""
    return mask[:, :-1] & mask[:, 1:]


def _ce_sum(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """[sum of CE, count] over the scored predictor positions (float64)."""
    return _ce_windows(logits, tokens, mask).sum(dim=0)


def _ce_windows(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """(windows, 2): each window's [sum of CE, count] over its scored positions (float64)."""
    pm = scored_positions(mask)
    losses = torch.where(pm, next_token_losses(logits, tokens).double(), 0.0)
    return torch.stack([losses.sum(dim=-1), pm.sum(dim=-1).double()], dim=-1)


# Columns of a run's lm_windows.npy (`evaluate_group(windows_out=...)`), one row per LM window.
WINDOW_COLUMNS = ("clean_ce_sum", "spliced_ce_sum", "n_scored")


def ratio_se(d: Tensor, n: Tensor) -> float:
    """Standard error of the ratio sum(d) / sum(n) over W sampling units (the LM set's
    windows), linearised: sqrt(W / (W - 1) * sum_w (d_w - R n_w)^2) / sum(n), R = sum(d) /
    sum(n) (the cluster-robust SE of a mean over positions that come in windows; NaN for W < 2)."""
    d, n = d.double(), n.double()
    if len(d) < 2 or n.sum() <= 0:
        return float("nan")
    r = d.sum() / n.sum()
    w = len(d)
    return float(torch.sqrt(w / (w - 1) * ((d - r * n) ** 2).sum()) / n.sum())


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


@contextmanager
def _blocks_skipped_below(model, layer: int) -> Iterator[None]:
    """Blocks 0..layer-1 return their input unchanged while this is open.

    TransformerBridge's `start_at_layer` swaps the given residual in at block `layer` but still
    runs the blocks below it on a placeholder and discards their output; skipping them makes
    a pass that starts at `layer` cost only the blocks from `layer` up (exactness against the
    full pass: tests/test_fanout.py). Every decoder layer of transformers 5 returns its hidden
    states as one tensor, which is what the stand-in returns."""

    def identity(*args: Any, **kwargs: Any) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    below = list(model.blocks)[:layer]
    for block in below:  # an instance attribute shadows the class's forward (the bridge's own
        block.__dict__["forward"] = identity  # __setattr__ would pass it to the HF layer)
    try:
        yield
    finally:
        for block in below:
            block.__dict__.pop("forward", None)


def residual_at(model, tokens: Tensor, layer: int) -> Tensor:
    """The residual stream entering block `layer` (B, T, d_model): the clean pass up to it."""
    return model(tokens, stop_at_layer=layer)


def run_from(model, residual: Tensor, layer: int, hooks: list) -> Tensor:
    """Logits of the pass that starts at block `layer` from `residual` (with `hooks`, which
    must sit in blocks >= layer): the same numbers as the full pass from the tokens."""
    with _blocks_skipped_below(model, layer):
        return model.run_with_hooks(residual, start_at_layer=layer, fwd_hooks=hooks,
                                    return_type="logits")  # fmt: skip


def hook_layer(hook: str) -> int:
    """blocks.{L}.<...> -> L."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"not a block hook: {hook!r}")
    return int(parts[1])


def within(x: Tensor, mask: Tensor, limit: float | None) -> Tensor:
    """`mask` (B, T) less the positions whose activation x (B, T, d) has a norm over `limit`."""
    if limit is None:
        return mask
    return mask & (x.float().norm(dim=-1) <= limit)


def limited(replace: Callable[[Tensor, Tensor], Tensor], limit: float | None):
    """`replace` applied only at the positions `within` the norm limit."""
    if limit is None:
        return replace

    def fn(act: Tensor, mask: Tensor) -> Tensor:
        return replace(act, within(_flatten(act), mask, limit))

    return fn


@torch.no_grad()
def evaluate_sae(model, sae: nn.Module, tokens: Tensor, mask: Tensor, hook: str,
                 **kwargs: Any) -> dict[str, float | None]:  # fmt: skip
    """The paper's LM metrics for one `sae` spliced at `hook`: `evaluate_group` of one."""
    return evaluate_group(model, [(sae, hook)], tokens, mask, **kwargs)[0]


@torch.no_grad()
def evaluate_group(
    model, members: list[tuple[nn.Module, str]], tokens: Tensor, mask: Tensor, *,
    batch_size: int = 8, cache_dir: str | Path | None = None, model_key: str = "model",
    kl_div: bool = True, progress: bool = False,
    max_norms: dict[str, float | None] | None = None, windows_out: list[Tensor] | None = None,
) -> list[dict[str, float | None]]:  # fmt: skip
    """The paper's LM metrics for each (sae, hook) of `members` on `tokens` (N, T).

    Per batch of windows, the model runs once up to the lowest hooked layer; from there the
    clean pass (for KL) runs once for the whole group and each SAE's spliced pass starts at
    that layer from the shared residual (`run_from`), instead of every SAE re-running the
    layers below. The numbers are those of separate full passes (tests/test_fanout.py).

    model_key identifies the model for the cached clean loss (the zero-ablation cache adds the
    hook): it must name everything that changes the model's outputs (source, path, dtype, BOS;
    `activations.model_key`), since the eval tokens' digest covers only the tokens. With no
    cache_dir both are computed here. Returns each member's LM-set metrics (`splice_l0` and
    `n_lm_tokens` included; L0, FVU and frequencies come from `activation_metrics`). progress:
    windows done, rate and ETA (a bar on a terminal, periodic log lines elsewhere).
    max_norms: per hook, a limit on the activation norm (raw units; `data.max_norm_multiple`):
    a position over it keeps its original activation in the SAE's and the zero-ablation
    splice, as a masked-out position does, and is left out of `splice_l0`; its cross-entropy
    is still scored. The zero-ablation cache key names the limit.
    windows_out: if given, receives one (W, 3) float64 tensor per member, each LM window's
    [clean CE sum, spliced CE sum, scored positions] (`WINDOW_COLUMNS`): what delta_lm_loss and
    its SE are computed from, kept so that paired differences between SAEs can be computed
    over the same windows (scripts/lm_set_size.py).
    """
    limits = {hook: (max_norms or {}).get(hook) for _, hook in members}
    start = min(hook_layer(hook) for _, hook in members)
    # Only L0 is read on the LM set (FVU and frequencies come from the activation set).
    stats = [{"n": 0, "active": 0} for _ in members]
    splices = [
        _splicer(sae, st, limits[hook]) for (sae, hook), st in zip(members, stats, strict=True)
    ]
    # The clean and zero-ablation losses depend only on (model, tokens[, hook]): cached as small
    # JSON files and reused by every SAE; what is not cached yet is computed in this same loop.
    hooks = list(dict.fromkeys(hook for _, hook in members))
    clean_path, zero_paths = loss_cache.paths(cache_dir, model_key, tokens, limits, hooks)
    clean_ce = loss_cache.cached(clean_path)
    clean_windows = loss_cache.cached_windows(clean_path, len(tokens))
    if clean_windows is None:  # the per-window sums (for delta_lm_loss_se) are computed too
        clean_ce = None
    zero_ce = {h: loss_cache.cached(p) for h, p in zero_paths.items()}
    zero_todo = [h for h in hooks if zero_ce[h] is None]

    passes = _Passes(members, splices, zero_todo, kl_div or clean_ce is None, kl_div)
    bar = progress_display(len(tokens), "evaluate LM (spliced)", unit="window", enabled=progress)
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        passes.batch(model, t, m, start, limits)
        bar.update(len(t))
    bar.close()
    spliced, clean_parts, zero, kl_sums = passes.spliced, passes.clean, passes.zero, passes.kl

    clean = torch.cat(clean_parts).sum(dim=0) if clean_parts else None
    if clean_ce is None:
        assert clean is not None
        clean_windows = torch.cat(clean_parts)
        clean_ce = loss_cache.store(clean_path, (clean[0] / clean[1]).item(), clean_windows)
    assert clean_windows is not None
    for h in zero_todo:
        zero_ce[h] = loss_cache.store(zero_paths[h], (zero[h][0] / zero[h][1]).item())
    results = []
    for j, (_, hook) in enumerate(members):
        z = zero_ce[hook]
        assert z is not None and stats[j]["n"] > 0, "no evaluation position passed the mask"
        windows = torch.cat(spliced[j])  # (W, 2)
        if windows_out is not None:
            windows_out.append(torch.stack([clean_windows[:, 0], windows[:, 0], windows[:, 1]], 1))
        kl = kl_sums[j] if kl_div else None
        results.append(_lm_metrics(clean_ce, clean_windows, z, windows, kl, stats[j]))
    return results


class _Passes:
    """The passes of one batch of LM windows from the shared residual at `start`, summed over
    batches: the clean pass (when `clean`: its per-window CE sums), the zero-ablation pass of
    each hook in `zero_todo`, each member's spliced pass (per-window CE sums) and its KL to the
    clean pass (when `kl_div`)."""

    def __init__(self, members, splices, zero_todo: list[str], clean: bool, kl_div: bool):
        self.members, self.splices, self.want_clean, self.kl_div = members, splices, clean, kl_div
        self.spliced: list[list[Tensor]] = [[] for _ in members]  # per batch: (windows, 2)
        self.clean: list[Tensor] = []
        self.zero = {h: torch.zeros(2, dtype=torch.float64) for h in zero_todo}
        self.kl = [0.0 for _ in members]

    def batch(self, model, t: Tensor, m: Tensor, start: int, limits: dict) -> None:
        pm = scored_positions(m)
        resid = residual_at(model, t, start)
        clean_logits = None
        if self.want_clean:
            clean_logits = run_from(model, resid, start, [])
            self.clean.append(_ce_windows(clean_logits, t, m).cpu())
        for h in self.zero:
            ablate = _splice_hook(limited(zero_splice, limits[h]), m)
            self.zero[h] += _ce_sum(run_from(model, resid, start, [(h, ablate)]), t, m).cpu()
        for j, (_, hook) in enumerate(self.members):
            logits = run_from(model, resid, start, [(hook, _splice_hook(self.splices[j], m))])
            self.spliced[j].append(_ce_windows(logits, t, m).cpu())
            if self.kl_div and clean_logits is not None:
                self.kl[j] += _kl_sum(clean_logits, logits, pm)
            del logits


def _splicer(
    sae: nn.Module, st: dict[str, int], limit: float | None
) -> Callable[[Tensor, Tensor], Tensor]:
    """The splice of one SAE: its reconstruction at the positions that count (and within the
    norm limit), the original activation elsewhere; counts positions and active latents."""

    def splice(act: Tensor, m: Tensor) -> Tensor:
        x = _flatten(act)  # (B, T, d)
        m = within(x, m, limit)
        sel = x[m]  # (n, d): only the positions that count
        out = sae(sel.float())
        st["n"] += sel.shape[0]
        st["active"] += int((out.f > 0).sum())
        x_new = x.clone()
        x_new[m] = out.x_hat.to(x.dtype)
        return x_new.view_as(act)

    return splice


def _lm_metrics(
    clean_ce: float, clean_windows: Tensor, z: float, windows: Tensor, kl_sum: float | None,
    st: dict[str, int],
) -> dict[str, float | None]:  # fmt: skip
    """One SAE's LM-set metrics from the clean loss and per-window sums, its (W, 2) spliced
    [CE sum, count] per window, the zero-ablation loss z and its KL sum (None: not computed)."""
    total = windows.sum(dim=0)
    spliced_ce = (total[0] / total[1]).item()
    gap = z - clean_ce
    return {
        "clean_ce_loss": clean_ce,
        "spliced_ce_loss": spliced_ce,
        "zero_ce_loss": z,
        "delta_lm_loss": spliced_ce - clean_ce,
        "ce_loss_recovered": (z - spliced_ce) / gap if gap >= CE_RECOVERED_MIN_GAP else None,
        "delta_lm_loss_se": ratio_se(windows[:, 0] - clean_windows[:, 0], windows[:, 1]),
        "kl_div": kl_sum / total[1].item() if kl_sum is not None else float("nan"),
        "splice_l0": st["active"] / st["n"],
        "n_lm_tokens": float(total[1].item()),
        "n_lm_windows": float(len(windows)),
    }
