"""`--help` of the console scripts lists their own flags, not just absl's "Try --helpfull"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def help_text(script: str) -> str:
    path = Path(sys.executable).parent / script  # the console script pip installed beside this interpreter
    assert path.is_file(), f"{path} is missing: install the package (pip install -e .)"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=300)
    return result.stdout


@pytest.mark.parametrize("script, expected", [
    ("distprompt", ["--config:", "--workdir:", "--model:", "--prompt:", "--top_k:", "--dtype:", "--distributed:",
                    "--compilation_cache:", "--config.<section>.<field>"]),
    ("distprompt-report", ["--workdir: Run directory holding results.parquet.", "distprompt-report --workdir=DIR"]),
])
def test_help_lists_the_commands_own_flags(script, expected):
    text = help_text(script)
    missing = [item for item in expected if item not in text.replace("--[no]", "--")]
    assert not missing, f"{script} --help lacks {missing}:\n{text}"
    assert "--helpfull" in text
    assert "--jax_" not in text and "--verbosity" not in text  # others' flags stay under --helpfull
