"""HF model directories: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`.

safetensors' numpy API cannot return bfloat16, the dtype most HF checkpoints ship in, so tensors are read
straight from the format (an 8-byte header length, a JSON header, raw little-endian buffers) through a
read-only memmap, with ml_dtypes supplying bfloat16.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


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
    """Lazy name -> numpy array view of one .safetensors file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {err}") from None
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len
        size = self.path.stat().st_size
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            if self._data_start + entry["data_offsets"][1] > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name} runs past the end of the file")
        self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._buffer[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class ShardedTensors(Mapping):
    """All tensors of a model directory, from one file or an index of shards; float32 on access."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = {f: SafetensorsFile(model_dir / f) for f in sorted(set(weight_map.values()))}
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
