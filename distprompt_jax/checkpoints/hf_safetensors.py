"""HF model directories: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`.

Tensors are read with `safetensors.safe_open(framework="np")`, which memory-maps the file and returns
bfloat16 tensors as `ml_dtypes.bfloat16` arrays once ml_dtypes is imported (checked with safetensors
0.4.3 through 0.8.0; 0.4.0 fails).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy, which safe_open's numpy path needs
import numpy as np
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, or inconsistent."""


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a HF model directory: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


class SafetensorsFile(Mapping):
    """Lazy name -> numpy array of one .safetensors file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is missing")
        try:
            self._file = safe_open(str(self.path), framework="np")
        except (OSError, SafetensorError) as err:
            raise CheckpointError(
                f"{self.path} ({self.path.stat().st_size} bytes) is not a readable safetensors file: {err}. "
                "A truncated or partly downloaded file gives this; fetch or convert it again."
            ) from None
        self._names = dict.fromkeys(self._file.keys())  # ordered, O(1) membership

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self._file.get_tensor(name)
        except (TypeError, SafetensorError) as err:  # a dtype numpy cannot hold, or bad bytes
            raise CheckpointError(f"{self.path}: cannot read tensor {name}: {err}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class ShardedTensors(Mapping):
    """All tensors of a model directory, from one file or an index of shards; float32 on access."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a safetensors index (a JSON with weight_map): {err!r}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {missing}")
            shards = {f: SafetensorsFile(model_dir / f) for f in files}
            self._where = {name: shards[f] for name, f in weight_map.items()}
        elif single.is_file():
            shard = SafetensorsFile(single)
            self._where = {name: shard for name in shard}
        else:
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            raise CheckpointError(
                f"{model_dir} has no model.safetensors or model.safetensors.index.json"
                + (f" (found {found})" if found else "")
            )
        for name, shard in self._where.items():
            if name not in shard:
                raise CheckpointError(f"the index names {name} in {shard.path.name}, which does not hold it")

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self._where[name][name], dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
