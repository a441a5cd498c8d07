"""The tuning protocol's choice rule (scripts/tune_cpu_recipe.py `choose`) on hand-made runs."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("tune", ROOT / "scripts" / "tune_cpu_recipe.py")
assert spec is not None and spec.loader is not None
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)


def runs(sae: str, value: str, lr: float, fvu: list[float], l0: list[float], dead=0.0):
    return [{"sae": sae, "lr": lr, "knob": "k", "value": value, "target_l0": t, "l0": got,
             "fvu": f, "frac_dead": dead} for t, f, got in zip((20, 40, 80), fvu, l0)]  # fmt: skip


def test_lowest_mean_fvu_among_candidates_on_target_at_every_l0() -> None:
    frame = pd.DataFrame(
        runs("jumprelu", "constant", 1e-3, [0.20, 0.15, 0.12], [20.3, 39.0, 78.0])
        + runs("jumprelu", "constant", 4e-3, [0.15, 0.12, 0.10], [20.5, 41.4, 82.9])
        # the best FVU, but 6.5% under its target at L0 20: not eligible
        + runs("jumprelu", "quantile", 2e-3, [0.10, 0.10, 0.09], [18.7, 38.9, 79.7])
    )
    table = tune.choose(frame, tolerance=0.05)
    chosen = table[table["chosen"]]
    assert chosen[["lr", "value"]].values.tolist() == [[4e-3, "constant"]]
    assert chosen["mean_fvu"].item() == pytest.approx((0.15 + 0.12 + 0.10) / 3)
    assert chosen["max_l0_off"].item() == pytest.approx(82.9 / 80 - 1)
    quantile = table[table["value"] == "quantile"]
    assert not quantile["eligible"].item() and quantile["max_l0_off"].item() == pytest.approx(
        1 - 18.7 / 20
    )
    assert table.loc[table["lr"] == 1e-3, "before"].item()  # lr 1e-3 x the first knob value


def test_a_tie_keeps_the_knobs_value_before_the_protocol() -> None:
    first = tune.KNOBS["topk"][1][0][0]  # "1/32"
    frame = pd.DataFrame(
        runs("topk", first, 2e-3, [0.1274, 0.1121, 0.0941], [20, 40, 80])
        + runs("topk", "1/8", 2e-3, [0.1273, 0.1121, 0.0941], [20, 40, 80])  # 1e-4 lower
    )
    chosen = tune.choose(frame, tolerance=0.05).query("chosen")
    assert chosen["value"].tolist() == [first]
    far = pd.DataFrame(  # 2% lower: not a tie
        runs("topk", first, 2e-3, [0.13, 0.11, 0.09], [20, 40, 80])
        + runs("topk", "1/8", 2e-3, [0.127, 0.108, 0.088], [20, 40, 80])
    )
    assert tune.choose(far, tolerance=0.05).query("chosen")["value"].tolist() == ["1/8"]


def test_the_committed_table_is_the_rule_applied_to_the_committed_runs() -> None:
    folder = ROOT / "results" / "reference" / "tuning_cpu"
    frame = pd.read_csv(folder / "runs.csv", dtype={"value": str})
    again = tune.choose(frame, tolerance=0.05)
    committed = pd.read_csv(folder / "tuning.csv", dtype={"value": str})
    key = ["sae", "lr", "value"]
    merged = again.merge(committed, on=key, suffixes=("", "_committed"))
    assert len(merged) == len(committed) == len(again)
    assert (merged["chosen"] == merged["chosen_committed"]).all()
    assert merged["mean_fvu"].to_numpy() == pytest.approx(merged["mean_fvu_committed"].to_numpy())
