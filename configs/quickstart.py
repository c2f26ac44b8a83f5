"""Quickstart: soft prompts for 24 vanilla targets spread over entropy 0..ln|V| on SmolLM2-135M.

About 4 minutes on an idle 2-core CPU (the certified bound, then soft prompts with restarts). To scale up on a
GPU or a pod: raise targets.vanilla.n (thousands), soft.max_steps (500, the default) and soft.restarts;
soft.slots="auto" sizes the targets optimized at once to the free memory (unset: 64 on a CPU, 1024 on an
accelerator).

    distprompt --config=configs/quickstart.py --workdir=runs/quickstart [--config.soft.max_steps=300 ...]
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    # entropy_max < 0 means ln|V|.
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=24, entropy_min=0.0, entropy_max=-1.0))
    config.soft.max_steps = 200
    config.checkpoint_every = 2
    return config
