"""Experiment configs: every field of every section round-trips (defaults, config files, command line);
`validate` refuses, by name, what cannot run, before any model loads; the CLI says so without a traceback."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from distprompt_jax import experiment
from distprompt_jax.bounds import BoundConfig
from distprompt_jax.experiment import ConfigError, base_config, section_config, section_defaults, validate
from distprompt_jax.prompting.hard import HardPromptConfig
from distprompt_jax.prompting.prefix import PrefixPromptConfig
from distprompt_jax.prompting.soft import SoftPromptConfig

ROOT = Path(__file__).parent.parent
SECTIONS = {"soft": SoftPromptConfig, "hard": HardPromptConfig, "bound": BoundConfig}
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))
# What each shipped config file changes from the section defaults (a new file needs an entry here).
EXPECTED_SECTIONS = {
    "cross_tokenizer": {"soft": dict(max_steps=200)},
    "entropy_sweep": {"soft": dict(max_steps=200), "hard": dict(max_steps=40)},
    "ladder": {"soft": dict(max_steps=200, suffix="\n"), "hard": dict(max_steps=40, suffix="\n"),
               "prefix": dict(max_steps=200, suffix="\n"), "final_norm": dict(suffix="\n", bos=False)},
    "lm_targets": {"soft": dict(max_steps=200)},
    "outliers": {"soft": dict(max_steps=200)},
    "pod_entropy_sweep": {"soft": dict(slots=432, shard_params=True), "hard": dict(shard_params=True),
                          "bound": dict(support=8192, slots=1024, shard_params=True)},
    "prompt_length": {"soft": dict(max_steps=150)},
    "quickstart": {"prefix": dict(max_steps=150)},
}


def examples(hint, default) -> list:
    """Values unlike `default` of every alternative the type hint allows."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    values = []
    for member in members:
        if member is type(None):
            if default is not None:
                values.append(None)
        elif member is bool:
            values.append(not default)
        elif member is int:
            values.append(default + 3 if isinstance(default, int) else 3)
        elif member is float:
            values.append(0.375 if default != 0.375 else 0.5)
        elif member is str:
            values.append("hello world")
        elif typing.get_origin(member) is tuple and typing.get_args(member)[1:] == (Ellipsis,):
            values.append((3, 4))
        else:
            pytest.fail(f"no example value for the config type {member!r}: add one to this test")
    return values


def field_cases():
    for section, config_class in SECTIONS.items():
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            for value in examples(hints[field.name], field.default):
                yield pytest.param(section, field.name, value, id=f"{section}.{field.name}={value!r}")


def as_flag(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def parse_command_line(monkeypatch, config: ConfigDict, *overrides: str) -> ConfigDict:
    """The config after ml_collections applies `--config.<path>=<value>` overrides, as `distprompt` does."""
    argv = ["distprompt", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=values)
    values(argv)
    return values.config


def load_config_file(monkeypatch, path: Path, *overrides: str) -> ConfigDict:
    argv = ["distprompt", f"--config={path}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(argv)
    return values.config


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_defaults_round_trip(section):
    config_class = SECTIONS[section]
    defaults = section_defaults(config_class)
    assert section_config(config_class, defaults, f"config.{section}") == config_class()
    # Optional fields stay None (not 0 or ""), and what sweep writes to config.json reads back equal.
    assert ConfigDict(defaults.to_dict()).to_dict() == defaults.to_dict()
    for field in dataclasses.fields(config_class):
        assert defaults[field.name] == field.default


@pytest.mark.parametrize(("section", "name", "value"), list(field_cases()))
def test_every_field_overrides_from_the_command_line_and_config_files(monkeypatch, section, name, value):
    config_class = SECTIONS[section]
    expected = dataclasses.replace(config_class(), **{name: value})
    parsed = parse_command_line(monkeypatch, base_config(), f"--config.{section}.{name}={as_flag(value)}")
    assert section_config(config_class, parsed[section], section) == expected
    in_file = base_config()
    in_file[section][name] = value  # what a configs/*.py file does
    assert section_config(config_class, in_file[section], section) == expected


def test_union_fields_take_each_of_their_types(monkeypatch):
    parsed = parse_command_line(
        monkeypatch, base_config(), "--config.soft.prefix=5", "--config.soft.intervention_layer=final_norm",
        "--config.hard.init=repeat", "--config.hard.init_token=7",
        "--config.hard.suffix=(1, 2)", "--config.hard.candidate_block=None",
    )
    soft, hard = experiment.soft_config(parsed), experiment.hard_config(parsed)
    assert soft.prefix == "5" and soft.intervention_layer == "final_norm"  # "5" is text where no int is allowed
    assert hard.init_token == 7 and hard.suffix == (1, 2) and hard.candidate_block is None
    config = base_config()
    config.soft.prefix = [4, 5]  # a list of ids, as a config file may write it
    assert experiment.soft_config(config).prefix == (4, 5)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_shipped_config_converts_and_validates(monkeypatch, path):
    assert path.stem in EXPECTED_SECTIONS, f"add {path.name} to EXPECTED_SECTIONS"
    config = load_config_file(monkeypatch, path, "--config.soft.seed=5", "--config.bound.host_threads=2")
    validate(config)
    changes = EXPECTED_SECTIONS[path.stem]
    assert experiment.soft_config(config) == SoftPromptConfig(**changes.get("soft", {}), seed=5)
    assert experiment.hard_config(config) == HardPromptConfig(**changes.get("hard", {}))
    assert experiment.prefix_config(config) == PrefixPromptConfig(**changes.get("prefix", {}))
    assert experiment.final_norm_config(config, n_layers=30) == final_norm_rung(30, **changes.get("final_norm", {}))
    assert experiment.bound_config(config) == BoundConfig(**changes.get("bound", {}), host_threads=2)


def final_norm_rung(n_layers: int, **changes) -> SoftPromptConfig:
    """The final-norm rung's config at the section defaults (its recipe, bos=True) with `changes`."""
    return SoftPromptConfig(**{"bos": True, **experiment.FINAL_NORM_RECIPE, **changes}, intervention_layer=n_layers,
                            intervention_mode="replace")


def test_the_final_norm_section_fixes_its_intervention_and_refuses_fields_that_would_change_it(monkeypatch):
    config = quick_config()
    config.methods = ("bound", "final_norm")
    validate(config)
    assert experiment.final_norm_config(config, n_layers=3) == final_norm_rung(3)
    parsed = parse_command_line(monkeypatch, quick_config(), "--config.final_norm.learning_rate=0.1",
                                "--config.final_norm.suffix=(4, 5)", "--config.final_norm.bos=false")
    assert experiment.final_norm_config(parsed, n_layers=3) == final_norm_rung(3, learning_rate=0.1, suffix=(4, 5),
                                                                              bos=False)
    for name in experiment.FINAL_NORM_FIXED:
        wrong = ConfigDict(config.to_dict())
        wrong.final_norm[name] = 1
        with pytest.raises(ConfigError, match=rf"config\.final_norm\.{name}: the final-norm rung sets"):
            validate(wrong)
    # The engine runs the model on fixed tokens: none is refused, where the rung runs.
    config.final_norm.bos = False
    with pytest.raises(ConfigError, match=r"config\.final_norm: .* none are set: set bos=True"):
        validate(config)
    config.methods = ("bound", "soft")
    validate(config)


def test_unknown_fields_are_refused_by_name():
    config = base_config()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=4, entropy_min=0.0, entropy_max=-1.0))
    with pytest.raises(ConfigError, match=r"config\.soft\.max_stepz \(did you mean max_steps\?\)"):
        section_config(SoftPromptConfig, ConfigDict(dict(max_stepz=3)), "config.soft")
    wrong = ConfigDict(config.to_dict())
    wrong.checkpoint_evry = 2
    with pytest.raises(ConfigError, match=r"config\.checkpoint_evry \(did you mean checkpoint_every\?\)"):
        validate(wrong)
    wrong = ConfigDict(config.to_dict())
    wrong.targets.vanilla.entropy_mx = 3.0
    with pytest.raises(ConfigError, match=r"config\.targets\.vanilla: unknown field\(s\) entropy_mx \(did you mean"):
        validate(wrong)


@pytest.mark.parametrize(("field", "value"), [("soft.learning_rate", "inf"), ("soft.min_delta", "nan"),
                                              ("hard.min_delta", "-inf"), ("bound.tolerance", "inf"),
                                              ("soft.clip_norm", "inf")])
def test_non_finite_floats_are_refused_naming_the_field(monkeypatch, field, value):
    config = parse_command_line(monkeypatch, quick_config(), f"--config.{field}={value}")
    with pytest.raises(ConfigError, match=rf"config\.{field} = \S+: must be a finite number"):
        validate(config)


def test_values_of_the_wrong_type_are_refused_naming_the_field():
    config = quick_config()
    config.soft.intervention_layer = 1.5
    expected = r"config\.soft\.intervention_layer = 1\.5: expected an int, a string or None"
    with pytest.raises(ConfigError, match=expected):
        validate(config)
    config = quick_config()
    config.hard.prefix = (1, "a")
    with pytest.raises(ConfigError, match=r"config\.hard\.prefix = \(1, 'a'\): expected a string or a tuple of ints"):
        validate(config)


def quick_config() -> ConfigDict:
    config = base_config()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=4, entropy_min=0.0, entropy_max=-1.0))
    return config


def with_changes(**changes) -> ConfigDict:
    config = quick_config().to_dict()
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return ConfigDict(config)


DELETE = object()


@pytest.mark.parametrize(("changes", "message"), [
    (dict(checkpoint_every=0), r"config\.checkpoint_every = 0: must be at least 1"),
    (dict(checkpoint_every=1.5), r"config\.checkpoint_every = 1\.5: must be an integer"),
    (dict(methods=("soft", "gcg")), r"unknown method\(s\) \['gcg'\]"),
    (dict(methods=("soft", "soft")), "names a method twice"),
    (dict(methods=()), "config.methods"),
    (dict(dtype="float16"), r"config\.dtype = 'float16'"),
    (dict(model=""), "config.model"),
    (dict(prompt_lengths=(1, 0)), r"config\.prompt_lengths\[1\] = 0: must be at least 1"),
    (dict(targets=ConfigDict()), "config.targets has no recipe"),
    (dict(targets__vanilla__kind="random"), r"config\.targets\.vanilla\.kind = 'random'; known kinds"),
    (dict(targets__vanilla__n=1e6), r"config\.targets\.vanilla\.n = 1000000\.0: must be an integer"),
    (dict(targets__vanilla__n=0), r"config\.targets\.vanilla\.n = 0: must be at least 1"),
    (dict(targets__vanilla__entropy_min=DELETE), r"config\.targets\.vanilla\.entropy_min is missing"),
    (dict(targets__vanilla__entropy_min=float("nan")), r"entropy_min = nan: must be a finite number"),
    (dict(targets__vanilla__entropy_min=-1.0), "entropies are at least 0"),
    (dict(targets__vanilla__entropy_min=3.0, targets__vanilla__entropy_max=2.0), "is below entropy_min"),
    (dict(targets__paired=dict(kind="vanilla", entropies_from="nothing")), "names no recipe"),
    (dict(targets__paired=dict(kind="vanilla", entropies_from="vanilla", n=3)), r"n would be ignored"),
    (dict(targets__vanilla=dict(kind="vanilla", entropies_from="vanilla")), "cycle"),
    (dict(targets__out=dict(kind="outlier", n=2, entropy_min=2.0, entropy_max=3.0)), r"outlier\.k|out\.k"),
    (dict(targets__gen=dict(kind="model")), r"config\.targets\.gen\.n = None: must be an integer"),
    (dict(targets__x=dict(kind="cross_model", n=2)), r"config\.targets\.x\.source"),
    (dict(targets__f=dict(kind="file", path="/nonexistent/targets.npy")), "no such file or directory"),
    (dict(bound__max_gap=1e-9), r"config\.bound: BoundConfig: gap_tolerance"),
])
def test_validate_refuses_what_cannot_run(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(with_changes(**changes))


def test_validate_refuses_a_target_file_that_is_not_an_array_file(tmp_path):
    (tmp_path / "targets.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ConfigError, match=r"targets\.pkl'?: targets must be a \.npy or \.npz file"):
        validate(with_changes(targets__f=dict(kind="file", path=str(tmp_path / "targets.pkl"))))


def test_target_memory_is_refused_up_front():
    config = with_changes(targets__vanilla__n=1_000_000)
    assert experiment.target_bytes(config, 49152) == 2 * 1_000_000 * 49152 * 4
    with pytest.raises(ConfigError, match=r"need about 366\.2 GiB .* but 8\.0 GiB are available: lower n"):
        experiment.check_target_memory(config, 49152, available=8 * 2**30)
    experiment.check_target_memory(quick_config(), 49152, available=8 * 2**30)
    paired = with_changes(targets__paired=dict(kind="vanilla", entropies_from="vanilla"))
    assert experiment.target_bytes(paired, 100) == 2 * 2 * 4 * 100 * 4


def test_validate_with_the_model_and_build_targets_refuse_before_work(tiny_hf_dir):
    from distprompt_jax import load_model

    lm = load_model(tiny_hf_dir("llama")[1])
    validate(quick_config(), lm)
    with pytest.raises(ConfigError, match=r"config\.final_norm: SoftPromptConfig: init='bank'"):
        validate(with_changes(methods=("final_norm",), final_norm__init="bank"), lm)
    with pytest.raises(ConfigError, match=r"config\.soft: SoftPromptConfig: top_k=1000 exceeds the vocabulary"):
        validate(with_changes(soft__top_k=1000), lm)
    with pytest.raises(ConfigError, match=r"exceed ln\|V\|"):
        validate(with_changes(targets__vanilla__entropy_max=50.0), lm)
    # 10^12 targets: refused from the estimate, not after trying to allocate them.
    with pytest.raises(ConfigError, match="GiB of host memory"):
        experiment.build_targets(with_changes(targets__vanilla__n=10**12), lm)
    assert np.isfinite(experiment.target_bytes(quick_config(), lm.vocab_size))


def distprompt(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "distprompt_jax.main", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_cli_says_what_is_wrong_without_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    # A model path that does not exist: every refusal below happens before any model would load.
    quick = [f"--config={ROOT / 'configs' / 'quickstart.py'}", f"--workdir={workdir}",
             f"--config.model={tmp_path / 'no-model'}"]
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    typed = tmp_path / "typed.py"
    typed.write_text("from distprompt_jax.experiment import base_config\n\ndef get_config():\n"
                     "    config = base_config()\n    config.soft.max_steps = 'many'\n    return config\n")
    for args, message in [
        ((*quick, "--config.soft.max_stepz=3"),
         "--config.soft.max_stepz=3: config.soft has no field 'max_stepz' (did you mean config.soft.max_steps?)"),
        ((f"--config={broken}", f"--workdir={workdir}"), f"the config file {broken} has a syntax error at line 1"),
        ((f"--config={typed}", f"--workdir={workdir}"), f"the config file {typed} failed at line 5"),
        ((*quick, "--config.checkpoint_every=0"), "config.checkpoint_every = 0: must be at least 1"),
        ((*quick, "--config.soft.learning_rate=inf"), "config.soft.learning_rate = inf: must be a finite number"),
    ]:
        result = distprompt(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not workdir.exists()  # nothing was claimed
