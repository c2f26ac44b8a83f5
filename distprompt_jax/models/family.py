"""Model families, each registered by its own module: everything the package needs to know about one.

A family module (llama.py, gemma3.py, gpt2.py) ends with `register(Family(...))`; the decoder, the HF config
and weight readers, the GGUF reader and `LanguageModel.final_norm_parameters` find what they need here and
nowhere else. Adding a family is one new module plus its import in `models/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from distprompt_jax.models.config import UnsupportedConfigError

if TYPE_CHECKING:
    from flax import nnx

    from distprompt_jax.checkpoints.gguf_mapping import (
        GGUFMetadata,
        TensorSpec,
        TensorTable,
    )
    from distprompt_jax.models.config import ModelConfig
    from distprompt_jax.models.hf_config import TensorSource


class Block(Protocol):
    """One decoder layer. The decoder builds it once with a leading `stack` axis on every parameter and
    scans over that axis.

    `__call__(x [L, d], *, inv_freq, window, past)` runs x at positions P..P+L-1 against `past` =
    (keys, values) [P, n_kv_heads, head_dim] of positions 0..P-1 (None: P = 0) and returns
    (x [L, d], (keys, values) of x's positions), keys after the rotary embedding.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, stack: int | None = None): ...

    def __call__(self, x, *, inv_freq, window, past=None) -> tuple[Any, tuple[Any, Any]]: ...


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp `general.architecture` maps back to a transformers checkpoint.

    `config(meta, gguf_tensors)` gives the HF `config.json` fields particular to the architecture (the
    reader adds model_type, architectures, vocabulary size, tied embeddings and special token ids) and
    must read, through `meta`, every `{name}.*` key that may change the math -- the reader refuses the
    rest by name. `tensors(hf_config)` lists every HF tensor of that config and where it lives in the file.
    """

    name: str
    model_type: str
    hf_architecture: str
    config: Callable[[GGUFMetadata, TensorTable], dict]
    tensors: Callable[[dict], list[TensorSpec]]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its layer, final norm, and the readers of its checkpoints.

    name: `ModelConfig.family`.
    model_types: the HF `config.json` model_type values `config_from_hf` reads.
    block: the decoder layer class (see `Block`).
    final_norm: `final_norm(cfg, dtype)`, the norm before the unembedding: `layers.RMSNorm` or
      `layers.LayerNorm`, whose `spec()` describes it publicly (`LanguageModel.final_norm_parameters`).
    config_from_hf: HF `config.json` dict -> ModelConfig, refusing by name what the family does not implement.
    params_from_hf: (ModelConfig, HF-named tensors) -> our parameter pytree (numpy).
    gguf: the GGUF architectures that convert to this family's HF checkpoints.
    refused_model_types: HF model_types that belong to this family's world but are not supported, with why.
    """

    name: str
    model_types: tuple[str, ...]
    block: type[Block]
    final_norm: Callable[[ModelConfig, Any], nnx.Module]
    config_from_hf: Callable[[dict], ModelConfig]
    params_from_hf: Callable[[ModelConfig, TensorSource], dict]
    gguf: tuple[GGUFArchitecture, ...] = ()
    refused_model_types: Mapping[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its name, model_types and GGUF architecture names must be new."""
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken_types = {t for f in _REGISTRY.values() for t in (*f.model_types, *f.refused_model_types)}
    taken_gguf = {a.name for f in _REGISTRY.values() for a in f.gguf}
    clashes = sorted(taken_types & {*family.model_types, *family.refused_model_types})
    clashes += sorted(taken_gguf & {a.name for a in family.gguf})
    if clashes:
        raise ValueError(f"model family {family.name!r} claims {clashes}, already claimed by another family")
    wrong = [a.name for a in family.gguf if a.model_type not in family.model_types]
    if wrong:
        raise ValueError(f"model family {family.name!r}: GGUF architectures {wrong} convert to a model_type it "
                         "does not read")
    _REGISTRY[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family, by name (whatever order their modules were imported in)."""
    return tuple(_REGISTRY[name] for name in sorted(_REGISTRY))


def get_family(name: str) -> Family:
    if name not in _REGISTRY:
        raise UnsupportedConfigError(f"unknown model family {name!r}; supported: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def supported_model_types() -> list[str]:
    return sorted(t for family in _REGISTRY.values() for t in family.model_types)


def family_for_model_type(model_type: str | None) -> Family:
    """The family that reads HF checkpoints of `model_type`; refuses an unsupported one by name."""
    for family in families():
        if model_type in family.model_types:
            return family
        if model_type in family.refused_model_types:
            raise UnsupportedConfigError(family.refused_model_types[model_type])
    raise UnsupportedConfigError(f"unsupported model_type {model_type!r}; supported: {supported_model_types()}")


def gguf_architectures() -> dict[str, GGUFArchitecture]:
    """GGUF `general.architecture` name -> its mapping, by name."""
    return dict(sorted((arch.name, arch) for family in _REGISTRY.values() for arch in family.gguf))
