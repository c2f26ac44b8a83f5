"""Hugging Face hub ids in load_model: downloaded once into our cache; a clear, fast error without a hub.

No test touches the network: the hub is either a closed or silent port on 127.0.0.1, or
`huggingface_hub.snapshot_download` is replaced by a copy from a local "repository".
"""

from __future__ import annotations

import fnmatch
import shutil
import socket
import types

import huggingface_hub
import numpy as np
import pytest
from conftest import TINY_VOCAB
from gguf_writer import tiny_byte_level_bpe
from huggingface_hub.errors import LocalEntryNotFoundError

from distprompt_jax import load_model
from distprompt_jax.checkpoints import cache, hub

REPO = "SomeOrg/tiny-model"


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub at a URL (its endpoint constant is read when a client is made)."""
    return lambda url: monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)


def test_hub_ids_are_told_apart_from_paths():
    assert hub.is_repo_id("HuggingFaceTB/SmolLM2-360M")
    for text in ("smollm2", "a/b/c", "./x/y", "x/../y", "~/model", "/abs/model", "dir/model.gguf"):
        assert not hub.is_repo_id(text), text


def test_offline_mode_fails_at_once_naming_the_id_and_what_to_do(cache_root, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match=f"'{REPO}' is not in the cache .* HF_HUB_OFFLINE .* local HF model "
                                           "directory or a .gguf file"):
        load_model(REPO)


def test_no_reachable_hub_is_a_clear_error(cache_root, hub_at):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_at(f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match=f"could not download '{REPO}' .* no network or hub reachable .* "
                                           "local HF model directory or a .gguf file"):
        load_model(REPO)


def test_a_silent_hub_times_out_instead_of_hanging(cache_root, hub_at, monkeypatch):
    # A firewall that drops packets looks like this: the connection opens, no answer ever comes.
    monkeypatch.setattr(hub, "TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_at(f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(hub.HubError, match="no network or hub reachable"):
            load_model(REPO)


@pytest.fixture
def fake_hub(tiny_hf_dir, tmp_path, monkeypatch):
    """A repository on disk, served by a stand-in for `snapshot_download` that copies what the patterns allow."""
    from transformers import PreTrainedTokenizerFast

    repo = tmp_path / "repo"
    shutil.copytree(tiny_hf_dir("qwen2")[1], repo)
    PreTrainedTokenizerFast(tokenizer_object=tiny_byte_level_bpe(TINY_VOCAB)).save_pretrained(repo)
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    (repo / "modeling_custom.py").write_text("raise SystemExit('custom code ran')")
    calls = []

    def snapshot_download(repo_id, *, cache_dir, allow_patterns, local_files_only=False, **options):
        calls.append(dict(repo_id=repo_id, cache_dir=cache_dir, local_files_only=local_files_only))
        snapshot = cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        if local_files_only:
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError("not cached")
        else:
            snapshot.mkdir(parents=True)
            for path in repo.iterdir():
                if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                    shutil.copy(path, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: types.SimpleNamespace())
    return types.SimpleNamespace(repo=repo, calls=calls)


def test_a_hub_id_is_downloaded_into_our_cache_once_and_loads(cache_root, fake_hub, monkeypatch):
    lm = load_model(REPO)
    reference = load_model(fake_hub.repo)
    ids = np.arange(6)
    logits = [model.logits(model.params, model.embed(model.params, ids)) for model in (lm, reference)]
    np.testing.assert_array_equal(*logits)
    assert lm.name == REPO and lm.tokenizer("hello").input_ids == reference.tokenizer("hello").input_ids
    downloads = [c for c in fake_hub.calls if not c["local_files_only"]]
    assert len(downloads) == 1 and downloads[0]["cache_dir"] == cache_root / "hub"
    snapshot = next((cache_root / "hub").rglob("snapshots/*"))
    assert not list(snapshot.glob("*.py")) and not list(snapshot.glob("*.bin"))  # no code, no pickles

    # Cached: loads with the hub gone, without asking it.
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("asked the hub"))
    assert load_model(REPO).name == REPO
