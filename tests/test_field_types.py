"""Every public config dataclass refuses a field of the wrong type at construction, naming it (one shared
check, field_types.check_field_types)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distprompt_jax import BoundConfig, HardPromptConfig, PrefixPromptConfig, SoftPromptConfig
from distprompt_jax.field_types import FieldTypeError, describe
from distprompt_jax.solve import DriverOptions
from distprompt_jax.targets.controlled import SolverOptions

CONFIGS = (SoftPromptConfig, PrefixPromptConfig, HardPromptConfig, BoundConfig, SolverOptions, DriverOptions)


def test_the_issue_example_names_the_field():
    with pytest.raises(TypeError, match=r"^SoftPromptConfig: max_steps must be an int, got '20'$"):
        SoftPromptConfig(max_steps="20")


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_of_every_config_is_checked(config_class):
    """Each field, given a value of no type it takes (a set never is), is refused with its own name; the
    defaults themselves pass."""
    config_class()
    for field in dataclasses.fields(config_class):
        with pytest.raises(FieldTypeError, match=rf"^{config_class.__name__}: {field.name} must be .*, got \{{1\}}$"):
            config_class(**{field.name: {1}})


@pytest.mark.parametrize("make, message", [
    (lambda: SoftPromptConfig(max_steps=True), "max_steps must be an int, got True"),  # a bool is no int
    (lambda: SoftPromptConfig(patience=5.0), "patience must be an int, got 5.0"),
    (lambda: SoftPromptConfig(learning_rate="0.1"), "learning_rate must be a number or None, got '0.1'"),
    (lambda: SoftPromptConfig(intervention_layer=1.5), "intervention_layer must be an int, a string or None, got 1.5"),
    (lambda: HardPromptConfig(prefix=[5, 6]), r"prefix must be a string or a tuple of ints, got \[5, 6\]"),
    (lambda: HardPromptConfig(suffix=(5, "a")), r"suffix must be a string or a tuple of ints, got \(5, 'a'\)"),
    (lambda: PrefixPromptConfig(bos=1), "bos must be a bool, got 1"),
    (lambda: BoundConfig(slots=2.0), "slots must be an int, a string or None, got 2.0"),
    (lambda: SolverOptions(max_steps="10"), "max_steps must be an int, got '10'"),
    (lambda: DriverOptions(progress="yes"), "progress must be a bool, got 'yes'"),
])
def test_wrong_types_are_named(make, message):
    with pytest.raises(FieldTypeError, match=message):
        make()


def test_right_types_pass_unchanged():
    """Ints are numbers; numpy scalars are their Python kinds; a wrong type is also a ValueError (as the
    command line and the experiment's validation catch config errors)."""
    config = SoftPromptConfig(learning_rate=1, max_steps=np.int64(20), warmup=np.float32(0.5), prefix=(1, 2),
                              intervention_layer="final_norm", slots="auto")
    assert config.learning_rate == 1 and config.max_steps == 20
    assert dataclasses.replace(config, max_steps=30).max_steps == 30  # replace checks as construction does
    with pytest.raises(ValueError):
        dataclasses.replace(config, max_steps="30")
    assert describe(int | str | None) == "an int, a string or None"
