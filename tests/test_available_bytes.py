"""parallel.available_bytes: host RAM (through psutil, on any OS) shared by the CPU devices."""

from __future__ import annotations

import types

import jax
import psutil

from distprompt_jax import parallel


def test_cpu_devices_share_the_hosts_available_memory(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2**30))
    devices = jax.local_devices(backend="cpu")
    assert len(devices) == 4  # conftest's fake CPU devices
    assert parallel.available_bytes(devices[0]) == 2 * 2**30
