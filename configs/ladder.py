"""The expressivity ladder: every rung on the same targets, from the smallest reachable set to the largest.

    hard tokens ⊂ soft prompts ⊂ prefixes (keys/values at every layer) ⊂ any final-norm output ⊂ any hidden vector
    so, up to search error,  hard ≥ soft ≥ prefix ≥ final_norm ≥ bound_norm ≥ bound  (KL per target)

final_norm is one free vector replacing the final norm's input (see experiment.FINAL_NORM_INTERVENTION_MODE);
bound_norm searches the same set by L-BFGS; bound is the certified floor over every hidden vector. Every prompt
rung reads the next token after the same fixed token (`READ_AFTER`, a newline), so the sets nest exactly: a hard
prompt is a soft prompt of token embeddings, and a soft prompt's keys and values are a prefix. The report draws
KL against entropy per rung, the gap between neighbouring rungs per target kind and entropy band, and counts the
rung inversions (a smaller set beating a larger one: the larger one's search failed).

Targets: 16 vanilla over entropy 0..ln|V|, 8 with k = 10 outliers, 8 of SmolLM2's own next-token
distributions, 8 of Gemma-3-270M's mapped onto SmolLM2's vocabulary — 40 in all. 22 minutes on an idle
2-core CPU with SmolLM2-135M (hard prompts take 12 of them, soft prompts 4; BENCHMARKS.md).

    distprompt --config=configs/ladder.py --workdir=runs/ladder

On a GPU, scale the targets and give every search its default budget: targets.vanilla.n=1024,
targets.outlier.n=256, targets.model.n=256, targets.gemma.n=256, soft.max_steps=500, prefix.max_steps=500,
hard.max_steps=200 (slots default to 1024 on an accelerator; "auto" sizes them to memory).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config

# The fixed token every prompt rung reads the next-token distribution after.
READ_AFTER = "\n"
PROMPT_RUNGS = ("hard", "soft", "prefix", "final_norm")


def get_config() -> ConfigDict:
    config = base_config()
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=16, entropy_min=0.0, entropy_max=-1.0))
    config.targets.outlier = ConfigDict(dict(kind="outlier", n=8, k=10, entropy_min=2.5, entropy_max=10.0))
    config.targets.model = ConfigDict(dict(kind="model", n=8))
    config.targets.gemma = ConfigDict(dict(kind="cross_model", source="gemma3-270m", n=8))
    config.methods = ("bound", "bound_norm", "final_norm", "prefix", "soft", "hard")
    for rung in PROMPT_RUNGS:
        config[rung].suffix = READ_AFTER
    # The final-norm rung's vector replaces what the model computes after the newline: no BOS needed before it.
    config.final_norm.bos = False
    # An equal step budget for the prompt rungs, so their differences are the sets', not the budgets'. The
    # final-norm rung keeps its own recipe (experiment.FINAL_NORM_RECIPE: 1000 steps, each ~1/50 of a soft
    # step's cost): at 200 steps of the soft recipe it ended above the prefix rung on 38 of these 40 targets.
    for rung in ("soft", "prefix"):
        config[rung].max_steps = 200
    config.hard.max_steps = 40
    return config
