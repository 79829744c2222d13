"""The README's code runs as printed."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_section(heading: str) -> list[str]:
    """Runs the first python block under the README's ``heading``; returns the lines it printed."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.slow  # about 20 s: a ViT, a Llama upcycled and decoded, a ResNet scored
def test_the_library_in_code_runs_and_prints_what_its_comments_say():
    lines = run_section("## The library in code")
    assert lines[0] == "['blocks/0/attn/q', 'blocks/0/attn/v']"
    assert lines[1] == "32 of 128 KV values per token"
    assert len(lines) == 4 and float(lines[3]) > 0


@pytest.mark.slow  # about 15 s: an upcycled Llama through transformers, a LoRA adapter through PEFT's format
def test_the_hugging_face_section_runs_and_prints_what_its_comments_say():
    pytest.importorskip("transformers")
    lines = run_section("## Into the Hugging Face ecosystem")
    assert lines == ["True", "True", "['segments/0/attn/q', 'segments/0/attn/v']"]
