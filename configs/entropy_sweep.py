"""Finding 1: KL vs target entropy is an inverted U (easy at both ends, hard in the middle).

64 vanilla targets evenly over entropy 0..ln|V| on SmolLM2-135M: soft prompts, hard prompts (HotFlip,
short), and the unembedding bound beside them. 53 minutes on a shared 2-core CPU (2026-12-01: bound 1, soft
prompts 15, hard prompts 33; --config.hard.max_steps=20 about halves the last). On a GPU:
targets.vanilla.n=2048, soft.max_steps=500, hard.max_steps=200 (chunks are sized to memory automatically).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=64, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("soft", "hard", "bound")
    config.soft.max_steps = 200
    config.hard.max_steps = 40
    return config
