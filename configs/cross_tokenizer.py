"""Finding 3, across tokenizers: Gemma-3-270M's next-token distributions, mapped onto SmolLM2's vocabulary,
against vanilla targets of the same entropies (paired). The mapping and the mass it keeps are recorded
per target (`mapped_mass`). At most 15 minutes on a 2-core CPU (Gemma's 262k vocabulary included; README).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.targets.gemma = ConfigDict(dict(kind="cross_model", source="gemma3-270m", n=32))
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", entropies_from="gemma", seed_offset=10_000))
    config.soft.max_steps = 200
    return config
