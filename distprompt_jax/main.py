"""distprompt: run a distribution-prompting experiment, or check a model.

    distprompt --config=configs/quickstart.py --workdir=runs/quick [--config.prefix.max_steps=300 ...]
        runs (or resumes) an experiment and writes its results and report into the workdir; any config field
        can be overridden with --config.<section>.<field>=value;
    distprompt --config=configs/entropy_sweep.py --plan=v5e-256 [--plan_json=plan.json]
        plans the experiment without running it: every method's programs compiled for a TPU slice (or
        `local`) on abstract weights, per-chip memory, slots, flops per step and a projected rate;
    distprompt --prompt="The capital of France is" [--model=...]
        prints a model's next-token distribution: a quick end-to-end check of an install.

`distprompt-report --workdir=DIR` (re)writes the report of a run; --helpfull lists every flag, absl's too.
"""

from __future__ import annotations

import difflib
import sys
import traceback
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from distprompt_jax.checkpoints import registry
from distprompt_jax.files import os_error_message

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the experiment's files (resumed if it exists).")
_MODEL = flags.DEFINE_string(
    "model", registry.DEFAULT_MODEL,
    "Registry name, HF model directory, .gguf path, hub id, or shape-only name (llama-3.1-8b, ...).",
)
_PLAN = flags.DEFINE_string(
    "plan", None,
    "With --config: plan the run for a TPU slice (v5e-256, v5p-128, v6e-8, 2xv5e-256, ...) or 'local' instead of "
    "running it; writes nothing into --workdir.",
)
_PLAN_JSON = flags.DEFINE_string("plan_json", None, "With --plan: also write the plan as JSON to this file.")
_PROMPT = flags.DEFINE_string("prompt", None, "Without --config: text whose next token to predict.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "How many of the most likely next tokens to print.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host: call jax.distributed.initialize() first. TPU pods and SLURM are detected; elsewhere give "
    "--coordinator_address, --num_processes and --process_id.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True,
    "Keep compiled programs on disk so a rerun or resume does not compile again (JAX's persistent cache).",
)
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Where the compilation cache lives (default: $DISTPROMPT_JAX_COMPILATION_CACHE, else under the model cache).",
)


def next_token_report(lm, prompt: str, top_k: int) -> str:
    ids = lm.encode(prompt)
    logits = jax.jit(lm.logits)(lm.params, lm.embed(lm.params, ids))
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    probs = np.exp(log_probs)
    entropy = -np.sum(probs * log_probs)
    lines = [
        f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, vocabulary {lm.vocab_size}",
        f"prompt {prompt!r} -> {len(ids)} tokens {ids.tolist()}",
        f"next-token entropy {entropy:.4f} nats; top {top_k}:",
    ]
    for token in np.argsort(-probs)[:top_k]:
        lines.append(f"  {probs[token]:8.4f}  {lm.tokenizer.decode([int(token)])!r}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Our status lines (a model fetched or converted, a finished run) are INFO; other libraries' INFO (JAX's
        # backend probing, orbax's checkpoints) stays hidden unless --verbosity asks for it.
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(_own_or_warning)
    try:
        if _COMPILATION_CACHE.value and _PLAN.value is None:  # a plan's compile-only programs are never run or kept
            from distprompt_jax import compilation_cache

            compilation_cache.enable(_COMPILATION_CACHE_DIR.value)
        if _DISTRIBUTED.value:
            # Cross-process collectives on CPU devices (a CPU-only cluster) go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        if _PLAN.value is not None:
            plan_experiment(_CONFIG.value, _PLAN.value, _PLAN_JSON.value)
        elif _CONFIG.value is not None:
            run_experiment(_CONFIG.value, _WORKDIR.value)
        elif _PROMPT.value is not None:
            from distprompt_jax import load_model

            lm = load_model(_MODEL.value, dtype=_DTYPE.value)
            print(next_token_report(lm, _PROMPT.value, _TOP_K.value))
        else:
            raise app.UsageError("give --config and --workdir to run an experiment, or --prompt to check a model")
    except KeyboardInterrupt:
        # Everything a run keeps is written atomically or checkpointed: the same command goes on from there.
        print("distprompt: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        sys.exit(f"distprompt: {os_error_message(err)}")
    except (ValueError, KeyError, RuntimeError) as err:
        sys.exit(f"distprompt: {err}")


def _own_or_warning(record) -> bool:
    """A log record to show by default: a warning or worse, or a line of this package's."""
    return record.levelno >= logging.WARNING or Path(record.pathname).resolve().is_relative_to(_PACKAGE_DIR)


_PACKAGE_DIR = Path(__file__).resolve().parent


def plan_experiment(config, topology: str, json_path: str | None):
    """Print the plan of `config` on `topology` (and write its JSON); exit non-zero, saying why, where it does not
    fit. Nothing is written anywhere else."""
    if config is None:
        raise app.UsageError("--plan needs --config: the experiment to plan")
    import json

    from distprompt_jax.planning import make_plan, report

    plan = make_plan(config, topology)
    print(report.table(plan))
    if json_path:
        Path(json_path).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    failing = [m.label for m in plan.methods.values() if not m.fits]
    if failing:
        sys.exit(f"distprompt: the plan does not fit {topology}: {', '.join(failing)} (see above)")
    if plan.unplanned:
        sys.exit(f"distprompt: the plan is incomplete: {', '.join(plan.unplanned)} not planned yet (see above)")


def run_experiment(config, workdir: str | None):
    if not workdir:
        raise app.UsageError("--workdir is required with --config")
    from distprompt_jax import experiment

    # Everything checkable without the model, before the workdir is claimed or the model loads.
    experiment.validate(config)
    from distprompt_jax import report, sweep

    sweep.run(config, workdir)
    if jax.process_index() == 0:
        print(f"report: {report.write_report(workdir)}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-paragraph message instead of a traceback when the --config file
    fails to load or an override names a field the config does not have."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # whatever the user's config file raised, or absl's own flags.Error
        sys.exit(f"distprompt: {config_error_message(err, argv)}")


def config_error_message(err: BaseException, argv: list[str]) -> str:
    """What went wrong while parsing the command line, said in terms of the user's config file and flags."""
    path = _config_path(argv)
    chain = [err]
    while chain[-1].__context__ is not None:  # absl and ml_collections re-raise the config file's error
        chain.append(chain[-1].__context__)
    for origin in chain:
        if isinstance(origin, SyntaxError):
            line = f"\n    {origin.text.rstrip()}" if origin.text else ""
            return f"the config file {origin.filename} has a syntax error at line {origin.lineno}: {origin.msg}{line}"
    if path is None:
        return str(err)
    for origin in reversed(chain):
        in_file = [frame for frame in traceback.extract_tb(origin.__traceback__)
                   if Path(frame.filename).resolve() == Path(path).resolve()]
        if in_file:
            return (f"the config file {path} failed at line {in_file[-1].lineno} ({in_file[-1].line}): "
                    f"{type(origin).__name__}: {origin}")
    if any(isinstance(origin, (AttributeError, KeyError)) for origin in chain):
        unknown = unknown_override(path, argv)
        if unknown:
            return unknown
    return str(err)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def unknown_override(path: str, argv: list[str]) -> str | None:
    """The first `--config.a.b=...` override naming a field that the config file's config lacks, described."""
    from ml_collections import ConfigDict
    from ml_collections.config_flags import config_flags

    config = config_flags.ConfigFileFlagParser("config").parse(path)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = config, "config"
        for key in arg.removeprefix("--").split("=", 1)[0].split(".")[1:]:
            if not isinstance(node, ConfigDict):
                break
            if key not in node:
                close = difflib.get_close_matches(key, list(node.keys()), n=1)
                hint = f" (did you mean {walked}.{close[0]}?)" if close else f"; it has {', '.join(node.keys())}"
                return f"{arg}: {walked} has no field {key!r}{hint}"
            node, walked = node[key], f"{walked}.{key}"
    return None


def run():
    from distprompt_jax.flag_help import show_in_help

    # Every flag this module defines, and the config file's (defined by ml_collections, so not among them).
    ours = [flag.name for flag in flags.FLAGS.get_flags_for_module(__name__)]
    show_in_help(__doc__, [*ours, _CONFIG.name])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
