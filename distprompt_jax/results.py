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
    """

    method: str
    columns: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]
    metadata: pd.DataFrame

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
