"""Which JAX backends an entry point starts: no TPU probe on a machine without TPU chips.

With libtpu installed (the `[tpu]` extra, or the test extra for compile-only plans), JAX's first backend start
asks libtpu for a TPU even where none is: ~0.1 s and five lines of libtpu warnings on every start of a CPU
run (BUILD.md). A plan's compile-only TPU client does not need that backend. Importing the package calls
`skip_absent_tpu()` (distprompt_jax/__init__.py), before anything starts JAX's backends.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Google's PCI vendor id: every TPU chip a host holds is a PCI device of this vendor (what JAX itself looks for).
GOOGLE_PCI_VENDOR = "0x1ae0"
# JAX backend plugins that would be skipped along with the TPU if the CPU alone were chosen.
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def tpu_chips_present(pci_devices: Path = Path("/sys/bus/pci/devices")) -> bool:
    """Whether a Google TPU chip is on this host's PCI bus."""
    for vendor in pci_devices.glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def skip_absent_tpu(environ=os.environ) -> bool:
    """Start JAX on the CPU alone (jax_platforms, and JAX_PLATFORMS for child processes) where libtpu is installed,
    no TPU chip is present, no GPU plugin is installed and the user chose no platforms; returns whether it did.
    Elsewhere JAX chooses as always. Call it before JAX's backends start (any computation or device query)."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None or tpu_chips_present():
        return False
    if any(importlib.util.find_spec(plugin) is not None for plugin in GPU_PLUGINS):
        return False
    import jax

    environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    return True
