"""The GGUF conversion cache: where conversions go, what is verified, and what is (never) deleted."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_hf_model
from gguf_writer import tiny_byte_level_bpe, write_gguf

from distprompt_jax import load_model
from distprompt_jax.checkpoints import cache
from distprompt_jax.checkpoints.hf_safetensors import CheckpointError
from distprompt_jax.loading import converted_gguf_dir


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    model = build_tiny_hf_model("qwen2")
    path = tmp_path_factory.mktemp("gguf") / "M.gguf"
    write_gguf(path, model, model.config, tiny_byte_level_bpe(TINY_VOCAB))
    return path


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


def _logits(lm):
    ids = np.arange(10).reshape(2, 5)
    return np.asarray(jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, lm.embed(lm.params, ids)))


def _tree(root):
    """Every path under root with its inode, size and mtime: equal trees mean nothing was written."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_users_directory_beside_the_gguf_survives(gguf_file, cache_root, tmp_path):
    # The reproduction from issue 13: loading x/M.gguf used to rmtree x/M.hf, whatever it held.
    user = tmp_path / "x"
    (user / "M.hf").mkdir(parents=True)
    (user / "M.hf" / "n.txt").write_text("keep")
    shutil.copy(gguf_file, user / "M.gguf")
    load_model(user / "M.gguf")
    assert (user / "M.hf" / "n.txt").read_text() == "keep"
    assert sorted(p.name for p in user.iterdir()) == ["M.gguf", "M.hf"]
    assert converted_gguf_dir(user / "M.gguf").parent == cache_root / "converted"


def _conversions(caplog) -> int:
    """How many conversions were announced (absl logs them at INFO through the `absl` logger)."""
    return sum("converting" in record.getMessage() for record in caplog.records)


def test_copies_of_one_gguf_share_one_conversion(gguf_file, cache_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_file, copy)
    assert converted_gguf_dir(gguf_file) == converted_gguf_dir(copy)
    assert _conversions(caplog) == 1
    assert len([p for p in (cache_root / "converted").iterdir() if not p.name.startswith(".")]) == 1


def test_a_corrupted_conversion_is_rebuilt_with_a_warning(gguf_file, cache_root):
    expected = _logits(load_model(gguf_file))
    weights = converted_gguf_dir(gguf_file) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4000:] = b"\xff" * 4000  # NaNs in the last tensor, same size: the case that printed NaN probabilities
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged .*model.safetensors does not match the sha256"):
        lm = load_model(gguf_file)
    np.testing.assert_array_equal(_logits(lm), expected)


def test_an_incomplete_conversion_is_rebuilt(gguf_file, cache_root):
    target = converted_gguf_dir(gguf_file)
    (target / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="tokenizer.json is missing"):
        assert converted_gguf_dir(gguf_file) == target
    assert (target / "tokenizer.json").is_file()


def test_a_read_only_cache_with_a_valid_conversion_is_used_as_is(gguf_file, cache_root, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    expected = _logits(load_model(gguf_file))
    assert _conversions(caplog) == 1
    caplog.clear()
    before = _tree(cache_root)
    modes = {p: p.stat().st_mode for p in [cache_root, *cache_root.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        np.testing.assert_array_equal(_logits(load_model(gguf_file)), expected)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert _conversions(caplog) == 0
    assert _tree(cache_root) == before


def test_a_foreign_directory_in_the_cache_is_never_replaced(gguf_file, cache_root):
    key = cache.file_sha256(gguf_file)
    foreign = cache_root / "converted" / key
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not made by distprompt_jax"):
        converted_gguf_dir(gguf_file)
    assert (foreign / "mine.txt").read_text() == "keep"


def test_leftovers_of_dead_processes_are_removed_on_the_next_load(gguf_file, cache_root):
    converted = cache_root / "converted"
    host, dead = socket.gethostname(), _dead_pid()
    stale = cache.make_owned_dir(converted / f"abc.tmp-{host}-{dead}")
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    kept = {
        "live": cache.make_owned_dir(converted / f"abc.tmp-{host}-{os.getpid()}"),
        "other host": cache.make_owned_dir(converted / f"abc.tmp-{host}x-{dead}"),
        "not ours": converted / f"abc.tmp-{host}-{dead}1",
    }
    kept["not ours"].mkdir()  # no marker: whatever its name, it is not deleted
    (converted / f"def.old-{host}-{dead}").write_bytes(b"\0")  # files by name alone (no user file is so named)
    load_model(gguf_file)
    assert not stale.exists()
    assert not (converted / f"def.old-{host}-{dead}").exists()
    assert all(path.exists() for path in kept.values())


def test_conversion_into_an_unwritable_cache_says_what_to_do(gguf_file, tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "cache"))  # cannot be created, even by root
    with pytest.raises(CheckpointError, match=f"cannot write the conversion .* Set {cache.CACHE_ENV}"):
        converted_gguf_dir(gguf_file)


def test_manifest_records_every_file(gguf_file, cache_root):
    target = converted_gguf_dir(gguf_file)
    manifest = json.loads((target / cache.MANIFEST).read_text())
    assert manifest["source_sha256"] == cache.file_sha256(gguf_file)
    on_disk = {p.name for p in target.iterdir()} - {cache.MARKER, cache.MANIFEST}
    assert set(manifest["files"]) == on_disk >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_the_conversion_lock_is_free_once_loaded(gguf_file, cache_root):
    # Another process converting the same file waits on this lock; it must not outlive the conversion.
    converted_gguf_dir(gguf_file)
    lock = cache_root / "converted" / f".{cache.file_sha256(gguf_file)}.lock"
    code = f"import filelock; filelock.FileLock({str(lock)!r}).acquire(timeout=0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
