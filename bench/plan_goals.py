"""Plans of experiment configs for real-size models on TPU slices, compiled on this machine (BENCHMARKS.md).

    python bench/plan_goals.py --models=llama-3.1-8b --topologies=v5e-256 --configs=entropy_sweep \
        --dtype=bfloat16 --targets=65536 --out=plans.jsonl

For each (config, model, topology): the config from configs/<name>.py with `model`, `dtype`, the vanilla recipe
scaled to `--targets` targets (the configs' own counts are sized for a CPU: a few targets per host would cap the
pools), and the bound's certificate support raised to the model's width where the default is too small
(`BoundConfig.support` must exceed d_model). One JSON line per plan (the CLI's JSON, plus the topology's hosts,
the methods not planned, the wall time and each method's limiting term), and the table `distprompt --plan` prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from distprompt_jax.loading import load_structure
from distprompt_jax.planning import make_plan
from distprompt_jax.planning.report import table
from distprompt_jax.platforms import skip_absent_tpu

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def goal_config(name: str, model: str, dtype: str, targets: int, d_model: int):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model, config.dtype = model, dtype
    if "vanilla" in config.targets:
        config.targets.vanilla.n = targets
    config.bound.support = max(config.bound.support, 1 << d_model.bit_length())
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--topologies", required=True, help="comma-separated topologies (v5e-256, local, ...)")
    parser.add_argument("--configs", default="entropy_sweep", help="comma-separated configs/<name>.py")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--targets", type=int, default=65536, help="vanilla targets (scaled from the config's)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    skip_absent_tpu()
    for name in args.configs.split(","):
        for model in args.models.split(","):
            lm = load_structure(model, dtype=args.dtype)
            config = goal_config(name, model, args.dtype, args.targets, lm.d_model)
            for topology in args.topologies.split(","):
                started = time.perf_counter()
                plan = make_plan(config, topology, lm=lm)
                seconds = time.perf_counter() - started
                print(f"\n== {name}, {model}, {topology} ({seconds:.0f} s)\n{table(plan)}", flush=True)
                record = plan.to_json() | {
                    "config": name, "hosts": plan.hosts, "unplanned": list(plan.unplanned), "wall_s": round(seconds),
                    "limited_by": {label: m.limited_by for label, m in plan.methods.items()},
                    "bytes_per_step": {label: m.cost.bytes_accessed for label, m in plan.methods.items()},
                    "advice": {label: m.advice for label, m in plan.methods.items() if m.advice},
                }
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
