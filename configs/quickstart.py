"""Quickstart: soft prompts for 24 vanilla targets spread over entropy 0..ln|V| on SmolLM2-135M.

About 5 minutes on a 2-core CPU. To scale up on a GPU or a pod: raise targets.vanilla.n (thousands),
soft.max_steps (500, the default) and soft.restarts; leave soft.chunk_size at 0 (sized to memory).

    distprompt --config=configs/quickstart.py --workdir=runs/quickstart [--config.soft.max_steps=300 ...]
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import bound_defaults, hard_defaults, soft_defaults


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "smollm2-135m"
    config.dtype = "float32"
    config.seed = 0
    config.targets = ConfigDict()
    # entropy_max < 0 means ln|V|.
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=24, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("soft",)
    config.soft = soft_defaults()
    config.soft.max_steps = 200
    config.hard = hard_defaults()
    config.bound = bound_defaults()
    config.checkpoint_every = 2
    return config
