"""Text sources -> documents -> tokens -> fixed-length windows, BOS first, and the held-out split.

Owns the train/eval split and the window layout; the documents come from `benchmark.corpus`
(the sources: bundled, hf, local).

Split: a document is in the evaluation split when a hash of its id falls below
`data.eval_fraction` (default 5%), so the split is disjoint by document and the same in every
run and on every machine. Ids: the article title, book + passage index, `id_field`, else a hash
of the text (identical texts therefore always land in the same split).

Windows: documents are tokenised without special tokens and concatenated, each one preceded by
the BOS token (`tokenizer.bos_token_id`, which the model config may set: see models.py); every
window of `context_length` tokens starts with BOS and continues the stream where the previous
window stopped, so a document boundary inside a window shows as a BOS in the middle. EOS is
never inserted; pad never occurs (windows are always full; the partial tail is dropped).
`non_special_mask` is False at every BOS/EOS/pad position: those are never trained on nor
evaluated. Token budgets (`n_tokens`, `data.n_train_tokens`, `data.n_eval_tokens`) count only
the positions where that mask is True, i.e. the activations an SAE sees.

Reads a `specs.DataSpec` (the entry point builds it from `conf/data`), never the config tree.
Must not know the model beyond its tokenizer, nor activations, SAEs or Hydra composition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import torch

from benchmark.corpus import SOURCES, Document, documents, unit_hash
from benchmark.errors import ConfigError
from benchmark.specs import BUDGET_KEYS, DataSpec

log = logging.getLogger(__name__)

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")
# Re-exported: the data config's budget keys and spec, the documents of a source.
__all__ = ["BUDGET_KEYS", "SOURCES", "DataSpec", "Document", "documents"]


def token_windows(
    data: DataSpec, tokenizer: Any, split: Split, n_tokens: int, allow_fewer: bool = False
) -> torch.Tensor:
    """(n_windows, context_length) int64 token ids, BOS at position 0: the fewest windows of
    `split` holding at least `n_tokens` non-special positions (see the module docstring)."""
    T = _context_length(data)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if n_tokens <= 0:
        raise ConfigError(f"n_tokens={n_tokens} must be positive")
    special = set(special_ids(tokenizer))
    seen = _Seen()
    windows, have = [], 0
    for window in stream_windows(data, tokenizer, split, seen):
        windows.append(window)
        have += sum(t not in special for t in window)
        if have >= n_tokens:
            return torch.tensor(windows, dtype=torch.long)
    where = f"data {data.name!r} ({data.source}), split {split!r}"
    if seen.total == 0:
        raise ConfigError(f"{where}: the source holds no documents (empty corpus)")
    if not windows:
        raise ConfigError(
            f"{where}: no full window of {T} tokens ({seen.in_split} of {seen.total} documents "
            f"in this split, data.eval_fraction={data.eval_fraction})"
        )
    message = (
        f"{where} holds {have} tokens in {len(windows)} windows of {T}; {n_tokens} requested "
        f"(data.n_{split}_tokens)"
    )
    if not allow_fewer:
        raise ConfigError(f"{message}. Lower it, or set data.allow_fewer_tokens=true")
    log.warning("%s: using %d tokens (data.allow_fewer_tokens=true)", message, have)
    return torch.tensor(windows, dtype=torch.long)


def stream_windows(
    data: DataSpec, tokenizer: Any, split: Split, seen: _Seen | None = None
) -> Iterator[list[int]]:
    """Every window of `split`, in order, read lazily: lists of context_length token ids, BOS
    first (the windows `token_windows` returns, without a budget)."""
    T = _context_length(data)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    docs = split_documents(data, split, seen)
    return _pack(_tokenise(docs, tokenizer), T, bos_id(tokenizer))


def eval_windows(data: DataSpec, tokenizer: Any) -> torch.Tensor:
    """The LM evaluation set: the fewest windows holding `data.n_eval_tokens` non-special
    tokens, spread evenly over the first `data.eval_pool_tokens` tokens of the evaluation split
    (all of it for the bundled corpus), in split order.

    Why spread: consecutive windows come from a handful of documents (16 windows of 128 tokens
    are ~5 Wikipedia leads or 2 book passages), so a small LM set taken from the start of the
    split measured L0 10% below the same SAEs on 16k held-out tokens. Evenly spaced windows
    each come from a different part of the split, mixing both sources.
    """
    n_tokens = int(data.n_eval_tokens)
    pool_tokens = max(n_tokens, int(data.eval_pool_tokens))
    special = set(special_ids(tokenizer))
    pool, counts = [], []
    for window in stream_windows(data, tokenizer, "eval"):
        pool.append(window)
        counts.append(sum(t not in special for t in window))
        if sum(counts) >= pool_tokens:
            break
    if sum(counts) < n_tokens:  # too small a split: token_windows words the error (or warns)
        return token_windows(data, tokenizer, "eval", n_tokens, allow_fewer=data.allow_fewer_tokens)
    return torch.tensor([pool[i] for i in spread_indices(counts, n_tokens)], dtype=torch.long)


def spread_indices(counts: list[int], n_tokens: int) -> list[int]:
    """The fewest evenly spaced indices into `counts` whose counts sum to >= n_tokens."""
    k = max(1, n_tokens // max(1, max(counts)))
    while True:
        idx = sorted({round(i * (len(counts) - 1) / max(1, k - 1)) for i in range(k)})
        if sum(counts[i] for i in idx) >= n_tokens or len(idx) == len(counts):
            return idx
        k += 1


def non_special_mask(tokens: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True where the token is not BOS, EOS or pad: the positions SAEs train and are scored on."""
    special = torch.tensor(special_ids(tokenizer), dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, special)


def bos_id(tokenizer: Any) -> int:
    if tokenizer.bos_token_id is None:
        raise ConfigError("the tokenizer has no BOS token; set model.bos_token")
    return int(tokenizer.bos_token_id)


def special_ids(tokenizer: Any) -> list[int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({int(i) for i in ids if i is not None})


def data_identity(data: DataSpec) -> dict:
    """The data config without its budget keys: what decides the text of each split."""
    return dict(data.identity)


# ---- split ----


def in_eval_split(doc_id: str, eval_fraction: float) -> bool:
    return unit_hash("split", doc_id) < eval_fraction


def split_documents(data: DataSpec, split: Split, seen: _Seen | None = None) -> Iterator[Document]:
    """The documents of one split, in source order."""
    fraction = float(data.eval_fraction)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={fraction} must be in (0, 1)")
    seen = seen if seen is not None else _Seen()
    for doc in documents(data):
        seen.total += 1
        if in_eval_split(doc.id, fraction) == (split == "eval"):
            seen.in_split += 1
            yield doc


@dataclass
class _Seen:
    total: int = 0
    in_split: int = 0


# ---- tokens -> windows ----


def _tokenise(docs: Iterable[Document], tokenizer: Any, batch: int = 256) -> Iterator[list[int]]:
    docs = iter(docs)
    while chunk := list(islice(docs, batch)):
        yield from tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]


def _pack(token_docs: Iterable[list[int]], T: int, bos: int) -> Iterator[list[int]]:
    """Windows [BOS] + the next T-1 tokens of the stream doc, BOS, doc, BOS, doc, ..."""
    body, buf = T - 1, list[int]()
    for ids in token_docs:
        if not ids:
            continue
        if buf:
            buf.append(bos)  # a boundary inside a window; at a window start BOS is already there
        buf.extend(ids)
        start = 0
        while len(buf) - start >= body:
            yield [bos, *buf[start : start + body]]
            start += body
            if start < len(buf) and buf[start] == bos:
                start += 1  # the next window starts with BOS anyway
        buf = buf[start:]


def _context_length(data: DataSpec) -> int:
    T = data.context_length
    if not isinstance(T, int) or T < 2:
        raise ConfigError(f"data.context_length={T!r} must be an integer >= 2")
    return T
