"""distprompt_jax: distribution prompting for frozen causal LMs in JAX."""

from distprompt_jax.bounds import BoundConfig, norm_bound_estimate, unembedding_bound
from distprompt_jax.lm import LanguageModel
from distprompt_jax.loading import load_model
from distprompt_jax.platforms import skip_absent_tpu
from distprompt_jax.prompting.hard import HardPromptConfig, hard_prompt
from distprompt_jax.prompting.prefix import PrefixPromptConfig, prefix_prompt
from distprompt_jax.prompting.soft import SoftPromptConfig, soft_prompt
from distprompt_jax.results import PromptResults

# Importing the package is how every entry point starts (the CLI, a script, a notebook), and importing starts no
# JAX backend: where libtpu is installed and no TPU chip is present, JAX then starts on the CPU without probing.
skip_absent_tpu()

__all__ = [
    "BoundConfig", "HardPromptConfig", "LanguageModel", "PrefixPromptConfig", "PromptResults", "SoftPromptConfig",
    "hard_prompt", "load_model", "norm_bound_estimate", "prefix_prompt", "soft_prompt", "unembedding_bound",
]
__version__ = "0.1.0"
