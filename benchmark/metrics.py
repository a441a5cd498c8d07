"""The metric registry: every metric's definition, direction, table format and the token count
it is measured on, in one place that `benchmark.evaluate` (which computes them) and
`benchmark.report` (which tabulates them) both read. Every result records `METRICS_VERSION`
and the definitions it was computed with.

Two evaluation sets, both from the held-out split that training never reads:
- the *activation set*: `eval.n_activation_tokens` (default 100k) cached activations of the
  hooked site, encoded and decoded by the SAE alone (no language model). L0, FVU and every
  firing-frequency statistic are measured here: they need many tokens to mean what their
  labels say (a latent that fires once in 3,000 tokens is not dead), and cost little.
- the *LM set*: `data.n_eval_tokens` tokens in windows spread evenly over the held-out split,
  run through the language model clean and with the SAE spliced in. The cross-entropy metrics
  are measured here, with `splice_l0` (L0 on these tokens): the report reads the LM metrics at
  `splice_l0` and the activation-set metrics at `l0`, so the LM set need not be representative
  of the activation set's L0, only large enough for its error bars (`delta_lm_loss_se`, over
  its `n_lm_windows` windows).

Pure Python: importing it pulls in no torch, so a report can be made from copied result files.
"""

from __future__ import annotations

from dataclasses import dataclass

METRICS_VERSION = "2"

ACT = "n_activation_tokens"  # token-count field of the activation set
LM = "n_lm_tokens"  # token-count field of the LM set (positions scored for CE)


@dataclass(frozen=True)
class Metric:
    definition: str
    label: str  # axis / column label
    higher_is_better: bool
    measured_on: str  # the result field holding the number of tokens it was measured on
    fmt: str = "{:.4f}"


METRICS: dict[str, Metric] = {
    "l0": Metric(
        "mean over held-out activation-set tokens (BOS/EOS/pad excluded) of the number of "
        "latents > 0",
        "L0",
        False,
        ACT,
        "{:.1f}",
    ),
    "fvu": Metric(
        "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole held-out activation set, "
        "dataset mean, float64 accumulation (not per batch)",
        "fraction of variance unexplained",
        False,
        ACT,
    ),
    "frac_dead": Metric(
        "fraction of latents that never fire on the held-out activation set "
        "(n_activation_tokens tokens)",
        "fraction of dead latents",
        False,
        ACT,
    ),
    "frac_freq_over_10pct": Metric(
        "fraction of latents firing on more than 10% of held-out activation-set tokens "
        "(the paper's Fig. 5 statistic)",
        "fraction of latents firing on >10% of tokens",
        False,
        ACT,
        "{:.2e}",
    ),
    "frac_freq_over_1pct": Metric(
        "fraction of latents firing on more than 1% of held-out activation-set tokens",
        "fraction of latents firing on >1% of tokens",
        False,
        ACT,
        "{:.2e}",
    ),
    "clean_ce_loss": Metric(
        "mean next-token cross-entropy (nats) of the unmodified model over LM-set positions t "
        "whose input token t and target token t+1 are both not BOS/EOS/pad",
        "clean CE loss (nats)",
        False,
        LM,
    ),
    "spliced_ce_loss": Metric(
        "same positions, with the SAE reconstruction replacing the activation at the hook for "
        "every non-BOS/EOS/pad position (those keep the original activation)",
        "spliced CE loss (nats)",
        False,
        LM,
    ),
    "zero_ce_loss": Metric(
        "same positions, with zeros spliced in instead of the reconstruction",
        "zero-ablation CE loss (nats)",
        False,
        LM,
    ),
    "delta_lm_loss": Metric(
        "spliced_ce_loss - clean_ce_loss (the paper's headline metric)",
        "delta LM loss (nats)",
        False,
        LM,
    ),
    "delta_lm_loss_se": Metric(
        "standard error of delta_lm_loss over the LM set's windows (the sampling units): "
        "sqrt(W/(W-1) * sum_w (d_w - D n_w)^2) / sum_w n_w, d_w a window's summed spliced - "
        "clean CE, n_w its scored positions, D = delta_lm_loss, W = n_lm_windows",
        "SE of delta LM loss (nats)",
        False,
        LM,
    ),
    "ce_loss_recovered": Metric(
        "(zero_ce_loss - spliced_ce_loss) / (zero_ce_loss - clean_ce_loss); null when the "
        "denominator is below ce_recovered_min_gap nats (zero ablation barely hurts: the "
        "ratio would be noise)",
        "CE loss recovered",
        True,
        LM,
    ),
    "kl_div": Metric(
        "mean over the same positions of KL(clean || spliced) of the next-token distributions "
        "(nats)",
        "KL(clean || spliced)",
        False,
        LM,
    ),
    "splice_l0": Metric(
        "L0 on the LM set's spliced positions: the L0 at which the LM metrics (delta_lm_loss, "
        "ce_loss_recovered, kl_div) are read in the report's curves and matched-L0 claims",
        "L0 on the LM set",
        False,
        LM,
        "{:.1f}",
    ),
    "train_frac_dead": Metric(
        "the trainer's dead fraction at the end of training: latents that did not fire in the "
        "last dead_window_tokens training tokens (the window AuxK uses)",
        "dead fraction in the training window",
        False,
        "dead_window_tokens",
    ),
}

# The denominator of CE recovered below which the ratio is reported as null (nats).
CE_RECOVERED_MIN_GAP = 0.05


def definitions() -> dict[str, str]:
    """{metric: definition} as written into every result."""
    return {name: m.definition for name, m in METRICS.items()}
