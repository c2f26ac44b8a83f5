"""distprompt_jax: distribution prompting for frozen causal LMs in JAX."""

from distprompt_jax.lm import LanguageModel
from distprompt_jax.loading import load_model

__all__ = ["LanguageModel", "load_model"]
__version__ = "0.1.0"
