"""benchmark.progress: a tqdm bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging

import pytest

from benchmark import progress as progress_module
from benchmark.progress import format_rate, progress


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "benchmark.progress"]


def test_log_lines_every_tenth(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_is_tty", lambda: False)
    with caplog.at_level(logging.INFO, logger="benchmark.progress"):
        with progress(1000, "harvest layer 6", unit="tok") as bar:
            for _ in range(40):
                bar.update(25)
            bar.set_postfix(shard="4/4")
    got = lines(caplog)
    assert len(got) == 10  # one per 10% (100 tokens = 4 updates)
    assert got[0].startswith("harvest layer 6: 100/1,000 tok (10%), ")
    assert " tok/s, ETA 0:" in got[0]
    assert got[-1].startswith("harvest layer 6: 1,000/1,000 tok (100%), ")
    assert "ETA" not in got[-1]


def test_log_lines_every_30_seconds_and_on_close(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_is_tty", lambda: False)
    clock = iter([0.0, 31.0, 32.0, 40.0])  # start, update, update, close
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="benchmark.progress"):
        bar = progress(None, "stream", unit="tok", initial=100)
        bar.update(62)  # 31 s: a line (no total: no percent, no ETA)
        bar.update(1)  # 32 s: too soon
        bar.set_postfix(epoch=2)
        bar.close()  # a last line
    assert lines(caplog) == ["stream: 162 tok, 2.0 tok/s", "stream: 163 tok, 1.6 tok/s, epoch=2"]


@pytest.mark.parametrize(
    ("rate", "text"),
    [(1650.4, "1,650 tok/s"), (12.5, "12 tok/s"), (2.44, "2.4 tok/s"), (1.0, "1.0 tok/s"),
     (0.3225, "3.1 s/tok"), (1 / 95, "95.0 s/tok"), (0.0, "0 tok/s")],
)  # fmt: skip
def test_rates_below_one_per_second_read_as_seconds_per_unit(rate, text):
    assert format_rate(rate, "tok") == text


def test_disabled_and_tty(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_is_tty", lambda: False)
    with caplog.at_level(logging.INFO, logger="benchmark.progress"):
        with progress(10, "quiet", enabled=False) as bar:
            bar.update(10)
    assert not lines(caplog)
    monkeypatch.setattr(progress_module, "_is_tty", lambda: True)
    bar = progress(10, "bar", unit="tok")
    assert type(bar).__name__ == "_Bar"
    bar.update(5)
    bar.set_postfix(loss=0.5)
    bar.close()
