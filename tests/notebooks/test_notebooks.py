"""Every notebook runs top to bottom with smoke settings (RESEARCH_SMOKE=1), started from the
repository's root or from notebooks/ (alternately, so each runs once): its set-up cell finds the
checkout either way."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(REPO, "notebooks")
PATHS = sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


@pytest.mark.parametrize("path, start", [(p, (REPO, NOTEBOOKS)[i % 2]) for i, p in enumerate(PATHS)],
                         ids=[os.path.basename(p) for p in PATHS])
def test_notebook_runs(path, start, monkeypatch):
    monkeypatch.setenv("RESEARCH_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": start}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
