"""KL vs soft-prompt length L: 16 vanilla targets over entropy 0..ln|V|, L in (1, 2, 5, 10, 20).

About 20 minutes on a 2-core CPU; on a GPU raise targets.vanilla.n and soft.max_steps.
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import bound_defaults, hard_defaults, soft_defaults


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "smollm2-135m"
    config.dtype = "float32"
    config.seed = 0
    config.targets = ConfigDict()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=16, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("soft",)
    config.prompt_lengths = (1, 2, 5, 10, 20)
    config.soft = soft_defaults()
    config.soft.max_steps = 150
    config.hard = hard_defaults()
    config.bound = bound_defaults()
    config.checkpoint_every = 4
    return config
