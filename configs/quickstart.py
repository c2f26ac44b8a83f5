"""Quickstart: prefixes for 16 vanilla targets spread over entropy 0..ln|V| on SmolLM2-135M, beside the
certified bound.

About 2.5 minutes on an idle 2-core CPU with the model cached, compiles included (BENCHMARKS.md, "The
quickstart"). Why prefixes (free keys and values at every layer, read by the BOS token): of the prompt kinds
they are the fastest search per step and end closest to the certified bound (BENCHMARKS.md, "Prefixes": 4.6x
soft prompts' target·steps/s and half their median gap at the same budget), so a short run draws the model's
limit more than the search's: the found KL rises and falls with entropy (the inverted U), a short way above
the bound. Below entropy ~5 nats most targets end within 0.2 nats of their bound; above ~6 nats the gap stays
near 0.3 however long the search runs: no prompt's residual stream can leave the final norm's surface, where
the best KL is about that much above the certificate (BUILD.md, "The certificate"). Soft prompts
(`--config.methods="('bound','soft')"`) draw the same shape further above the bound.

To scale up on a GPU or a pod: raise targets.vanilla.n (thousands) and prefix.max_steps (500, the default);
prefix.slots="auto" sizes the targets optimized at once to the free memory.

    distprompt --config=configs/quickstart.py --workdir=runs/quickstart [--config.prefix.max_steps=300 ...]
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    # entropy_max < 0 means ln|V|.
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=16, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("bound", "prefix")
    config.prefix.max_steps = 150
    config.checkpoint_every = 2
    return config
