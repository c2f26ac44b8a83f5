"""Finding 1: KL vs target entropy is an inverted U (easy at both ends, hard in the middle).

64 vanilla targets evenly over entropy 0..ln|V| on SmolLM2-135M; about 15 minutes on a 2-core CPU.
On a GPU: targets.vanilla.n=2048 and soft.max_steps=500 (chunks are sized to memory automatically).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import soft_defaults


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "smollm2-135m"
    config.dtype = "float32"
    config.seed = 0
    config.targets = ConfigDict()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=64, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("soft",)
    config.soft = soft_defaults()
    config.soft.max_steps = 200
    config.checkpoint_every = 4
    return config
