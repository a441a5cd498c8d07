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


def runs(
    sae: str,
    value: str,
    lr: float,
    fvu: list[float],
    l0: list[float],
    dead=0.0,
    seeds=(0, 1),
    sites=("residual", "mlp"),
    problem: dict | None = None,
) -> list[dict]:
    """One candidate's runs at every (seed, site, target 20/40/80), the same numbers at each;
    `problem` = {(seed, site, target): {field: value}} spoils one run."""
    out = []
    for seed in seeds:
        for site in sites:
            for t, f, got in zip((20, 40, 80), fvu, l0):
                row = {"sae": sae, "seed": seed, "site": site, "lr": lr, "knob": "k",
                       "value": value, "target_l0": t, "l0": got, "fvu": f, "frac_dead": dead,
                       "diverged": None, "spike_step": None, "max_fvu_jump": 2.0}  # fmt: skip
                out.append(row | (problem or {}).get((seed, site, t), {}))
    return out


def test_lowest_mean_fvu_among_healthy_recipes_with_a_margin() -> None:
    spike = {(1, "residual", 40): {"spike_step": 188, "max_fvu_jump": 1203.0, "l0": 13.3}}
    frame = pd.DataFrame(
        runs("jumprelu", "constant", 1e-3, [0.20, 0.15, 0.12], [20.3, 39.0, 78.0])
        + runs("jumprelu", "constant", 2e-3, [0.17, 0.13, 0.10], [19.5, 39.5, 79.7])
        # the best FVU, but seed 1 spiked at residual L0 40: not eligible
        + runs("jumprelu", "constant", 4e-3, [0.15, 0.12, 0.10], [20.5, 41.4, 82.9], problem=spike)
    )
    table = tune.choose(frame, tolerance=0.05).set_index("lr")
    assert table.loc[4e-3, "unhealthy"] == "s1/res/40 spike@188"
    assert not table.loc[4e-3, "eligible"] and table.loc[4e-3, "max_jump"] == 1203.0
    assert table.loc[2e-3, "eligible"] and table.loc[2e-3, "margin_2x_lr"] == "unhealthy"
    assert table.loc[1e-3, "margin_2x_lr"] == "healthy"
    # 2e-3 has the lower FVU but no margin: 1e-3 (whose double is healthy) is chosen
    assert table["chosen"].tolist() == [True, False, False]
    assert table.loc[1e-3, "mean_fvu"] == pytest.approx((0.20 + 0.15 + 0.12) / 3)
    assert table.loc[1e-3, "runs"] == 12  # 2 seeds x 2 sites x 3 targets


def test_off_target_or_diverged_is_unhealthy_and_no_margin_falls_back() -> None:
    off = {(0, "mlp", 20): {"l0": 18.7}}  # 6.5% under its target
    gone = {(1, "mlp", 80): {"diverged": "non-finite loss", "l0": float("nan")}}
    frame = pd.DataFrame(
        runs("gated", "0.01", 1e-3, [0.20, 0.15, 0.12], [20, 40, 80], problem=off)
        + runs("gated", "0.01", 2e-3, [0.18, 0.14, 0.11], [20, 40, 80])
        + runs("gated", "0.01", 4e-3, [0.17, 0.13, 0.10], [20, 40, 80], problem=gone)
    )
    table = tune.choose(frame, tolerance=0.05).set_index("lr")
    assert table.loc[1e-3, "unhealthy"] == "s0/mlp/20 L0 18.7"
    assert table.loc[4e-3, "unhealthy"] == "s1/mlp/80 diverged"
    assert table.loc[2e-3, "margin_2x_lr"] == "unhealthy"
    # the only eligible recipe has no margin: it is chosen, and the table says so
    assert table["chosen"].tolist() == [False, True, False]


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
    frame = tune.read_runs(folder / "runs.csv")
    again = tune.choose(frame, tolerance=0.05)
    committed = pd.read_csv(folder / "tuning.csv", dtype={"value": str})
    key = ["sae", "lr", "value"]
    merged = again.merge(committed, on=key, suffixes=("", "_committed"))
    assert len(merged) == len(committed) == len(again)
    assert (merged["chosen"] == merged["chosen_committed"]).all()
    assert merged["mean_fvu"].to_numpy() == pytest.approx(merged["mean_fvu_committed"].to_numpy())


def test_first_round_rows_read_as_seed_0_residual_and_count_as_partly_tested(tmp_path) -> None:
    """A runs.csv row of the first round (no seed/site/spike columns) is seed 0 at the residual
    site; a recipe run there only is not eligible, and a lower lr whose double it is has a
    margin that is "partly tested", not "unhealthy" (its runs were all healthy)."""
    old = pd.DataFrame(runs("topk", "1/32", 4e-3, [0.12, 0.11, 0.09], [20, 40, 80],
                            seeds=(0,), sites=("residual",)))  # fmt: skip
    old = old.drop(columns=["seed", "site", "diverged", "spike_step", "max_fvu_jump"])
    old.to_csv(tmp_path / "runs.csv", index=False)
    first = tune.read_runs(tmp_path / "runs.csv")
    assert (first["seed"] == 0).all() and (first["site"] == "residual").all()
    assert (first["round"] == 1).all() and first["spike_step"].isna().all()
    new = pd.DataFrame(runs("topk", "1/32", 2e-3, [0.13, 0.12, 0.10], [20, 40, 80],
                            seeds=(0, 1), sites=("residual",))).assign(round=2)  # fmt: skip
    table = tune.choose(pd.concat([first, new], ignore_index=True), 0.05).set_index("lr")
    assert table.loc[4e-3, "runs"] == 3 and not table.loc[4e-3, "eligible"]
    assert table.loc[4e-3, "unhealthy"] == ""
    assert table.loc[2e-3, "margin_2x_lr"] == "partly tested" and table.loc[2e-3, "chosen"]
