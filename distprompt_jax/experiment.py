"""From an experiment config (ml_collections) to the objects the engines take.

A config holds:
    model, dtype, seed           the prompted model (registry name, HF dir or .gguf) and the base seed
    targets.<name>               one recipe per name: kind = vanilla | outlier | model | cross_model | file;
                                 vanilla/outlier take n, entropy_min, entropy_max (< 0: ln|V|) or
                                 entropies_from=<another recipe> (its achieved entropies: matched pairs)
    methods                      which run: the bounds (bound, bound_norm) first, then soft, prefix, final_norm
                                 and hard in the order given; the default (bound, soft) gives every prompt its
                                 certified floor
    soft, prefix, hard, bound    the fields of SoftPromptConfig, PrefixPromptConfig, HardPromptConfig, BoundConfig
    final_norm                   the final-norm rung of the expressivity ladder: SoftPromptConfig's fields but
                                 those the rung fixes (`FINAL_NORM_FIXED`); see `final_norm_config`
    prompt_lengths               optional: run each prompt method once per prompt length (KL vs L)
    checkpoint_every             segments between checkpoints of a method's pool
    tensorboard                  also write per-segment scalars as TensorBoard events (needs tensorboardX)

`validate(config)` refuses, naming the field, everything that can be checked before the model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path

import numpy as np
import pandas as pd
from ml_collections import ConfigDict, FieldReference, config_dict

from distprompt_jax import field_types, metrics
from distprompt_jax.prompting.prefix import PrefixPromptConfig
from distprompt_jax.prompting.soft import SoftPromptConfig
from distprompt_jax.targets import TargetSet
from distprompt_jax.targets.io import PROBS_FILE

METHODS = ("soft", "prefix", "final_norm", "hard", "bound", "bound_norm")
BOUND_METHODS = ("bound", "bound_norm")
TARGET_KINDS = ("vanilla", "outlier", "model", "cross_model", "file")
DTYPES = ("float32", "bfloat16")
# The top-level fields a config may have; anything else is a typo or a field this version does not know.
TOP_LEVEL_FIELDS = ("model", "dtype", "seed", "targets", "methods", "soft", "prefix", "final_norm", "hard", "bound",
                    "checkpoint_every", "prompt_lengths", "tensorboard")
# The final-norm rung (method "final_norm") is the soft engine with one free vector u replacing, at the last
# position, the residual stream that enters the final norm: logits = unembed(final_norm(u)), u in R^d
# (SoftPromptConfig.intervention_layer = n_layers, intervention_mode = "replace"). Its reachable set is then
# exactly "any final-norm output": it contains every prompt's (a soft prompt's or a prefix's output is
# final_norm(h) for its last hidden state h), and it is the set bound_norm searches (bound_norm optimizes the
# same final-norm input), inside the unconstrained bound's R^d. Why not SoftPromptConfig's
# intervention_layer="final_norm": there a vector replaces (or is added to) the final norm's *output*, so it
# reaches any vector in R^d, the bound's set, and could undercut bound_norm; its "add" and "replace" differ only
# in the start. Why "replace" rather than "add" at the norm's input (the same set either way): a replaced u
# starts at N(0, σ²) and Adam moves it at its own scale, while an added v would be a small step on a residual
# stream whose last-layer entries are often orders of magnitude larger (the norm divides the step away), and the
# result would depend on the fixed tokens, which here only satisfy the engine (an intervention needs an input).
FINAL_NORM_INTERVENTION_MODE = "replace"
# The final-norm rung's own recipe. Its one vector reaches the logits through the final norm and the unembedding
# only, so at 64 slots a step costs ~1/50 of a soft prompt's, and SmolLM2's unembedding is ill-conditioned: the
# soft recipe (Adam 0.02, cosine) left it far from its optimum (median 0.96 nats above the certified bound after
# 200 steps on 24 vanilla targets, up to 3.7; 0.13 with this recipe over ≤ 1000 steps). BUILD.md, BENCHMARKS.md.
FINAL_NORM_RECIPE = dict(learning_rate=0.1, schedule="constant", max_steps=1000)
# SoftPromptConfig fields the rung fixes (the intervention) or has no use for (one vector, no tokens to start
# from): a config naming them in config.final_norm is refused.
FINAL_NORM_FIXED = ("intervention_layer", "intervention_mode", "prompt_len", "init_text", "bank_size")
# The fields each kind of target recipe reads (besides `kind`).
RECIPE_FIELDS = {
    "vanilla": ("n", "entropy_min", "entropy_max", "entropies_from", "seed_offset"),
    "outlier": ("n", "entropy_min", "entropy_max", "entropies_from", "seed_offset", "k"),
    "model": ("n", "seed_offset", "template"),
    "cross_model": ("source", "n", "seed_offset", "template"),
    "file": ("path",),
}
# Building targets holds each recipe's rows and then their concatenation: twice the float32 probabilities.
TARGET_COPIES = 2


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


def section_defaults(config_class) -> ConfigDict:
    """A config dataclass's defaults as a ConfigDict whose fields keep their types on override.

    A plain field (int, float, str, bool, tuple) is stored as its default, so ml_collections types it;
    an optional one whose default is None is a typed placeholder (`--config.soft.chunk_size=8` parses an
    int). Union fields (`int | str | None`, `str | tuple[int, ...]`) and optional fields with another
    default take any Python literal (`--config.soft.prefix="(1, 2)"` is a tuple of ids, `=hello` text);
    `section_config` checks them against the type hint.
    """
    hints = typing.get_type_hints(config_class)
    fields = {}
    for field in dataclasses.fields(config_class):
        if field.init:
            fields[field.name] = _config_value(hints[field.name], _default(config_class, field))
    return ConfigDict(fields)


def _default(config_class, field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{config_class.__name__}.{field.name} has no default, so a config cannot leave it out")


def _config_value(hint, default):
    members = field_types.members(hint)
    plain = [m for m in members if m is not type(None)]
    if len(plain) == 1 and len(members) == 1:
        return default
    if len(plain) == 1 and default is None and plain[0] in (int, float, str, bool):
        return config_dict.placeholder(plain[0])
    return FieldReference(default, field_type=object)


def section_config(config_class, section, where: str):
    """The `config_class` instance that a config section (see `section_defaults`) describes.

    Fields the section leaves out take the dataclass default; unknown fields and values of the wrong type
    or non-finite floats raise ConfigError naming `where.field`.
    """
    values = section.to_dict() if isinstance(section, ConfigDict) else dict(section)
    hints = typing.get_type_hints(config_class)
    known = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            "unknown field(s) " + ", ".join(f"{where}.{name}{_did_you_mean(name, known)}" for name in unknown)
            + f"; {config_class.__name__} has {', '.join(known)}"
        )
    return config_class(**{name: convert_field(value, hints[name], f"{where}.{name}")
                           for name, value in values.items()})


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def convert_field(value, hint, name: str):
    """`value` as the type hint `hint` asks for, or ConfigError naming the field `name`.

    Exact types are taken first; then an int becomes a float where a float is asked for, or text where only
    text is (`--config.soft.prefix=5` is the text "5"), and a list of ints a tuple. Floats must be finite.
    """
    if value is None and type(None) not in field_types.members(hint):
        raise ConfigError(f"{name} may not be None: give {field_types.describe(hint)}")
    converted = field_types.convert(value, hint)
    if converted is field_types.MISMATCH:
        raise ConfigError(f"{name} = {value!r}: expected {field_types.describe(hint)}")
    if isinstance(converted, float) and not math.isfinite(converted):
        raise ConfigError(f"{name} = {converted}: must be a finite number")
    return converted


def soft_defaults() -> ConfigDict:
    return section_defaults(SoftPromptConfig)


def prefix_defaults() -> ConfigDict:
    return section_defaults(PrefixPromptConfig)


def final_norm_defaults() -> ConfigDict:
    """The final-norm rung's section: SoftPromptConfig's defaults without `FINAL_NORM_FIXED`, its own recipe
    (`FINAL_NORM_RECIPE`), and bos=True (the engine runs the model on fixed tokens, whose last position's
    final-norm input the vector then replaces)."""
    section = soft_defaults()
    for name in FINAL_NORM_FIXED:
        del section[name]
    section.update(FINAL_NORM_RECIPE)
    section.bos = True
    return section


def hard_defaults() -> ConfigDict:
    from distprompt_jax.prompting.hard import HardPromptConfig

    return section_defaults(HardPromptConfig)


def bound_defaults() -> ConfigDict:
    from distprompt_jax.bounds import BoundConfig

    return section_defaults(BoundConfig)


def base_config(model: str = "smollm2-135m") -> ConfigDict:
    """The fields every experiment config has, at their defaults; configs add target recipes and tune."""
    return ConfigDict(dict(
        model=model, dtype="float32", seed=0, targets=ConfigDict(), methods=("bound", "soft"),
        soft=soft_defaults(), prefix=prefix_defaults(), final_norm=final_norm_defaults(), hard=hard_defaults(),
        bound=bound_defaults(),
        checkpoint_every=4,
        tensorboard=False,
    ))


def run_order(methods) -> tuple[str, ...]:
    """The bounds first (a prompt method uses the certified bound as each target's floor), then the rest in
    the order given."""
    return tuple(m for m in BOUND_METHODS if m in methods) + tuple(m for m in methods if m not in BOUND_METHODS)


def soft_config(config) -> SoftPromptConfig:
    return section_config(SoftPromptConfig, config.soft, "config.soft")


def prefix_config(config) -> PrefixPromptConfig:
    return section_config(PrefixPromptConfig, config.get("prefix") or ConfigDict(), "config.prefix")


def final_norm_config(config, n_layers: int) -> SoftPromptConfig:
    """The SoftPromptConfig of the final-norm rung for a model of `n_layers` layers: config.final_norm's fields,
    the intervention fixed (see `FINAL_NORM_INTERVENTION_MODE`); a field of `FINAL_NORM_FIXED` is refused."""
    section = config.get("final_norm")
    section = final_norm_defaults() if section is None else section
    fixed = sorted(set(section.keys()) & set(FINAL_NORM_FIXED))
    if fixed:
        raise ConfigError(
            f"{', '.join(f'config.final_norm.{name}' for name in fixed)}: the final-norm rung sets the intervention "
            f"itself (one vector replacing the final norm's input) and has no prompt length or start text; use "
            f"config.soft with intervention_layer for other interventions")
    soft = section_config(SoftPromptConfig, section, "config.final_norm")
    return dataclasses.replace(soft, intervention_layer=n_layers, intervention_mode=FINAL_NORM_INTERVENTION_MODE)


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


def recipe_order(recipes) -> list[str]:
    """Recipe names sorted, except that a recipe comes after the one it takes its entropies from."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()):
        if name in order:
            return
        if name in seen:
            raise ConfigError(f"config.targets: entropies_from forms a cycle through {name!r}")
        source = recipes[name].get("entropies_from", "")
        if source:
            if source not in recipes:
                raise ConfigError(f"config.targets.{name}.entropies_from = {source!r} names no recipe")
            visit(source, seen + (name,))
        order.append(name)

    for name in sorted(recipes):
        visit(name)
    return order


def build_targets(config, lm) -> TargetSet:
    """All of the config's target recipes, concatenated; `recipe` names each row's source."""
    from distprompt_jax import targets as targets_lib

    check_target_memory(config, lm.vocab_size)
    built: dict[str, TargetSet] = {}
    for name in recipe_order(config.targets):
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
            part = targets_lib.model_targets(lm, recipe.n, seed=seed, template=recipe.get("template", "none"))
        elif kind == "cross_model":
            from distprompt_jax import load_model

            part = targets_lib.cross_model_targets(load_model(recipe.source), lm, recipe.n, seed=seed,
                                                   template=recipe.get("template", "none"))
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


def validate(config, lm=None) -> None:
    """Refuse, naming the field, whatever in `config` cannot run; raises ConfigError (a ValueError).

    Without `lm` nothing is loaded: unknown fields, the five sections' types (and finite floats), the
    bound's settings, methods, checkpoint_every, prompt_lengths and every target recipe (kinds, fields,
    ranges, entropies_from links, file paths). With the loaded model `lm`, also the prompt engines' own
    checks for the methods that run and whether the targets fit in memory.
    """
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise ConfigError("unknown config field(s) " + ", ".join(
            f"config.{name}{_did_you_mean(name, TOP_LEVEL_FIELDS)}" for name in unknown
        ) + f"; a config has {', '.join(TOP_LEVEL_FIELDS)}")
    if not isinstance(config.get("model"), str) or not config.model:
        raise ConfigError(f"config.model = {config.get('model')!r}: give a registry name, HF directory or .gguf path")
    if config.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"config.dtype = {config.dtype!r}: must be one of {DTYPES}")
    _check_int(config.get("seed", 0), "config.seed", minimum=None)
    _check_int(config.get("checkpoint_every"), "config.checkpoint_every", minimum=1)
    if not isinstance(config.get("tensorboard", False), bool):
        raise ConfigError(f"config.tensorboard = {config.tensorboard!r}: must be True or False")
    if config.get("tensorboard", False) and not metrics.available():
        raise ConfigError(f"config.tensorboard = True needs tensorboardX, which is not installed: {metrics.INSTALL}, "
                          "or run with --config.tensorboard=False")
    methods = config.get("methods")
    if not isinstance(methods, (tuple, list)) or not methods:
        raise ConfigError(f"config.methods = {methods!r}: give a tuple of methods from {METHODS}")
    wrong = [m for m in methods if m not in METHODS]
    if wrong:
        raise ConfigError(f"config.methods: unknown method(s) {wrong}; available: {METHODS}")
    if len(set(methods)) < len(methods):
        raise ConfigError(f"config.methods = {tuple(methods)} names a method twice")
    lengths = config.get("prompt_lengths")
    if lengths is not None:
        if not isinstance(lengths, (tuple, list)) or not lengths:
            raise ConfigError(f"config.prompt_lengths = {lengths!r}: give a tuple of prompt lengths (at least 1)")
        for i, length in enumerate(lengths):
            _check_int(length, f"config.prompt_lengths[{i}]", minimum=1)
        if len(set(lengths)) < len(lengths):
            raise ConfigError(f"config.prompt_lengths = {tuple(lengths)} repeats a length")
    from distprompt_jax.bounds import BoundConfig
    from distprompt_jax.prompting.hard import HardPromptConfig

    sections = {
        name: section_config(config_class, config.get(name) or ConfigDict(), f"config.{name}")
        for name, config_class in (("soft", SoftPromptConfig), ("prefix", PrefixPromptConfig),
                                   ("hard", HardPromptConfig), ("bound", BoundConfig))
    }
    # The layer count is the model's; any layer checks the section's own fields before it loads.
    sections["final_norm"] = final_norm_config(config, n_layers=0)
    rung = sections["final_norm"]
    if "final_norm" in methods and not (rung.prefix or rung.suffix or rung.bos or rung.template == "chat"):
        raise ConfigError("config.final_norm: the rung runs the model on fixed tokens (their last position's "
                          "final-norm input is what the vector replaces), and none are set: set bos=True, prefix or "
                          "suffix")
    try:
        sections["bound"].validate()
    except ValueError as err:
        raise ConfigError(f"config.bound: {err}") from None
    _check_recipes(config.get("targets"), None if lm is None else lm.vocab_size)
    if lm is not None:
        sections["final_norm"] = final_norm_config(config, lm.n_layers)
        for name in ("soft", "prefix", "final_norm", "hard"):
            if name in methods:
                try:
                    sections[name].validate(lm)
                except ValueError as err:
                    raise ConfigError(f"config.{name}: {err}") from None
        check_target_memory(config, lm.vocab_size)


def _check_int(value, name: str, minimum: int | None) -> None:
    if not field_types.is_int(value):
        raise ConfigError(f"{name} = {value!r}: must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} = {value}: must be at least {minimum}")


def _check_number(value, name: str) -> float:
    if not (field_types.is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r}: must be a finite number")
    return float(value)


def _check_recipes(recipes, vocab_size: int | None) -> None:
    if not isinstance(recipes, ConfigDict) or not recipes:
        raise ConfigError("config.targets has no recipe: add at least one, e.g. config.targets.vanilla")
    for name, recipe in recipes.items():
        where = f"config.targets.{name}"
        if not isinstance(recipe, ConfigDict):
            raise ConfigError(f"{where} must be a ConfigDict recipe, got {recipe!r}")
        kind = recipe.get("kind")
        if kind not in TARGET_KINDS:
            raise ConfigError(f"{where}.kind = {kind!r}; known kinds: {TARGET_KINDS}")
        allowed = RECIPE_FIELDS[kind]
        unknown = sorted(set(recipe.keys()) - {"kind", *allowed})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) " + ", ".join(
                f"{field}{_did_you_mean(field, allowed)}" for field in unknown
            ) + f" for kind={kind!r}, which takes {', '.join(allowed)}")
        if "seed_offset" in recipe:
            _check_int(recipe.seed_offset, f"{where}.seed_offset", minimum=None)
        if kind in ("vanilla", "outlier") and recipe.get("entropies_from"):
            given = sorted({"n", "entropy_min", "entropy_max"} & set(recipe.keys()))
            if given:
                raise ConfigError(f"{where} takes its entropies (and count) from {recipe.entropies_from!r}; "
                                  f"{', '.join(given)} would be ignored: remove them")
        elif kind in ("vanilla", "outlier"):
            _check_entropy_range(recipe, where, vocab_size)
        if kind in ("model", "cross_model"):
            _check_int(recipe.get("n"), f"{where}.n", minimum=1)
        if kind == "outlier":
            _check_int(recipe.get("k"), f"{where}.k", minimum=1)
        if kind == "cross_model" and (not isinstance(recipe.get("source"), str) or not recipe.source):
            raise ConfigError(f"{where}.source: name the model whose distributions are mapped (kind='cross_model')")
        if kind == "file":
            _check_target_file(recipe.get("path"), where)
        if recipe.get("template", "none") not in ("none", "chat"):
            raise ConfigError(f"{where}.template = {recipe.template!r}: must be 'none' or 'chat'")
    recipe_order(recipes)


def _check_entropy_range(recipe, where: str, vocab_size: int | None) -> None:
    _check_int(recipe.get("n"), f"{where}.n", minimum=1)
    for field in ("entropy_min", "entropy_max"):
        if field not in recipe:
            raise ConfigError(f"{where}.{field} is missing (entropy_max < 0 means ln|V|), or give entropies_from")
    low = _check_number(recipe.entropy_min, f"{where}.entropy_min")
    high = _check_number(recipe.entropy_max, f"{where}.entropy_max")
    if low < 0:
        raise ConfigError(f"{where}.entropy_min = {low}: entropies are at least 0")
    if high >= 0 and high < low:
        raise ConfigError(f"{where}.entropy_max = {high} is below entropy_min = {low} (a negative maximum means ln|V|)")
    if vocab_size is not None and max(low, high) > math.log(vocab_size):
        raise ConfigError(f"{where}: entropies up to {max(low, high)} exceed ln|V| = {math.log(vocab_size):.4f}")


def _check_target_file(path, where: str) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{where}.path: give the targets file (.npy, .npz or a saved TargetSet directory)")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{where}.path = {str(path)!r}: no such file or directory")
    if path.is_file() and path.suffix not in (".npy", ".npz"):
        raise ConfigError(f"{where}.path = {str(path)!r}: targets must be a .npy or .npz file or a saved "
                          "TargetSet directory")


def target_bytes(config, vocab_size: int) -> int:
    """Estimated peak bytes of host memory that building the config's targets takes.

    Each recipe's float32 rows (n x |V| x 4 bytes; a file's size on disk; an `entropies_from` recipe as many
    rows as its source) are held once per recipe and once more joined (`TARGET_COPIES`).
    """
    recipes = config.targets
    sizes: dict[str, int] = {}
    for name in recipe_order(recipes):
        recipe = recipes[name]
        if recipe.kind == "file":
            path = Path(recipe.path)
            sizes[name] = (path / PROBS_FILE if path.is_dir() else path).stat().st_size
        elif recipe.kind in ("vanilla", "outlier") and recipe.get("entropies_from"):
            sizes[name] = sizes[recipe.entropies_from]
        else:
            sizes[name] = int(recipe.n) * vocab_size * np.dtype(np.float32).itemsize
    return TARGET_COPIES * sum(sizes.values())


def check_target_memory(config, vocab_size: int, available: int | None = None) -> None:
    """Refuse up front targets that cannot fit in host memory (`available` bytes; default: psutil's
    available memory), instead of a MemoryError after minutes of work."""
    import psutil

    needed = target_bytes(config, vocab_size)
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise ConfigError(
            f"config.targets: the recipes need about {needed / 2**30:.1f} GiB of host memory for their float32 "
            f"probabilities ({vocab_size} tokens each, x{TARGET_COPIES} while they are joined), but "
            f"{available / 2**30:.1f} GiB are available: lower n, or split the run into several workdirs"
        )
