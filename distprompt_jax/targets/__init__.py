"""Target next-token distributions."""

from distprompt_jax.targets.io import TargetError, TargetSet, as_target_set, entropy_nats, validate_probs

__all__ = ["TargetError", "TargetSet", "as_target_set", "entropy_nats", "validate_probs"]
