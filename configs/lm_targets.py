"""Finding 3: LM-generated targets are easier than random ones of the same entropy.

32 next-token distributions SmolLM2 itself produces on contexts it sampled, and 32 vanilla targets at
the same entropies (paired). About 15 minutes on a 2-core CPU; on a GPU raise targets.model.n.
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.targets.model = ConfigDict(dict(kind="model", n=32))
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", entropies_from="model", seed_offset=10_000))
    config.soft.max_steps = 200
    return config
