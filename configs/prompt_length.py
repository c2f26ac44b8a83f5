"""KL vs soft-prompt length L: 16 vanilla targets over entropy 0..ln|V|, L in (1, 2, 5, 10, 20).

At most 16 minutes on a 2-core CPU (README); on a GPU raise targets.vanilla.n and soft.max_steps.
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=16, entropy_min=0.0, entropy_max=-1.0))
    config.prompt_lengths = (1, 2, 5, 10, 20)
    config.soft.max_steps = 150
    return config
