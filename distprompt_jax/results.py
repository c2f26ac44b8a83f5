"""What a prompting method returns: one table row per target, plus per-target arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass
class PromptResults:
    """Results of one method on a target set.

    `columns`: one scalar (or string) per target, in target order — at least `kl`, `steps`, `prompt_len`.
    `arrays`: one array per target, stacked on the first axis (soft prompt vectors, token ids, KL paths).
    `metadata`: the target set's metadata, one row per target.
    `run_info`: what the run was beside its rows (the model's name and attention shape, the fixed tokens
    around the prompt, the config), as the prompt engines record it; empty where none was recorded.
    """

    method: str
    columns: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]
    metadata: pd.DataFrame
    run_info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.metadata)
        for name, values in {**self.columns, **self.arrays}.items():
            if len(values) != n:
                raise ValueError(f"result {name!r} has {len(values)} rows for {n} targets")

    def __len__(self) -> int:
        return len(self.metadata)

    def to_pandas(self) -> pd.DataFrame:
        """One row per target: `target_id, method, ...` then the metadata columns."""
        table = pd.DataFrame({"target_id": self.metadata["target_id"].to_numpy(), "method": self.method})
        for name, values in self.columns.items():
            table[name] = np.asarray(values)
        extra = self.metadata.drop(columns=[c for c in self.metadata.columns if c in table.columns])
        return pd.concat([table, extra.reset_index(drop=True)], axis=1)

    def save_peft(self, directory, target_ids=None, overwrite: bool = False) -> list:
        """PEFT adapters of the found prompts (soft: PROMPT_TUNING, prefix: PREFIX_TUNING) that
        `peft.PeftModel.from_pretrained(model, path)` loads: with one target (an int, or a result of one
        target), `directory` itself; with several (default: all), `directory/target_<id>` each. Target ids
        are integers. A `directory` holding anything but an earlier export is refused unless `overwrite`.
        Returns the adapter directories. See `distprompt_jax.prompting.peft_export`."""
        from distprompt_jax.prompting.peft_export import save_peft

        return save_peft(self, directory, target_ids, overwrite=overwrite)


# (bound method, its KL column, the gap column) joined beside every row by `with_bound_columns`.
BOUND_COLUMNS = (("bound", "kl_bound", "gap_to_bound"), ("bound_norm", "kl_bound_norm", "gap_to_norm_bound"))


def with_bound_columns(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (rows of several methods on the same targets, as `PromptResults.to_pandas()` concatenated)
    with each target's certified bound beside every row: `kl_bound` and `gap_to_bound` = kl − kl_bound
    when a "bound" method ran (NaN where uncertified), `kl_bound_norm` and `gap_to_norm_bound` when the
    norm-constrained estimate ("bound_norm") ran."""
    out = table.copy()
    for method, kl_column, gap_column in BOUND_COLUMNS:
        rows = table[table["method"] == method]
        if rows.empty:
            continue
        if rows["target_id"].duplicated().any():
            raise ValueError(f"several {method!r} rows for one target_id")
        out[kl_column] = out["target_id"].map(rows.set_index("target_id")["kl"]).astype(np.float64)
        out[gap_column] = out["kl"].astype(np.float64) - out[kl_column]
    return out
