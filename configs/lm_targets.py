"""Finding 3: LM-generated targets are easier than random ones of the same entropy.

32 next-token distributions SmolLM2 itself produces on contexts it sampled, and 32 vanilla targets at
the same entropies (paired). About 15 minutes on a 2-core CPU; on a GPU raise targets.model.n.
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import bound_defaults, hard_defaults, soft_defaults


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "smollm2-135m"
    config.dtype = "float32"
    config.seed = 0
    config.targets = ConfigDict()
    config.targets.model = ConfigDict(dict(kind="model", n=32))
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", entropies_from="model", seed_offset=10_000))
    config.methods = ("soft",)
    config.soft = soft_defaults()
    config.soft.max_steps = 200
    config.hard = hard_defaults()
    config.bound = bound_defaults()
    config.checkpoint_every = 4
    return config
