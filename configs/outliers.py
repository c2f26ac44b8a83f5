"""Finding 2: at equal entropy, targets with outlier tokens are easier than vanilla ones.

32 outlier targets (k = 10 tokens holding nearly the most mass possible at their entropy) and 32 vanilla
targets at exactly the same entropies (paired; the report runs a Wilcoxon signed-rank test). At most 13
minutes on a 2-core CPU; on a GPU raise both n (keep them paired: vanilla takes the outliers' entropies).
"""

from ml_collections import ConfigDict

from distprompt_jax.experiment import base_config


def get_config() -> ConfigDict:
    config = base_config()
    # Entropies where k = 10 outliers can stand out (below ln 10 they would hold all the mass anyway).
    config.targets.outlier = ConfigDict(dict(kind="outlier", n=32, k=10, entropy_min=2.5, entropy_max=10.0))
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", entropies_from="outlier", seed_offset=10_000))
    config.soft.max_steps = 200
    return config
