"""The outputs stored in the notebooks (tools/run_notebooks.py) come from one top-to-bottom run
that raised nothing, and name no folder of the machine they ran on."""
import glob
import json
import os
import re

import nbformat
import pytest

from tools import run_notebooks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATHS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
MACHINE_PATH = re.compile(r"(/tmp/|/home/|/root/|/Users/|/private/var/|site-packages|\.venv/|[A-Z]:\\\\|"
                          + re.escape(REPO) + ")")  # and this checkout's own absolute path


def _texts(output) -> list[str]:
    texts = [output.get("text", "")] + list(output.get("traceback", []))
    texts += [v for k, v in output.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)]
    return texts


@pytest.mark.parametrize("path", PATHS, ids=[os.path.basename(p) for p in PATHS])
def test_stored_outputs_come_from_one_clean_run_and_name_no_machine_path(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert any(c.outputs for c in code), "no stored outputs: python -m tools.run_notebooks " + os.path.basename(path)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "cells ran out of order or not at all"
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error", "".join(output.get("traceback", []))[:500]
            assert not (output.output_type == "stream" and output.name == "stderr")
            for text in _texts(output):
                found = MACHINE_PATH.search(text)
                assert found is None, f"{os.path.basename(path)} names a machine path: ...{text[max(found.start() - 60, 0):found.end() + 60]}..."


def test_scrub_drops_stderr_and_replaces_the_checkout_temporary_and_home_folders():
    tmp, home = "/var/folders/xy/T", "/home/someone"
    patterns = run_notebooks.path_patterns([(run_notebooks.REPO, "."), (tmp, "<tmp>"), (home, "~")])
    cell = nbformat.v4.new_code_cell("print()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="train: 100%|##| 10/10\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"wrote {run_notebooks.REPO}/runs/a and {tmp}/b7x/c\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"'{home}/.cache/research'"}, execution_count=1),
        nbformat.v4.new_output("stream", name="stdout", text=f"{tmp}x is another folder\n"),
    ]
    notebook = nbformat.v4.new_notebook(cells=[cell])
    assert run_notebooks.scrub(notebook, patterns) == 3
    texts = [json.dumps(o) for o in cell.outputs]
    assert len(cell.outputs) == 3
    assert "wrote ./runs/a and <tmp>/b7x/c" in texts[0]
    assert "'~/.cache/research'" in texts[1]
    assert f"{tmp}x is another folder" in texts[2]  # a longer name that merely starts the same is left alone
