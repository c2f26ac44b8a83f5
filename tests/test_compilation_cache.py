"""The persistent compilation cache: compiled programs land on disk, a second process reads them back."""

from __future__ import annotations

import os
import subprocess
import sys

from distprompt_jax import compilation_cache

PROGRAM = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_explain_cache_misses", True)
from distprompt_jax import compilation_cache
compilation_cache.enable(sys.argv[1])  # every program, however quick to compile
print(float(jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x.T))(jnp.ones((32, 32)))))
"""


def run(directory):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", PROGRAM, str(directory)], capture_output=True, text=True, env=env,
                          check=True)


def test_a_second_process_reads_the_compiled_program_from_disk(tmp_path):
    first = run(tmp_path)
    assert "PERSISTENT COMPILATION CACHE MISS" in first.stderr
    entries = {p.name for p in tmp_path.iterdir()}
    assert any(name.startswith("jit__lambda") for name in entries)
    second = run(tmp_path)
    assert second.stdout == first.stdout
    assert {p.name for p in tmp_path.iterdir()} == entries  # nothing compiled anew
    assert "PERSISTENT COMPILATION CACHE MISS" not in second.stderr


def test_the_environment_moves_or_turns_off_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.enable() is None
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "here"))
    assert compilation_cache.default_dir() == tmp_path / "here"
    monkeypatch.delenv(compilation_cache.ENV)
    monkeypatch.setenv("DISTPROMPT_JAX_CACHE", str(tmp_path / "models"))
    assert compilation_cache.default_dir() == tmp_path / "models" / "jax_compilation"
