"""distprompt_jax: distribution prompting for frozen causal LMs in JAX."""

from distprompt_jax.lm import LanguageModel
from distprompt_jax.loading import load_model
from distprompt_jax.prompting.soft import SoftPromptConfig, soft_prompt

__all__ = ["LanguageModel", "SoftPromptConfig", "load_model", "soft_prompt"]
__version__ = "0.1.0"
