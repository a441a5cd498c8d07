"""Property-based fuzzing of the config checks (hypothesis).

Any mix of overrides of the main keys of every group, valid or not, either composes and passes
`check_run` + `plan_run` (the checks every run does before its first heavy step), or fails
with ConfigError: never another exception type, which the CLI would show as a traceback. An
unknown group option or an unparsable override fails in Hydra's composition; the CLI turns
that into one line (`benchmark.cli_errors.describe`), checked here too. Cheap: no model, no
data; ~200 examples in all.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmark.cli_errors import describe  # noqa: E402
from benchmark.errors import ConfigError  # noqa: E402
from benchmark.run import plan_run  # noqa: E402
from benchmark.validate import check_run  # noqa: E402
from tests.helpers import CONF, compose_config  # noqa: E402

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ("model", "layer", "site", "sae", "sparsity", "data", "train", "eval")
# Values that are wrong for most keys, as Hydra override literals.
JUNK = ["abc", "nan", "inf", "-inf", "null", "true", "false", "''", "[1,2]", "{a: 1}", "-1", "0",
        "1.5", "-0.5", "1e-30", "'7'"]  # fmt: skip


def ints(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map(str)


def reals(lo: float, hi: float) -> st.SearchStrategy[str]:
    return st.floats(lo, hi, allow_nan=False).map(repr)


def value(*valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(*valid, st.sampled_from(JUNK))


# key -> values (valid ranges and junk). Sizes stay small: plan_run builds the SAE.
KEYS: dict[str, st.SearchStrategy[str]] = {
    "layer.index": value(ints(-3, 45)),
    "model.dtype": value(st.sampled_from(["float32", "bfloat16", "float16", "auto", "float8"])),
    "sae.k": value(ints(-2, 600)),
    "sae.coefficient": value(reals(0, 10)),
    "sae.bandwidth": value(reals(0, 1)),
    "sae.threshold_init": value(reals(0, 1)),
    "sae.k_aux": value(ints(-2, 600)),
    "sae.aux_coefficient": value(reals(0, 1)),
    "sae.b_pre_init": value(st.sampled_from(["geometric_median", "mean", "zero", "nope"])),
    "sparsity.target_l0": value(ints(-5, 5000), reals(0, 100)),
    "sparsity.coefficient": value(reals(0, 10)),
    "data.n_train_tokens": value(ints(-10, 10**7)),
    "data.n_eval_tokens": value(ints(-10, 10**6)),
    "data.context_length": value(ints(-1, 4096)),
    "data.eval_fraction": value(reals(0, 1)),
    "train.lr": value(reals(0, 1)),
    "train.batch_size": value(ints(-2, 8192)),
    "train.n_tokens": value(ints(-10, 10**8)),
    "train.width": value(ints(-2, 2048)),
    "train.width_factor": value(ints(-1, 8)),
    "train.calibration_frac": value(reals(0, 1)),
    "eval.batch_size": value(ints(-2, 64)),
    "eval.kl_div": value(st.sampled_from(["true", "false"])),
    "eval.n_activation_tokens": value(ints(-10, 10**6)),
    "eval.activation_batch_size": value(ints(-2, 8192)),
    "seed": value(ints(-(2**33), 2**33)),
}


@st.composite
def override_lists(draw: st.DrawFn) -> list[str]:
    """A few group choices (valid options) and a few key overrides (`++`: set or add)."""
    chosen = draw(st.lists(st.sampled_from(GROUPS), max_size=4, unique=True))
    out = [f"{g}={draw(st.sampled_from(options(g)))}" for g in chosen]
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=5, unique=True))
    out += [f"++{k}={draw(KEYS[k])}" for k in keys]
    if not any(k.startswith("++train.width=") for k in out):
        out.append("++train.width=256")  # the big models' default width would take seconds
    return out


def checks(cfg) -> None:
    """check_run + plan_run: pass, or ConfigError; anything else fails."""
    try:
        check_run(cfg)
        plan = plan_run(cfg)
    except ConfigError:
        return
    assert plan.d_sae >= 1 and plan.d_in >= 1


@FAST
@given(override_lists())
def test_any_override_passes_the_checks_or_is_a_config_error(overrides):
    checks(compose_config(overrides))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(("model", "layer", "site", "sae", "sparsity", "data", "train", "eval")),
    st.from_regex(r"[a-z][a-z0-9_]{0,9}", fullmatch=True).filter(
        lambda s: s not in ("null", "true", "false", "nan", "inf")  # not names to Hydra
    ),
)
def test_an_unknown_option_is_one_line_naming_it_and_the_valid_ones(group, name):
    if name in options(group):
        return
    with pytest.raises(Exception) as info:
        compose_config([f"{group}={name}"])
    message = describe(info.value)
    assert message is not None and "\n" not in message
    assert message.startswith(f"{group}={name}: no such option; valid: ")
    assert message.endswith(", ".join(options(group)))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(KEYS)),
    st.text(st.characters(codec="ascii", exclude_characters="$\n\r"), max_size=12),
)
def test_any_text_as_a_value_is_a_config_error_or_one_line(key, text):
    """Raw text after `key=`: Hydra's parser may reject it (one line from `describe`); if it
    composes, the checks pass or raise ConfigError. (`$` starts an interpolation: elsewhere.)"""
    try:
        cfg = compose_config([f"++{key}={text}", "++train.width=256"])
    except Exception as e:  # noqa: BLE001
        message = describe(e)
        assert message is not None and "\n" not in message, repr(e)
        return
    checks(cfg)
