"""Target next-token distributions: entropy-controlled, outlier-token and LM-generated, as TargetSets."""

from distprompt_jax.targets.generated import cross_model_targets, model_targets
from distprompt_jax.targets.io import (
    TargetError,
    TargetSet,
    as_target_set,
    entropy_nats,
    load_targets,
    validate_probs,
)
from distprompt_jax.targets.mapping import TokenMapping, build_token_mapping, map_distribution
from distprompt_jax.targets.outliers import max_entropy_at_mass, outlier_mass_bound, outlier_targets
from distprompt_jax.targets.vanilla import entropy_grid, vanilla_targets

__all__ = [
    "TargetError", "TargetSet", "TokenMapping", "as_target_set", "build_token_mapping", "cross_model_targets",
    "entropy_grid", "entropy_nats", "load_targets", "map_distribution", "max_entropy_at_mass",
    "model_targets", "outlier_mass_bound", "outlier_targets", "validate_probs", "vanilla_targets",
]
