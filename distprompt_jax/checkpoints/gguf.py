"""Reading a GGUF file (llama.cpp's format) as the equivalent Hugging Face checkpoint, without torch.

    hf_config, tensors, tokenizer = read_gguf("model.gguf")

`hf_config` is the `config.json` of the equivalent transformers (v5) model, `tensors` its state dict
(float32 numpy, HF names and layouts, `lm_head.weight` left out when tied), and `tokenizer` a
`PreTrainedTokenizerFast` rebuilt from the file's `tokenizer.ggml.*` metadata.

llama.cpp's converter changes more than names, and each change is undone here:
  * a `[out, in]` layout everywhere, so GPT-2's Conv1D weights (`[in, out]` in HF) come back transposed;
  * q/k rows of `llama` files permuted per head, for llama.cpp's interleaved rotary embedding;
  * every Gemma RMSNorm multiplier stored as `1 + w`;
  * quantized blocks, dequantized with the `gguf` package.

What is particular to an architecture -- its config fields, its tensors and how each was changed -- is
registered by the model family that reads it (`GGUFArchitecture` in `models/<family>.py`, in the vocabulary
of `checkpoints.gguf_mapping`); this module reads the file and applies that mapping.

The reader is strict: metadata under the architecture's own namespace that it does not understand
(rope scaling, softcapping, experts, partial rotary, ...) and tensors it cannot place raise `GGUFError`
naming the key or tensor, rather than yielding a model that silently computes something else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from distprompt_jax.checkpoints.gguf_mapping import (
    GGUFError,
    GGUFMetadata,
    TensorSpec,
    TensorTable,
)
from distprompt_jax.models.family import GGUFArchitecture, gguf_architectures

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["GGUFError", "gguf_architecture", "read_gguf", "supported_architectures"]

_GGUF_VERSIONS = (2, 3)


def supported_architectures() -> tuple[str, ...]:
    """The GGUF `general.architecture` names some registered model family reads."""
    return tuple(gguf_architectures())


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], PreTrainedTokenizerFast]:
    """`(hf_config, tensors, tokenizer)` equivalent to the GGUF file at `path`. See the module docstring."""
    path = Path(path)
    name = gguf_architecture(path)
    architectures = gguf_architectures()
    if name not in architectures:
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {name!r}; supported: {', '.join(architectures)}"
        )
    architecture = architectures[name]
    reader = _open_reader(path)
    metadata = GGUFMetadata(path, name, _read_fields(reader))
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    _refuse_unsupported_layouts(metadata, gguf_tensors)

    hf_config = _common_config(architecture, metadata, gguf_tensors) | architecture.config(metadata, gguf_tensors)
    metadata.check_all_read()
    tensors = _convert_tensors(path, gguf_tensors, architecture.tensors(hf_config))
    return hf_config, tensors, _build_tokenizer(metadata)


def gguf_architecture(path: str | os.PathLike) -> str:
    """The file's `general.architecture`, read from the header alone (no tensor table, no vocabulary)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not the magic b'GGUF')")
        version, _tensor_count, kv_count = _unpack(f, "<IQQ", path)
        if version not in _GGUF_VERSIONS:
            # A big-endian file also lands here: its version reads as a huge number.
            raise GGUFError(f"{path}: GGUF version {version} is not supported (little-endian v2 and v3 are)")
        for _ in range(kv_count):
            key = _read_string(f, path)
            (value_type,) = _unpack(f, "<I", path)
            if key == "general.architecture":
                if value_type != _STRING:
                    raise GGUFError(f"{path}: general.architecture is not a string")
                return _read_string(f, path)
            _skip_value(f, value_type, path)
    raise GGUFError(f"{path}: the GGUF metadata has no general.architecture")


# ---------------------------------------------------------------------------------------------------
# The header walk behind `gguf_architecture`: GGUFReader parses every string of the vocabulary up front
# (seconds for a 262k-token one), where the architecture is the first key of any llama.cpp file.

_STRING, _ARRAY = 8, 9
# value type -> byte width, for the fixed-size ones: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
_FIXED_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _unpack(f: BinaryIO, fmt: str, path: Path) -> tuple:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GGUFError(f"{path}: truncated GGUF file (the metadata ends early)")
    return struct.unpack(fmt, raw)


def _read_string(f: BinaryIO, path: Path) -> str:
    (length,) = _unpack(f, "<Q", path)
    raw = f.read(length)
    if len(raw) != length:
        raise GGUFError(f"{path}: truncated GGUF file (the metadata ends early)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: corrupt GGUF metadata (a key or string is not UTF-8)") from e


def _skip_value(f: BinaryIO, value_type: int, path: Path):
    if value_type in _FIXED_WIDTH:
        f.seek(_FIXED_WIDTH[value_type], os.SEEK_CUR)
    elif value_type == _STRING:
        (length,) = _unpack(f, "<Q", path)
        f.seek(length, os.SEEK_CUR)
    elif value_type == _ARRAY:
        element_type, count = _unpack(f, "<IQ", path)
        if element_type in _FIXED_WIDTH:
            f.seek(count * _FIXED_WIDTH[element_type], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, element_type, path)
    else:
        raise GGUFError(f"{path}: corrupt GGUF metadata (unknown value type {value_type})")


# ---------------------------------------------------------------------------------------------------
# Metadata


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    # GGUFReader maps the file and slices it wherever the header points; a short or garbled file
    # surfaces as whichever numpy or parsing error that hits first.
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def _read_fields(reader) -> dict[str, Any]:
    """Every metadata key -> its value as plain Python, minus the reader's own `GGUF.*` header entries."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _refuse_unsupported_layouts(meta: GGUFMetadata, gguf_tensors: TensorTable):
    path = meta.path
    if int(meta.other("split.count", 1)) > 1:
        raise GGUFError(
            f"{path}: this is one part of a split GGUF (split.count={meta.other('split.count')}); merge the "
            "parts with llama.cpp's gguf-split --merge first"
        )
    if "rope_freqs.weight" in gguf_tensors:
        # Llama 3.1+ rope scaling: llama.cpp bakes it into per-frequency factors, from which HF's
        # factor / low_freq_factor / high_freq_factor / original_max_position_embeddings cannot be
        # recovered uniquely (any common rescaling of the last three gives the same factors).
        raise GGUFError(
            f"{path}: tensor rope_freqs.weight (llama3-style rope scaling) is not supported: its HF "
            "rope_parameters cannot be recovered exactly from the GGUF"
        )


# ---------------------------------------------------------------------------------------------------
# Config: what every architecture states alike; the rest is the family's (`GGUFArchitecture.config`)


def _common_config(architecture: GGUFArchitecture, meta: GGUFMetadata, gguf_tensors: TensorTable) -> dict:
    tokens = meta.other("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{meta.path}: the GGUF has no tokenizer.ggml.tokens (no vocabulary)")
    return {
        "model_type": architecture.model_type,
        "architectures": [architecture.hf_architecture],
        # llama.cpp pads the token list to the embedding's size, so the two agree; the shape check on
        # token_embd catches a file where they do not.
        "vocab_size": int(meta.get("vocab_size", len(tokens))),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in gguf_tensors,
        "bos_token_id": _optional_int(meta.other("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(meta.other("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(meta.other("tokenizer.ggml.padding_token_id")),
    }


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------------
# Tensors: the family lists them (`GGUFArchitecture.tensors`); here they are checked and dequantized


def _convert_tensors(path: Path, gguf_tensors: TensorTable, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    expected = {spec.gguf_name: spec for spec in specs}
    unknown = sorted(set(gguf_tensors) - set(expected))
    if unknown:
        raise GGUFError(f"{path}: GGUF tensors with no place in the HF model: {', '.join(unknown)}")
    missing = sorted(set(expected) - set(gguf_tensors))
    if missing:
        raise GGUFError(f"{path}: GGUF tensors missing for the HF model: {', '.join(missing)}")
    for spec in specs:
        shape = _stored_shape(gguf_tensors[spec.gguf_name])
        if shape != spec.stored_shape:
            raise GGUFError(
                f"{path}: shape mismatch for tensor {spec.gguf_name}: the file has {list(shape)}, the config "
                f"implies {list(spec.stored_shape)} (for {spec.hf_name} {list(spec.hf_shape)})"
            )
    return {spec.hf_name: _dequantized(path, gguf_tensors[spec.gguf_name], spec) for spec in specs}


def _stored_shape(tensor) -> tuple[int, ...]:
    # ggml lists dimensions fastest-moving first; numpy (and torch) the other way round
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantized(path: Path, tensor, spec: TensorSpec) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from e
    values = values.reshape(spec.stored_shape).astype(np.float32, copy=False)
    # A copy in every case: F32 data is a view of the memory-mapped file.
    return np.array(spec.convert(values), dtype=np.float32, order="C")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(meta: GGUFMetadata) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` equal to the one transformers builds from a GGUF.

    transformers' own `from_pretrained(..., gguf_file=...)` imports torch, so we feed its torch-free
    builder the same dict its GGUF reader would produce (the key names come from its mapping table).
    """
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5.18
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # 5.0-5.17 kept the same two names in one module (checked in 5.0, 5.10, 5.17's wheels)
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    tokenizer_dict = {
        name: meta.other(f"tokenizer.{key}")
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if meta.other(f"tokenizer.{key}") is not None
    }
    tokens = tokenizer_dict["tokens"]
    try:
        backend, _ = convert_gguf_tokenizer(meta.architecture, tokenizer_dict)
    except ValueError as e:
        raise GGUFError(f"{meta.path}: cannot build the tokenizer: {e}") from e
    backend = _without_tokens_beyond(backend, len(tokens))

    def token(id_key: str) -> str | None:
        token_id = meta.other(f"tokenizer.ggml.{id_key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{meta.path}: tokenizer.ggml.{id_key}={token_id} is outside the vocabulary")
        return tokens[token_id]

    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
    add_bos_default = tokenizer_dict.get("tokenizer_type") == "llama"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        # Stating these makes the tokenizer install a TemplateProcessing post-processor that adds
        # exactly the BOS/EOS the file asks for.
        add_bos_token=bool(meta.other("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(meta.other("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.other("tokenizer.chat_template"),
    )


def _without_tokens_beyond(backend, vocab_size: int):
    """The tokenizer less any added token with an id outside the file's vocabulary.

    transformers' builder hands the vocabulary to a tokenizer class, which adds its own default special
    tokens when the vocabulary lacks them -- GPT-2's `<|endoftext|>` to a Llama 3 vocabulary, say -- with
    ids the model has no embedding for.
    """
    from tokenizers import Tokenizer

    if backend.get_vocab_size(with_added_tokens=True) <= vocab_size:
        return backend
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    return Tokenizer.from_str(json.dumps(spec))
