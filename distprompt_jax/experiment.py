"""From an experiment config (ml_collections) to the objects the engines take.

A config holds:
    model, dtype, seed           the prompted model (registry name, HF dir or .gguf) and the base seed
    targets.<name>               one recipe per name: kind = vanilla | outlier | model | cross_model | file;
                                 vanilla/outlier take n, entropy_min, entropy_max (< 0: ln|V|) or
                                 entropies_from=<another recipe> (its achieved entropies: matched pairs)
    methods                      which run, in order: soft, hard, bound, bound_norm
    soft, hard, bound            the fields of SoftPromptConfig, HardPromptConfig, BoundConfig (for optional
                                 fields, 0 or "" stands for None)
    prompt_lengths               optional: run soft once per prompt length (KL vs L)
    checkpoint_every             segments between checkpoints of an unfinished chunk
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from ml_collections import ConfigDict

from distprompt_jax.prompting.soft import SoftPromptConfig
from distprompt_jax.targets import TargetSet

TARGET_KINDS = ("vanilla", "outlier", "model", "cross_model", "file")


def section_defaults(config_class) -> ConfigDict:
    """A config dataclass's defaults as a ConfigDict in which every field has a type.

    ml_collections cannot override a None field from the command line, so optional fields default to a
    falsy value of their type (0, 0.0 or "") that `section_config` turns back into None.
    """
    fields = {}
    for field in dataclasses.fields(config_class):
        value = field.default
        if value is None:
            value = "" if "str" in field.type else 0.0 if "float" in field.type else 0
        fields[field.name] = value
    return ConfigDict(fields)


def section_config(config_class, section, where: str):
    """The `config_class` instance that a config section (see `section_defaults`) describes."""
    fields = section.to_dict()
    known = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {sorted(known)}")
    for name, value in fields.items():
        optional = "None" in known[name].type
        if optional and value in (0, 0.0, ""):
            fields[name] = None
        elif "int" in known[name].type and isinstance(value, str) and value.isdigit():
            fields[name] = int(value)
    return config_class(**fields)


def soft_defaults() -> ConfigDict:
    return section_defaults(SoftPromptConfig)


def hard_defaults() -> ConfigDict:
    from distprompt_jax.prompting.hard import HardPromptConfig

    return section_defaults(HardPromptConfig)


def bound_defaults() -> ConfigDict:
    from distprompt_jax.bounds import BoundConfig

    return section_defaults(BoundConfig)


def base_config(model: str = "smollm2-135m") -> ConfigDict:
    """The fields every experiment config has, at their defaults; configs add target recipes and tune."""
    return ConfigDict(dict(
        model=model, dtype="float32", seed=0, targets=ConfigDict(), methods=("soft",),
        soft=soft_defaults(), hard=hard_defaults(), bound=bound_defaults(), checkpoint_every=4,
    ))


def soft_config(config) -> SoftPromptConfig:
    return section_config(SoftPromptConfig, config.soft, "config.soft")


def hard_config(config):
    from distprompt_jax.prompting.hard import HardPromptConfig

    return section_config(HardPromptConfig, config.hard, "config.hard")


def bound_config(config):
    from distprompt_jax.bounds import BoundConfig

    return section_config(BoundConfig, config.bound, "config.bound")


def entropy_range(recipe, vocab_size: int) -> np.ndarray:
    """`n` entropies evenly from `entropy_min` to `entropy_max` (a negative maximum means ln|V|)."""
    top = np.log(vocab_size) if recipe.entropy_max < 0 else recipe.entropy_max
    return np.linspace(recipe.entropy_min, top, recipe.n)


def _recipe_order(recipes) -> list[str]:
    """Recipe names sorted, except that a recipe comes after the one it takes its entropies from."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()):
        if name in order:
            return
        if name in seen:
            raise ValueError(f"config.targets: entropies_from forms a cycle through {name!r}")
        source = recipes[name].get("entropies_from", "")
        if source:
            if source not in recipes:
                raise ValueError(f"config.targets.{name}.entropies_from = {source!r} names no recipe")
            visit(source, seen + (name,))
        order.append(name)

    for name in sorted(recipes):
        visit(name)
    return order


def build_targets(config, lm) -> TargetSet:
    """All of the config's target recipes, concatenated; `recipe` names each row's source."""
    from distprompt_jax import targets as targets_lib

    built: dict[str, TargetSet] = {}
    for name in _recipe_order(config.targets):
        recipe = config.targets[name]
        kind = recipe.kind
        seed = config.seed + recipe.get("seed_offset", 0)
        if recipe.get("entropies_from", ""):
            source = built[recipe.entropies_from].metadata
            entropies = np.clip(source.get("entropy", source.target_entropy).to_numpy(), 0, np.log(lm.vocab_size))
        elif kind in ("vanilla", "outlier"):
            entropies = entropy_range(recipe, lm.vocab_size)
        if kind == "vanilla":
            part = targets_lib.vanilla_targets(lm.vocab_size, entropies, seed=seed)
        elif kind == "outlier":
            part = targets_lib.outlier_targets(lm.vocab_size, entropies, k=recipe.k, seed=seed)
        elif kind == "model":
            part = targets_lib.model_targets(lm, recipe.n, seed=seed)
        elif kind == "cross_model":
            from distprompt_jax import load_model

            part = targets_lib.cross_model_targets(load_model(recipe.source), lm, recipe.n, seed=seed)
        elif kind == "file":
            part = targets_lib.load_targets(recipe.path, lm.vocab_size)
        else:
            raise ValueError(f"config.targets.{name}.kind = {kind!r}; known kinds: {TARGET_KINDS}")
        metadata = part.metadata.copy()
        metadata.insert(0, "recipe", name)
        built[name] = dataclasses.replace(part, metadata=metadata)
    parts = [built[name] for name in sorted(built)]
    if not parts:
        raise ValueError("config.targets has no recipe: add at least one, e.g. config.targets.vanilla")
    metadata = pd.concat([p.metadata for p in parts], ignore_index=True)
    metadata = metadata.rename(columns={"target_id": "recipe_target_id"})
    metadata.insert(0, "target_id", np.arange(len(metadata)))
    # A recipe that took another's entropies is paired with it row by row (for paired tests).
    metadata["pair_target_id"] = -1
    for name in built:
        source = config.targets[name].get("entropies_from", "")
        if source:
            metadata.loc[metadata.recipe == name, "pair_target_id"] = (
                metadata.target_id[metadata.recipe == source].to_numpy()
            )
    failures = [p.failures.assign(recipe=name) for name, p in sorted(built.items()) if p.failures is not None]
    return TargetSet(
        np.concatenate([p.probs for p in parts]), metadata,
        failures=pd.concat(failures, ignore_index=True) if failures else None,
    )
