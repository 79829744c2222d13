"""Runs notebooks top to bottom at full size (no ``RESEARCH_SMOKE``) and stores their outputs in
the files, so a reader sees results on the repository's page without running anything.

    python -m tools.run_notebooks                          # every notebook in notebooks/
    python -m tools.run_notebooks notebooks/quickstart.ipynb --timeout 1800

Each notebook runs in a fresh kernel started at the repository's root. Before a notebook is
written back its outputs are made portable:
- stderr streams (progress bars, warnings that quote the installed packages' paths) are dropped;
- the folders named by ``$RESEARCH_DATA_DIR``, ``$RESEARCH_CACHE_DIR`` and ``$HF_HOME`` become those
  names, the checkout's absolute path ``.``, paths under the temporary folder ``<tmp>/...`` and the
  home folder ``~``, so no output names the machine it ran on.
A notebook that raises is not written (its old outputs stay) and the command exits with 1.
Prints each notebook's wall time.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import time

from research.core.records import write_text_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
FOLDER_VARIABLES = ("RESEARCH_DATA_DIR", "RESEARCH_CACHE_DIR", "HF_HOME")  # shown by name, not by value


def path_patterns(pairs) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) for each (absolute folder, replacement) pair, in order: a folder matches
    only as a whole path component, so '/tmp' leaves '/tmpx' alone."""
    seen, out = set(), []
    for path, replacement in pairs:
        if os.path.isabs(path) and path != os.sep and path not in seen:  # a relative value is not a machine path
            seen.add(path)
            out.append((re.compile(re.escape(path) + r"(?=[/\\\s'\"),:;\]]|$)"), replacement))
    return out


def _machine_paths() -> list[tuple[re.Pattern, str]]:
    """The folders of this machine, most specific first: the named variables, the checkout, the
    temporary folder, home."""
    pairs = [(os.environ.get(name, ""), f"${name}") for name in FOLDER_VARIABLES]
    pairs += [(REPO, "."), (os.path.realpath(tempfile.gettempdir()), "<tmp>"), (tempfile.gettempdir(), "<tmp>"),
              (os.path.expanduser("~"), "~")]
    return path_patterns(pairs)


def scrub(notebook, patterns=None) -> int:
    """Drops stderr streams and replaces machine paths in the text of every output, in place.
    Returns the number of outputs changed or dropped."""
    patterns = _machine_paths() if patterns is None else patterns
    changed = 0

    def clean(text: str) -> str:
        for pattern, replacement in patterns:
            text = pattern.sub(replacement, text)
        return text

    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                changed += 1
                continue
            before = repr(output)
            if "text" in output:
                output["text"] = clean(output["text"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output["data"][mime] = clean(value)
            if "traceback" in output:
                output["traceback"] = [clean(line) for line in output["traceback"]]
            changed += repr(output) != before
            kept.append(output)
        cell["outputs"] = kept
    return changed


def run(path: str, timeout: int) -> float:
    """Executes ``path`` from the repository's root and writes it back with scrubbed outputs.
    Returns the seconds it took; raises nbclient's CellExecutionError when a cell fails."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env_smoke = os.environ.pop("RESEARCH_SMOKE", None)  # full size, whatever the caller's shell says
    start = time.perf_counter()
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": REPO}}).execute()
    finally:
        if env_smoke is not None:
            os.environ["RESEARCH_SMOKE"] = env_smoke
    seconds = time.perf_counter() - start
    scrub(notebook)
    write_text_atomic(path, nbformat.writes(notebook) + "\n")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=NOTEBOOKS, help="notebooks (default: all of notebooks/)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.paths:
        if not os.path.isfile(path):
            print(f"error: notebook '{path}' not found", file=sys.stderr)
            return 2
        try:
            seconds = run(path, args.timeout)
        except Exception as e:  # a failing cell: keep the stored outputs, go on with the next notebook
            failed += 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"{os.path.relpath(path, REPO)}: failed, not written ({first})", flush=True)
            continue
        print(f"{os.path.relpath(path, REPO)}: {seconds / 60:.1f} min, outputs stored", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
