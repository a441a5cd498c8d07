"""Massive activations as a property of the model: the `${model_norm_rule:}` resolver.

A few positions of some language models (SmolLM2: the first token after BOS when it is a
delimiter) carry activation norms 10-800x the median from a given layer on; they hold most of
the variance there, and every SAE trained on all tokens fits them first (measured in
results/reference/paper_cpu_round1: delta LM loss up to 10.6 nats, up to 99% dead latents at layers 14
and 22). `data.max_norm_multiple` leaves such rows out (benchmark.activations: not trained on,
not in L0/FVU/frequencies; their LM loss is still scored with the original activation).

Its default in every conf/data/*.yaml is `${model_norm_rule:}`: the model config's
`massive_activations` block, when it names the run's site and layer, e.g.

    massive_activations:
      max_norm_multiple: 10
      layers: {residual: [11, 12, 13], mlp: [11]}

gives `data.max_norm_multiple = 10` at those (site, layer) pairs and null (every token kept,
the paper's recipe) elsewhere; a model config without the block gives null everywhere. An
explicit `data.max_norm_multiple=<number>` or `=null` overrides the rule. The resolved value is
what the config hash sees (benchmark.identity drops a null), so runs the rule does not touch
keep their hashes, and a run it touches has the hash of the same run with the multiple set by
hand. `scripts/massive_activations.py` measures where a model needs it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from benchmark.errors import ConfigError


def model_norm_rule(cfg: DictConfig) -> Any:
    """The model's max_norm_multiple at cfg's site and layer, or None."""
    rule = cfg.model.get("massive_activations")
    if not rule:
        return None
    multiple, layers = rule.get("max_norm_multiple"), rule.get("layers") or {}
    ok = isinstance(multiple, (int, float)) and not isinstance(multiple, bool) and multiple > 1
    if not ok or not isinstance(layers, (dict, DictConfig)):
        raise ConfigError(
            f"model.massive_activations={OmegaConf.to_container(rule)!r} is not valid: "
            "{max_norm_multiple: a number > 1, layers: {<site name>: [layer indices]}}"
        )
    site_layers = layers.get(str(cfg.site.name)) or []
    return multiple if int(cfg.layer.index) in [int(x) for x in site_layers] else None


def _resolver(*, _root_: DictConfig) -> Any:
    """A malformed rule resolves to null here: `benchmark.validate.check_run` calls
    `model_norm_rule` itself and names the bad key (an error raised inside a resolver would
    reach the user wrapped in OmegaConf's interpolation error)."""
    try:
        return model_norm_rule(_root_)
    except ConfigError:
        return None


if not OmegaConf.has_resolver("model_norm_rule"):
    OmegaConf.register_new_resolver("model_norm_rule", _resolver)
