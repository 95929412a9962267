"""The notebooks run top to bottom, as a data scientist first runs them."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_run_notebook_top_to_bottom(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEXTBEST_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        f"{path.name} is stored with outputs; clear them before committing"
    )
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    )
    before = sorted(path.parent.iterdir())
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    assert sorted(path.parent.iterdir()) == before, "the notebook wrote into notebooks/"
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    produced = list(tmp_path.glob("*/models/*.onnx"))
    assert produced, "the notebook's run left no ONNX model under NEXTBEST_NOTEBOOK_DIR"
    # the MLflow run's artifacts sit beside its store, in the output folder
    assert list(tmp_path.glob("*/mlartifacts/*/artifacts/model_card.md"))
