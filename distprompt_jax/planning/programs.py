"""The problems a run of a config executes, built from a model without weights, and each target's inputs as shapes.

A method's problem is built by the same builder its Method uses (SoftProblem.build, BoundProblem.build, ...), so
the driver compiles the same programs a run does. What a builder would measure on the weights enters the program
as a constant, never as a shape: a plan passes a stand-in (`STAND_IN_SCALE`). A model without a tokenizer (a
shape-only name) has its fixed text counted as one token per UTF-8 byte: never fewer tokens than a real
tokenizer gives, so the plan errs large.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from distprompt_jax import experiment
from distprompt_jax.lm import LanguageModel
from distprompt_jax.solve import Problem

# The embedding std / key-value spread a problem would measure on the weights: any positive value compiles to
# the same program shapes and costs.
STAND_IN_SCALE = 1.0
PLANNED_METHODS = ("bound", "bound_norm", "soft", "prefix", "final_norm")


@dataclasses.dataclass(frozen=True)
class MethodProgram:
    """One method run of a config, as the plan compiles it."""

    label: str  # as the sweep names it: "soft", "soft-L5", ...
    # lm -> (the problem, one target's inputs as ShapeDtypeStructs): called with the plan's model, and with
    # one- and zero-layer versions of it to count what a step costs per layer.
    build: Callable[[LanguageModel], tuple[Problem, dict]]
    shard_params: bool  # the config's choice (the plan may choose otherwise where the weights do not fit)
    slots: int | str | None  # the config's `slots`


class ByteTokenizer:
    """A stand-in tokenizer for models known by their shapes alone: one token per UTF-8 byte, no special tokens
    and no chat template (a plan counts fixed text with it; see the module docstring)."""

    all_special_ids: list = []
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def with_stand_in_tokenizer(lm: LanguageModel) -> LanguageModel:
    return lm if lm.tokenizer is not None else dataclasses.replace(lm, tokenizer=ByteTokenizer(lm.vocab_size))


def _shape(shape: tuple, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def unplanned_methods(config) -> tuple[str, ...]:
    """The methods of `config` plans do not cover yet."""
    return tuple(m for m in config.methods if m not in PLANNED_METHODS)


def method_programs(config, lm: LanguageModel) -> list[MethodProgram]:
    """Every method run of `config` that plans cover (`PLANNED_METHODS`; bounds first, one per prompt length), in
    the order a run takes them."""
    from distprompt_jax.bounds.problems import BoundProblem, NormProblem
    from distprompt_jax.prompting.prefix import PrefixProblem
    from distprompt_jax.prompting.soft import SoftProblem

    experiment.validate(config)
    lm = with_stand_in_tokenizer(lm)
    programs = []
    for method in experiment.run_order(config.methods):
        if method not in PLANNED_METHODS:
            continue
        if method in experiment.BOUND_METHODS:
            bound = experiment.bound_config(config)
            bound.validate(lm)
            if method == "bound":
                def build(model, bound=bound):
                    start = {"h0": _shape((model.d_model,), np.float32)} if bound.init != "zeros" else {}
                    return BoundProblem.build(model, bound), {"p": _shape((model.vocab_size,), np.float32)} | start
            else:
                def build(model, bound=bound):
                    inputs = {"p": _shape((model.vocab_size,), np.float32), "u0": _shape((model.d_model,), np.float32)}
                    return NormProblem.build(model, bound), inputs
            programs.append(MethodProgram(method, build, bound.shard_params, bound.slots))
        elif method == "final_norm":
            section = experiment.final_norm_config(config, lm.n_layers)
            section.validate(lm)

            def build(model):  # the rung's intervention layer is the model's depth: rebuilt per model
                rung = experiment.final_norm_config(config, model.n_layers)
                return SoftProblem.build(model, rung, embed_std=STAND_IN_SCALE), _target_inputs(model)
            programs.append(MethodProgram(method, build, section.shard_params, section.slots))
        else:
            base = experiment.soft_config(config) if method == "soft" else experiment.prefix_config(config)
            lengths = tuple(config.get("prompt_lengths") or ())
            variants = ([(f"{method}-L{n}", dataclasses.replace(base, prompt_len=n)) for n in lengths]
                        or [(method, base)])
            for label, section in variants:
                section.validate(lm)
                if method == "soft":
                    def build(model, section=section):
                        inputs = _target_inputs(model)
                        if section.init == "bank":
                            inputs["init_ids"] = _shape((section.prompt_len,), np.int32)
                        return SoftProblem.build(model, section, embed_std=STAND_IN_SCALE), inputs
                else:
                    def build(model, section=section):
                        scale = np.full((2, model.n_layers), STAND_IN_SCALE, np.float32)
                        return PrefixProblem.build(model, section, kv_scale=scale), _target_inputs(model)
                programs.append(MethodProgram(label, build, section.shard_params, section.slots))
    return programs


def config_section(label: str) -> str:
    """The config section a method run reads: "soft-L5" -> soft, "bound_norm" -> bound (BoundConfig serves both)."""
    method = label.split("-L")[0]
    return "bound" if method == "bound_norm" else method


def _target_inputs(lm: LanguageModel) -> dict:
    return {"p": _shape((lm.vocab_size,), np.float32)}


def target_count(config, vocab_size: int) -> int:
    """How many targets the config's recipes make (a file recipe: the rows of its file)."""
    from distprompt_jax.targets import load_targets

    counts: dict[str, int] = {}
    recipes = config.targets
    for name in experiment.recipe_order(recipes):
        recipe = recipes[name]
        if recipe.kind == "file":
            counts[name] = len(load_targets(recipe.path, vocab_size))
        elif recipe.get("entropies_from"):
            counts[name] = counts[recipe.entropies_from]
        else:
            counts[name] = int(recipe.n)
    return sum(counts.values())
