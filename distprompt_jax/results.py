"""What a prompting method returns: one table row per target, plus per-target arrays; and its files.

`PromptResults.save(dir)` writes the files an experiment writes for a method (sweep.py), and
`PromptResults.load(dir, method)` reads a method's results from either:

    results.parquet           one row per (target, method): `PromptResults.to_pandas()`, with `model`
    prompts/<method>.npz      `target_id`, the per-target arrays, and under `RUN_INFO` a JSON object
                              {"engine": the engine's name, "run_info": what it recorded beside its rows}
    targets/metadata.parquet  the target set's metadata (an experiment's targets/ also holds probs.npy)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS_FILE = "results.parquet"
# The key, in a method's prompts file (and an experiment's finished-results files), of the JSON object
# {"engine": the engine's name, "run_info": PromptResults.run_info ({} where the engine records none)}.
RUN_INFO = "run_info"
# The metadata columns that name a target (the report groups and pairs rows by them): joined to result rows
# as they are. Every other metadata column says how the target was made, and joins as `target_<name>`, so that
# the targets' seed, steps or learning_rate never read as the method's.
TARGET_KEYS = ("target_id", "kind", "recipe", "target_entropy", "pair_target_id")
# `entropy` is the entropy a target reached (target_entropy the one requested): `target_entropy` is taken.
TARGET_RENAMED = {"entropy": "target_entropy_reached"}


def target_column(name: str) -> str:
    """The name a target-metadata column has in result tables."""
    if name in TARGET_KEYS:
        return name
    return TARGET_RENAMED.get(name, f"target_{name}")


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
        """One row per target: `target_id, method`, the method's columns, then every metadata column, those
        that are no key (`TARGET_KEYS`) named `target_<name>` (`target_column`)."""
        table = pd.DataFrame({"target_id": self.metadata["target_id"].to_numpy(), "method": self.method})
        for name, values in self.columns.items():
            table[name] = np.asarray(values)
        metadata = self.metadata.drop(columns="target_id").reset_index(drop=True)
        metadata.columns = [target_column(name) for name in metadata.columns]
        clash = sorted(set(metadata.columns) & set(table.columns))
        if clash or metadata.columns.duplicated().any():
            raise ValueError(f"result columns {clash or list(metadata.columns[metadata.columns.duplicated()])} "
                             "would be both a target's and the method's")
        return pd.concat([table, metadata], axis=1)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write this result as an experiment writes a method's (module docstring): `directory/results.parquet`,
        `prompts/<method>.npz` and `targets/metadata.parquet`; `PromptResults.load(directory)` reads it back
        equal, and `distprompt-report --workdir=directory` reports on it. A directory that already holds a
        results.parquet is refused unless `overwrite`. Returns the results file's path."""
        from distprompt_jax.files import atomic_write, real_dir
        from distprompt_jax.targets.io import METADATA_FILE

        directory = Path(directory)
        if (directory / RESULTS_FILE).exists() and not overwrite:
            raise FileExistsError(f"{directory / RESULTS_FILE} exists: save elsewhere, or pass overwrite=True")
        directory.mkdir(parents=True, exist_ok=True)
        table = self.to_pandas()
        if "model" in self.run_info:
            table.insert(2, "model", self.run_info["model"])
        recorded = json.dumps({"engine": self.method, "run_info": self.run_info})
        atomic_write(real_dir(directory / "targets", directory) / METADATA_FILE,
                     lambda file: self.metadata.to_parquet(file, index=False))
        atomic_write(real_dir(directory / "prompts", directory) / f"{self.method}.npz", lambda file: np.savez(
            file, target_id=self.metadata["target_id"].to_numpy(), **self.arrays, **{RUN_INFO: recorded}))
        atomic_write(directory / RESULTS_FILE, lambda file: table.to_parquet(file, index=False))
        return directory / RESULTS_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike, method: str | None = None) -> PromptResults:
        """The results of `method` (a label of results.parquet: "soft", "prefix", "soft-L5", ...; None: the one
        method there) that `save` or an experiment wrote in `directory`: its rows' own columns, the prompts
        file's arrays and run_info, and the targets' metadata, in the prompts file's target order. The result's
        `method` is the engine's name ("soft" for "soft-L5" and for the final-norm rung)."""
        from distprompt_jax.targets.io import METADATA_FILE, read_table

        directory = Path(directory)
        results_path = directory / RESULTS_FILE
        if not results_path.is_file():
            raise FileNotFoundError(f"{results_path} does not exist: run the experiment to the end (or save the "
                                    "results) first")
        table = pd.read_parquet(results_path)
        labels = list(dict.fromkeys(table["method"]))
        if method is None:
            if len(labels) != 1:
                raise ValueError(f"{results_path} holds the methods {labels}: name the one to load")
            method = labels[0]
        path = directory / "prompts" / f"{method}.npz"
        if method not in labels or not path.is_file():
            raise FileNotFoundError(f"{path if method in labels else results_path} holds no results of {method!r}: "
                                    f"run the experiment with {method.split('-L')[0]!r} in config.methods to the "
                                    "end first")
        with np.load(path) as saved:
            if RUN_INFO not in saved.files:
                raise ValueError(f"{path} was written before prompts files recorded the model and fixed tokens "
                                 "their prompts belong to (run_info); rerun the experiment in a new workdir")
            target_id = saved["target_id"]
            arrays = {k: saved[k] for k in saved.files if k not in ("target_id", RUN_INFO)}
            recorded = json.loads(str(saved[RUN_INFO]))
        metadata = read_table(directory / "targets" / METADATA_FILE).set_index("target_id").loc[target_id]
        metadata = metadata.reset_index()
        rows = table[table["method"] == method].set_index("target_id").loc[target_id]
        joined = {target_column(name) for name in metadata.columns}
        rows = rows.drop(columns=[c for c in rows.columns if c in joined or c in ("method", "model")])
        if len(labels) > 1:  # other methods' columns, all missing in this method's rows
            rows = rows.dropna(axis=1, how="all")
        columns = {name: _column_values(rows[name]) for name in rows.columns}
        return cls(method=recorded["engine"] or method, columns=columns, arrays=arrays, metadata=metadata,
                   run_info=recorded["run_info"])

    def save_peft(self, directory, target_ids=None, overwrite: bool = False) -> list:
        """PEFT adapters of the found prompts (soft: PROMPT_TUNING, prefix: PREFIX_TUNING) that
        `peft.PeftModel.from_pretrained(model, path)` loads: with one target (an int, or a result of one
        target), `directory` itself; with several (default: all), `directory/target_<id>` each. Target ids
        are integers. A `directory` holding anything but an earlier export is refused unless `overwrite`.
        Returns the adapter directories. See `distprompt_jax.prompting.peft_export`."""
        from distprompt_jax.prompting.peft_export import save_peft

        return save_peft(self, directory, target_ids, overwrite=overwrite)


def _column_values(column: pd.Series) -> np.ndarray:
    """A results column as the array a method reported: text as a numpy string array, as engines give it."""
    values = column.to_numpy()
    if values.dtype == object and all(isinstance(v, str) for v in values):
        return values.astype(str)
    return values


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
