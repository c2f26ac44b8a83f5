"""Finding 1 at pod scale: 65,536 vanilla targets over entropy 0..ln|V| on Llama-3.1-8B, bound + soft + hard.

For a v5e-256 (64 hosts of 4 chips). Plan it first (no TPU needed; nothing is written):

    distprompt --config=configs/pod_entropy_sweep.py --plan=v5e-256

bfloat16 weights (16 GB) do not fit a 16 GiB v5e chip replicated, so every method shards them over its host's
4 chips (shard_params). The slot counts are per host, as the plan found them (BENCHMARKS.md, "Plans"): soft
prompts 432 (27,648 on the slice, 13.9 GiB per chip), the bound 1024 (every target of a host at once). Hard
prompts are not planned yet (the plan says so and exits non-zero): their pool is the accelerator default. The
certificate's support is raised above the model's width (4096; the default 2048 is refused for it). Then, on
every worker, with a workdir all workers share:

    launch/tpu_pod.sh configs/pod_entropy_sweep.py /mnt/shared/runs/pod_entropy

The weights come from the hub id meta-llama/Llama-3.1-8B (a gated repository: accept its license and log in
with `huggingface-cli login` on every worker), or set model to a local HF directory of them.
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config("llama-3.1-8b")
    config.dtype = "bfloat16"
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=65536, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("bound", "soft", "hard")
    config.bound.support = 8192
    config.bound.slots = 1024
    config.soft.slots = 432
    for method in ("bound", "soft", "hard"):
        config[method].shard_params = True
    return config
