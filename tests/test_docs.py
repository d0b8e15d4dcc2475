"""Every code block of README.md and docs/*.md runs as written, offline, in the project's environment: a python
block in a fresh interpreter, a bash block in bash with the venv first on PATH, both from the repository root. A
block that needs data, the internet, hardware or much time says so in its first line (``# needs: …``) and is
skipped, as is one preceded by ``<!-- docs-test: skip (reason) -->`` (the two commands, which run this test)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
HIDDEN_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")


def code_blocks():
    for page in PAGES:
        lines = page.read_text().split("\n")
        index = 0
        while index < len(lines):
            match = FENCE.match(lines[index])
            if not match:
                index += 1
                continue
            end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
            language, body = match.group(1), "\n".join(lines[index + 1:end])
            if language in ("python", "bash"):
                before = lines[index - 1] if index else ""
                skip = HIDDEN_SKIP.search(before)
                first = body.lstrip().split("\n")[0]
                reason = skip.group(1) if skip else (first[2:].strip() if first.startswith("# needs:") else None)
                yield pytest.param(language, body, reason, id=f"{page.relative_to(ROOT)}:{index + 1}")
            index = end + 1


BLOCKS = list(code_blocks())


def test_the_pages_have_runnable_blocks():
    runnable = [b for b in BLOCKS if b.values[2] is None]
    assert len(runnable) >= 10 and {b.values[0] for b in runnable} == {"python", "bash"}


@pytest.mark.parametrize("language, body, reason", BLOCKS)
def test_code_block_runs(language, body, reason):
    if reason:
        pytest.skip(reason)
    (ROOT / "outputs").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    command = [sys.executable, "-c", body] if language == "python" else ["bash", "-eo", "pipefail", "-c", body]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{language} block failed:\n{body}\n--- stderr ---\n{result.stderr[-4000:]}"
