"""Linear probes for sparse probing (`benchmark.probe`): the latent ranking, an L2 logistic
regression fitted with L-BFGS in float64, its regularisation chosen by validation AUC, and the
test metrics (AUC with ties counted 1/2, accuracy at p = 0.5).

Protocol: Kantamneni, Engels, Rajamanoharan, Tegmark, Nanda, "Are Sparse Autoencoders Useful? A
Case Study in Sparse Probing" (arXiv 2502.16681, 2025), "normal" setting, as the `sae-probes`
package implements it; deviations in docs/probing.md. Knows tensors only: no model, no files.
The probe: L2-regularised logistic regression (`fit_logistic`: L-BFGS in float64, intercept not
penalised), C chosen from 10 values log-spaced over [1e-5, 1e5] by validation AUC (n_train
>= 128: the last min(20%, 100) training texts; fewer: stratified 6-fold), then refitted on the
whole training split.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CS = torch.logspace(5, -5, 10, dtype=torch.float64).tolist()  # the source's C grid, large first
SPLIT_SEED = 42  # the source's default


class Probe(NamedTuple):
    """One fitted probe: its test AUC and accuracy, the C chosen and its validation AUC."""

    auc: float
    accuracy: float
    C: float
    val_auc: float


# ---- latent choice, probe, metric ----


def rank_latents(f: Tensor, labels: Tensor) -> Tensor:
    """(d_sae,) latent indices, best first: |mean over positives - mean over negatives| of each
    latent scaled by its mean |activation| where it fires (the source's get_sorted_indices with
    mean_act_normalization), on the rows given (the training split). f: (n, d_sae)."""
    f = f.double()
    scale = f.abs().sum(0) / ((f != 0).sum(0) + 1e-6)  # (d_sae,) 0 for a latent that never fires
    g = f / (scale + 1e-6)
    diff = g[labels == 1].mean(0) - g[labels == 0].mean(0)
    return torch.argsort(diff.abs(), descending=True, stable=True)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted 1/2."""
    pos, neg = scores[labels == 1].double(), scores[labels == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]  # (n_pos, n_neg)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def fit_logistic(X: Tensor, y: Tensor, C: float, init: Tensor | None = None,
                 max_iter: int = 1000) -> Tensor:  # fmt: skip
    """(d + 1,) weights then intercept of the logistic regression minimising
    mean log-loss + |w|^2 / (2 C n), i.e. scikit-learn's LogisticRegression(C) objective scaled
    by 1/n (the source's probe); L-BFGS with a strong-Wolfe line search from `init` (zeros),
    stopped when every gradient entry is below 1e-4 (scikit-learn's tol) or after max_iter
    iterations. The objective is strictly convex: `init` changes the time, not the answer."""
    X, y = X.detach().to(torch.float64, copy=True), y.detach().to(torch.float64, copy=True)
    n = len(X)
    wb = torch.zeros(X.shape[1] + 1, dtype=torch.float64) if init is None else init.clone()
    wb.requires_grad_(True)
    opt = torch.optim.LBFGS([wb], lr=1, max_iter=max_iter, tolerance_grad=1e-4,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

    def objective() -> Tensor:
        opt.zero_grad()
        w, b = wb[:-1], wb[-1]
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y) + w.square().sum() / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return wb.detach()


def decision(X: Tensor, wb: Tensor) -> Tensor:
    return X.to(torch.float64) @ wb[:-1] + wb[-1]


def validation_folds(labels: Tensor, seed: int = SPLIT_SEED) -> list[tuple[Tensor, Tensor]]:
    """The source's get_cv: n >= 128, one hold-out of the last min(20%, 100) rows (the training
    split is already in random order); fewer, stratified 6-fold. Folds whose validation rows
    hold one class only are dropped."""
    n = len(labels)
    if n >= 128:
        cut = n - min(int(0.2 * n), 100)
        folds = [(torch.arange(cut), torch.arange(cut, n))]
    else:
        g = torch.Generator().manual_seed(seed)
        fold = torch.empty(n, dtype=torch.int64)
        for cls in (0, 1):
            idx = torch.nonzero(labels == cls).flatten()
            fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % 6
        folds = [(torch.nonzero(fold != i).flatten(), torch.nonzero(fold == i).flatten())
                 for i in range(6)]  # fmt: skip
    return [(tr, va) for tr, va in folds if labels[va].unique().numel() == 2]


def standardise(X_train: Tensor, X_test: Tensor) -> tuple[Tensor, Tensor]:
    """Both splits in float64, centred and scaled by the training split's mean and standard
    deviation per column (a constant column is only centred)."""
    X_train, X_test = X_train.to(torch.float64), X_test.to(torch.float64)
    mean, sd = X_train.mean(0), X_train.std(0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return (X_train - mean) / sd, (X_test - mean) / sd


def fit_probe(X_train: Tensor, y_train: Tensor, X_test: Tensor, y_test: Tensor) -> Probe:
    """The features standardised on the training split (a deviation: the source's
    find_best_reg fits raw features; scaled ones converge ~10x faster, docs/probing.md), C by
    mean validation AUC over CS (the first, i.e. largest, of equal scores), refitted on the
    whole training split; its test AUC and accuracy. Each fold's fits run from the strongest
    penalty to the weakest, each started at the previous solution (a warm start: the same
    optima, fewer iterations)."""
    X_train, X_test = standardise(X_train, X_test)
    folds = validation_folds(y_train)
    scores = torch.full((len(folds), len(CS)), 0.5, dtype=torch.float64)  # one-class fold: 0.5
    starts: dict[int, Tensor] = {}  # C index -> the first fold's solution
    for f, (tr, va) in enumerate(folds):
        if y_train[tr].unique().numel() < 2:
            continue
        wb = None
        for i in reversed(range(len(CS))):
            wb = fit_logistic(X_train[tr], y_train[tr], CS[i], init=wb)
            scores[f, i] = roc_auc(decision(X_train[va], wb), y_train[va])
            starts.setdefault(i, wb)
    val = scores.mean(0).tolist()
    best = max(range(len(CS)), key=lambda i: (val[i], -i))  # the first of equal scores
    C, val_auc = (CS[best], val[best]) if folds else (1.0, math.nan)  # no fold: the default C
    wb = fit_logistic(X_train, y_train, C, init=starts.get(best))
    s = decision(X_test, wb)
    accuracy = float(((s > 0).long() == y_test).double().mean())
    return Probe(roc_auc(s, y_test), accuracy, C, val_auc)
