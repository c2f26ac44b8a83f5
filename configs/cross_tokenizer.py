"""Finding 3, across tokenizers: Gemma-3-270M's next-token distributions, mapped onto SmolLM2's vocabulary,
against vanilla targets of the same entropies (paired). The mapping and the mass it keeps are recorded
per target (`mapped_mass`). About 20 minutes on a 2-core CPU (Gemma's 262k vocabulary included).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import bound_defaults, hard_defaults, soft_defaults


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "smollm2-135m"
    config.dtype = "float32"
    config.seed = 0
    config.targets = ConfigDict()
    config.targets.gemma = ConfigDict(dict(kind="cross_model", source="gemma3-270m", n=32))
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", entropies_from="gemma", seed_offset=10_000))
    config.methods = ("soft",)
    config.soft = soft_defaults()
    config.soft.max_steps = 200
    config.hard = hard_defaults()
    config.bound = bound_defaults()
    config.checkpoint_every = 4
    return config
