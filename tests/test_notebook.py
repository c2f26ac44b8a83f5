"""examples/quickstart.ipynb runs end to end in a fresh kernel, as a reader would run it (SmolLM2, the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.real_weights

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs_and_shows_found_kl_above_its_bound(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises fails the execution with the cell and its traceback named.
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    texts = "\n".join(output.get("data", {}).get("text/plain", "") + output.get("text", "") for output in outputs)
    assert "gap_to_bound" in texts and "nearest tokens of the first soft prompt" in texts
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the figure
