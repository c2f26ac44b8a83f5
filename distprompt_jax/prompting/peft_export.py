"""Found prompts as PEFT adapters, written directly: PEFT is not needed to write them, only to load them.

An adapter directory holds what `peft.PeftModel.from_pretrained(model, directory)` reads (checked with
peft 0.21): `adapter_config.json`, and `adapter_model.safetensors` whose one tensor `prompt_embeddings`
becomes the weight of PEFT's prompt encoder (inference mode) — and our `distprompt.json` beside them.

- A soft prompt is PROMPT_TUNING: `prompt_embeddings` [L, d_model], the vectors PEFT puts before the input's
  token embeddings. Ours live where PEFT's do: after any embedding scale (Gemma's √d is inside its
  embedding module in transformers, so the word embeddings PEFT concatenates them with include it too).
- A prefix is PREFIX_TUNING without projection: `prompt_embeddings` [P, n_layers * 2 * n_kv_heads * head_dim].
  PEFT's `get_prompt` views each row as [n_layers * 2, n_kv_heads, head_dim] — layer l's keys at 2l, its
  values at 2l + 1 — and hands them to the model as `past_key_values` at positions 0..P-1, the input
  following at P..: keys after RoPE, as ours are. For grouped-query models PEFT sizes that view from the
  model's config (token_dim = n_kv_heads × head_dim, num_attention_heads = n_kv_heads), as we write it.
  A reparameterized prefix exports its keys and values: the MLP is how they were found, not what they are.

What PEFT cannot express is refused by name, never dropped: fixed tokens before the prompt (config
`prefix`, `bos=True`, the chat template's start), since PEFT's virtual tokens always come first;
interventions; hard prompts (they are tokens: use their text). Fixed tokens after the prompt are the input
the adapter is used with: `distprompt.json` lists them as `input_ids`, to be fed as the model's input ids
(for a soft prompt without suffix, none: the distribution is read after the virtual tokens themselves).

An adapter is valid for exactly the weights it was found on: `distprompt.json` names the model, and for a
registry model its GGUF file and sha256 (transformers loads that GGUF, dequantized, to the same weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INFO_FILE = "distprompt.json"
EXPORTED_METHODS = ("soft", "prefix")


def save_peft(result, directory, target_ids=None, overwrite: bool = False) -> list[Path]:
    """Write one PEFT adapter per chosen target of `result` (a soft or prefix PromptResults); see
    `PromptResults.save_peft`. Returns the adapter directories, in the order of `target_ids`. A directory that
    holds anything but earlier exports is refused unless `overwrite`."""
    info = result.run_info
    if result.method not in EXPORTED_METHODS:
        raise ValueError(f"PEFT adapters are written for {' and '.join(EXPORTED_METHODS)} results, not "
                         f"{result.method!r} (hard prompts are tokens: use their text)")
    if not info:
        raise ValueError("these results carry no run_info (the model and fixed tokens they were found with): export "
                         "the results soft_prompt/prefix_prompt return, or an experiment's prompts read back with "
                         "distprompt_jax.sweep.load_prompts(workdir, method)")
    intervention = info["config"].get("intervention_layer")
    if intervention is not None:
        raise ValueError(f"an intervention vector (intervention_layer={intervention!r}) is not an input prompt: PEFT "
                         "has no adapter for it")
    if info["prefix_ids"]:
        raise ValueError(
            f"fixed tokens before the prompt ({info['prefix_ids']}: from the config's prefix, bos=True or "
            "template='chat') cannot be expressed in PEFT, whose virtual tokens always come first; find the "
            "prompts without them to export them")
    chosen, rows = _chosen(result, target_ids)
    directory = Path(directory)
    paths = [directory] if len(chosen) == 1 else [directory / f"target_{i}" for i in chosen]
    if not overwrite:
        _check_free(directory)
    for target_id, row, path in zip(chosen, rows, paths):
        embeddings, config = _adapter(result, info, row)
        _write(path, embeddings, config, _usage(result, info, row, target_id))
    return paths


def _chosen(result, target_ids) -> tuple[list[int], list[int]]:
    """(target ids, their rows in `result`): all by default, one int, or a sequence."""
    ids = result.metadata["target_id"].to_numpy()
    if target_ids is None:
        chosen = [int(i) for i in ids]
    elif _is_id(target_ids):
        chosen = [int(target_ids)]
    elif np.ndim(target_ids) == 0:  # a float, a string: int() would truncate 0.5 and parse "0"
        raise ValueError(f"target_ids must be integers; got {target_ids!r} ({type(target_ids).__name__})")
    else:
        wrong = [i for i in target_ids if not _is_id(i)]
        if wrong:  # int() would truncate 0.5 and parse "0": either would export a target nobody named
            raise ValueError(f"target_ids must be integers; got {wrong[0]!r} ({type(wrong[0]).__name__})")
        chosen = [int(i) for i in target_ids]
    row_of = {int(t): r for r, t in enumerate(ids)}
    missing = [i for i in chosen if i not in row_of]
    if missing:
        raise ValueError(f"target_ids {missing} are not in these results (their target ids: {ids.min()}..{ids.max()})")
    if len(set(chosen)) < len(chosen) or not chosen:
        raise ValueError(f"target_ids must name distinct targets, at least one; got {chosen}")
    return chosen, [row_of[i] for i in chosen]


def _is_id(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_export(path: Path) -> bool:
    """Whether `path` is a directory this module wrote: one adapter, or adapters in target_<id> folders."""
    if (path / INFO_FILE).is_file():
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(e.is_dir() and e.name.startswith("target_") and (e / INFO_FILE).is_file()
                                 for e in entries)


def _check_free(directory: Path) -> None:
    """Refuse an existing directory that is not empty and not an earlier export (its files would be replaced)."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not _is_export(directory):
        raise FileExistsError(f"{directory} is not empty and holds no earlier PEFT export of distprompt: writing "
                              "there could replace your files; choose an empty or new directory, or pass "
                              "overwrite=True")


def _adapter(result, info: dict, row: int) -> tuple[np.ndarray, dict]:
    """(prompt_embeddings, adapter config) of one target."""
    common = {"task_type": "CAUSAL_LM", "num_transformer_submodules": 1, "num_layers": info["n_layers"],
              "base_model_name_or_path": info["model"], "inference_mode": True}
    if result.method == "soft":
        prompt = np.asarray(result.arrays["prompt"][row], np.float32)
        return prompt, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompt.shape[0],
                        "token_dim": info["d_model"], "num_attention_heads": info["n_heads"],
                        "prompt_tuning_init": "RANDOM", **common}
    keys, values = (np.asarray(result.arrays[name][row], np.float32) for name in ("keys", "values"))
    n_layers, p, n_kv, head_dim = keys.shape
    # [n_layers, P, n_kv, head_dim] twice -> [P, n_layers, 2, n_kv, head_dim] -> PEFT's rows
    rows = np.stack([keys, values], axis=2).transpose(1, 0, 2, 3, 4).reshape(p, n_layers * 2 * n_kv * head_dim)
    return rows, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": p, "token_dim": n_kv * head_dim,
                  "num_attention_heads": n_kv, "encoder_hidden_size": n_kv * head_dim, "prefix_projection": False,
                  **common}


def _usage(result, info: dict, row: int, target_id: int) -> dict:
    """distprompt.json: which target, what was reached, which weights the adapter is valid for, how to use it."""
    from distprompt_jax.checkpoints import registry

    usage = {"target_id": target_id, "method": result.method, "kl": float(result.columns["kl"][row])}
    if "kl_bound" in result.columns:
        usage["kl_bound"] = float(result.columns["kl_bound"][row])
    usage["model"] = info["model"]
    if registry.is_registered(info["model"]):
        entry = registry.REGISTRY[info["model"]]
        usage |= {"model_description": entry.description, "gguf": entry.filename, "gguf_sha256": entry.sha256}
    usage["input_ids"] = list(info["suffix_ids"])
    usage["use"] = ("peft.PeftModel.from_pretrained(model, this directory), then the model's next-token "
                    "distribution after input_ids (fed as they are, no special tokens added)")
    return usage


def _write(path: Path, embeddings: np.ndarray, config: dict, usage: dict) -> None:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": np.ascontiguousarray(embeddings)}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (path / INFO_FILE).write_text(json.dumps(usage, indent=2) + "\n")
