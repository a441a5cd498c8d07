"""The suite's own exceptions: a bad setting found before heavy work, or bad activations.

Owns nothing else; every module may raise these. Messages name the bad value and what would
have been valid, so a typo fails in a second with a fix in the message.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid for this model, data source or cache."""


class ActivationError(RuntimeError):
    """Harvested activations are unusable (NaN or inf), named by shard and position."""
