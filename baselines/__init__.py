"""SAE architectures: one small interface (`base.SparseAutoencoder`) and one file each.

A new architecture is one class here (or anywhere importable) plus one YAML in conf/sae/ whose
`_target_` names it; nothing else is registered anywhere.
"""

from baselines.base import SAEOutput, SparseAutoencoder

__all__ = ["SAEOutput", "SparseAutoencoder"]
