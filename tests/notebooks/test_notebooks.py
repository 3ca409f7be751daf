"""Every notebook in notebooks/ runs top to bottom on CPU (nbclient, a fresh Python kernel), at tiny size."""

import os
import pathlib

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {"train_and_sample.ipynb", "hf_load_and_generate.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path, embedded_data_cache):
    book = nbformat.read(path, as_version=4)
    assert book.cells[1].cell_type == "code" and "pip" in book.cells[1].source  # the first code cell installs
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("NOTEBOOK_DATA_CACHE", embedded_data_cache)  # the corpus and tokenizer, built once
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
