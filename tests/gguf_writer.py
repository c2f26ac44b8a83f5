"""Test helper: write a HF checkpoint as a GGUF the way llama.cpp's `convert_hf_to_gguf.py` would.

Deliberately independent of the reader under test: tensor names come from the `gguf` package's own
HF -> GGUF name map (the one llama.cpp's converter uses), and llama.cpp's changes are re-done here
forwards -- `[out, in]` layout (GPT-2's Conv1D weights transposed), q/k rows permuted per head for the
`llama` architecture, `1 + w` for Gemma's norms -- and quantization via `gguf.quants.quantize`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = [
    "The capital of France is Paris.",
    "Hello, world! This is a tiny tokenizer for tests.",
    "Numbers like 123 and 4567 appear here, and so do tabs\tand\nnewlines.",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 -- a few accents and dashes.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
]
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2

_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gpt2": "gpt2"}
# GPT-2's Conv1D weights are [in, out]; llama.cpp's converter transposes them to [out, in].
_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
           "Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}


def tiny_byte_level_bpe(vocab_size: int = 320) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on a few sentences: 256 bytes, 3 specials, a few merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def write_gguf(
    path: str | os.PathLike,
    hf_model_or_state_dict,
    hf_config,
    tokenizer: Tokenizer,
    qtype: str = "F32",
    *,
    add_bos_token: bool = False,
    extra_metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
):
    """Write `hf_model_or_state_dict` (a torch model, or a dict of torch / numpy tensors) as a GGUF.

    `hf_config` is the model's transformers config; `tokenizer` a byte-level BPE `tokenizers.Tokenizer`
    whose special tokens are `SPECIAL_TOKENS`. 2-D weights are stored as `qtype` (F32, Q8_0, Q4_0, Q4_1)
    and 1-D ones as F32, as llama.cpp does. `extra_metadata` / `extra_tensors` add (or override) keys and
    tensors verbatim, to build files the reader must refuse.
    """
    state_dict = _numpy_state_dict(hf_model_or_state_dict)
    arch = _GGUF_ARCH[hf_config.model_type]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(_FILE_TYPES[qtype])
    _add_model_metadata(writer, arch, hf_config)
    _add_tokenizer_metadata(writer, tokenizer, add_bos_token)
    for key, value in (extra_metadata or {}).items():
        _add_verbatim(writer, key, value)

    for name, array in _gguf_tensors(arch, hf_config, state_dict).items():
        _add_tensor(writer, name, array, qtype)
    for name, array in (extra_tensors or {}).items():
        _add_tensor(writer, name, np.asarray(array, dtype=np.float32), qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _numpy_state_dict(model_or_state_dict) -> dict[str, np.ndarray]:
    state_dict = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return {
        name: np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
        for name, value in state_dict.items()
    }


def _add_model_metadata(writer: gguf.GGUFWriter, arch: str, c):
    if arch == "gpt2":
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"] if arch == "gemma3" else rope["rope_theta"])
    # the converter states the head width whenever the HF config does
    if getattr(c, "head_dim", None) is not None:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if arch == "llama":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(c.sliding_window)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer, add_bos_token: bool):
    model = json.loads(tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = {added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_pad_token_id(vocab["<|pad|>"])
    writer.add_bos_token_id(vocab["<|bos|>"])
    writer.add_eos_token_id(vocab["<|eos|>"])
    writer.add_add_bos_token(add_bos_token)


def _add_verbatim(writer: gguf.GGUFWriter, key: str, value):
    if isinstance(value, bool):
        vtype = gguf.GGUFValueType.BOOL
    elif isinstance(value, int):
        vtype = gguf.GGUFValueType.UINT32
    elif isinstance(value, float):
        vtype = gguf.GGUFValueType.FLOAT32
    else:
        vtype = gguf.GGUFValueType.STRING
    writer.add_key_value(key, value, vtype)


def _gguf_tensors(arch: str, c, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n_layers = c.n_layer if arch == "gpt2" else c.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tensors = {}
    for hf_name, array in state_dict.items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied embeddings
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"the gguf name map has no GGUF name for {hf_name}")
        tensors[gguf_name] = _as_llama_cpp_stores(arch, c, hf_name, array)
    return tensors


def _as_llama_cpp_stores(arch: str, c, hf_name: str, array: np.ndarray) -> np.ndarray:
    if arch == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
        return array.T
    if arch == "llama" and ".self_attn.q_proj." in hf_name:
        return _permute_rows(array, c.num_attention_heads)
    if arch == "llama" and ".self_attn.k_proj." in hf_name:
        return _permute_rows(array, c.num_key_value_heads)
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return array + np.float32(1.0)
    return array


def _permute_rows(array: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, rows `[2, head_dim/2]` -> `[head_dim/2, 2]`."""
    rows, rest = array.shape[0], array.shape[1:]
    return array.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(array.shape)


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: str):
    array = np.ascontiguousarray(array, dtype=np.float32)
    quant = _QTYPES[qtype]
    block_size, _ = gguf.GGML_QUANT_SIZES[quant]
    if array.ndim < 2 or array.shape[-1] % block_size != 0:
        writer.add_tensor(name, array)
        return
    writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
