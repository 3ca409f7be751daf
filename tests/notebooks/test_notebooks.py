"""Every notebook in notebooks/ runs top to bottom on CPU (nbclient, a fresh Python kernel), at tiny size."""

import os
import pathlib

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# The notebooks' size knobs in CI (each notebook reads the ones it has; a Colab user gets the defaults).
CI_SIZE = {
    "NOTEBOOK_STEPS": "12",  # train_and_sample: training steps
    # scaling_sweep: the argument of experiments/scaling_laws.py; both budgets train the same 3 shapes, so the
    # second budget's runs reuse most compiled programs (the session's compilation cache)
    "NOTEBOOK_SWEEP": "toy,budgets=3e9/6e9",
    "NOTEBOOK_BOOTSTRAP": "100",  # scaling_sweep: bootstrap resamples of the fit's intervals
    # posttrain_round: enough steps for a few right answers among the samples (the pairs DPO needs), min_score 0.5
    "NOTEBOOK_HERD": "cpu,dim=64,layers=2,pretrain_steps=150,sft_steps=40,dpo_steps=4,k=4,prompts=32,heldout=64,min_score=0.5",
}


def test_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {"train_and_sample.ipynb", "hf_load_and_generate.ipynb",
                                           "scaling_sweep.ipynb", "posttrain_round.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path, embedded_data_cache):
    book = nbformat.read(path, as_version=4)
    assert book.cells[1].cell_type == "code" and "pip" in book.cells[1].source  # the first code cell installs
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name, value in CI_SIZE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NOTEBOOK_DATA_CACHE", embedded_data_cache)  # the corpus and tokenizer, built once
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
