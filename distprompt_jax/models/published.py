"""Shape-only models: the published `config.json` of models people study, shipped without weights.

Each `published/<name>.json` holds a model's hub id and its config.json values (Gemma 3 4B/12B/27B: the text
tower's, whose published checkpoints are multimodal). They read through the same strict HF-config path as a
real checkpoint (`config_from_hf`), so `abstract_model(name)` is the LanguageModel a run of the real weights
would build, as shapes and dtypes: plans (`distprompt --plan`) and `jax.eval_shape` work offline, at any size,
without memory. A run needs the real weights: `loading.load_model` resolves a name here to its hub id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from distprompt_jax.lm import LanguageModel, abstract_language_model
from distprompt_jax.models import config_from_hf
from distprompt_jax.models.config import ModelConfig

_DATA = Path(__file__).with_name("published")


@dataclasses.dataclass(frozen=True)
class PublishedModel:
    """A model known by its published config alone."""

    name: str
    hub_id: str  # where its weights are published (Hugging Face hub)
    hf_config: dict  # the config.json values
    # Why the published weights cannot be loaded by this package, or None where `hub_id` loads as it is.
    weights_unsupported: str | None = None

    def model_config(self) -> ModelConfig:
        return config_from_hf(self.hf_config)


@functools.cache
def _entries() -> dict[str, PublishedModel]:
    entries = {}
    for path in sorted(_DATA.glob("*.json")):
        raw = json.loads(path.read_text())
        entries[path.stem] = PublishedModel(name=path.stem, hub_id=raw["hub_id"], hf_config=raw["config"],
                                            weights_unsupported=raw.get("weights"))
    return entries


def names() -> list[str]:
    return sorted(_entries())


def is_published(name: str) -> bool:
    """Whether `name` (any letter case: "Llama-3.1-8B" or "llama-3.1-8b") is a shape-only model."""
    return str(name).lower() in _entries()


def published(name: str) -> PublishedModel:
    if not is_published(name):
        raise KeyError(f"{name!r} is not a shape-only model; known: {', '.join(names())}")
    return _entries()[str(name).lower()]


def abstract_model(name: str, dtype: str = "float32") -> LanguageModel:
    """The LanguageModel of a shape-only model, its params ShapeDtypeStructs in `dtype` (nothing allocated)."""
    entry = published(name)
    return abstract_language_model(entry.model_config(), dtype, entry.name)
