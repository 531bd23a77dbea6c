"""README.md's examples run, so that the guide cannot drift from the code.

Every ```python block and every ```bash block runs, except those marked ``<!-- not run: REASON -->`` on the line
before (they need the network, a GPU, a dataset or an optional runtime). They run in order, in one temporary
folder that holds ``model_cards/`` as a clone does, offline (``SEGTORCH_OFFLINE=1``, an empty ``SEGTORCH_HOME``),
against the segtorch under test. ``pip install`` steps are not run: the package under test is installed already.
A ```text block marked ``<!-- output of the command above -->`` is what the bash block before it prints: it is
compared line by line, with times and speeds (which vary) and the package's own folder masked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
OUTPUT_OF_ABOVE = "<!-- output of the command above -->"
# what varies from run to run in a command's output: durations, rates, estimated times, where segtorch is installed
VARYING = [(re.compile(r"\d+(\.\d+)?\s?(s/iter|img/s|images/s|s)\b"), "<time>"),
           (re.compile(r"eta \d+:\d\d:\d\d"), "eta <time>"),
           (re.compile(r"\S*/model_cards/"), ".../model_cards/")]


def readme_blocks(text: str) -> list[tuple[str, str, str | None, int]]:
    """(language, code, reason it is not run or None, line number) of each fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening.group(1):
            i += 1
            continue
        marker = NOT_RUN.search(lines[i - 1]) if i else None
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append((opening.group(1), "\n".join(body) + "\n", marker.group(1) if marker else None, start))
        i += 1
    return blocks


def without_pip_install(script: str) -> str:
    """The script with its ``pip install ...`` steps left out (``pip install X && cmd`` keeps ``cmd``)."""
    kept = []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("pip install"):
            _, sep, rest = stripped.partition("&&")
            line = rest.strip() if sep else ""
        kept.append(line)
    return "\n".join(kept) + "\n"


def masked(output: str) -> list[str]:
    lines = []
    for line in output.strip().splitlines():
        for pattern, replacement in VARYING:
            line = pattern.sub(replacement, line)
        lines.append(line.rstrip())
    return lines


def runnable_blocks() -> list:
    """(language, code, the output it must print or None) of each block that runs."""
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = readme_blocks(text)
    params = []
    for i, (language, code, reason, line) in enumerate(blocks):
        if language not in ("python", "bash"):
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        expected = None
        if following and following[0] == "text" and OUTPUT_OF_ABOVE in lines[following[3] - 2]:
            expected = following[1]
        marks = [pytest.mark.skip(reason=f"README.md:{line}: {reason}")] if reason else []
        params.append(pytest.param(language, code, expected, marks=marks, id=f"line{line}-{language}"))
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "model_cards").symlink_to(ROOT / "model_cards")
    return folder


def test_the_readme_has_runnable_examples():
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b[0] in ("python", "bash")]
    assert sum(1 for b in blocks if b[2] is None) >= 4, "README.md should show examples that run offline"
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300, "README.md is a short guide"


def test_readme_marker_parsing():
    text = "x\n<!-- not run: needs the network -->\n```bash\nsegtorch download a\n```\n```python\nprint(1)\n```\n"
    assert readme_blocks(text) == [("bash", "segtorch download a\n", "needs the network", 3),
                                   ("python", "print(1)\n", None, 6)]
    assert without_pip_install("pip install . && segtorch list\npip install x\nls\n") == "segtorch list\n\nls\n"
    assert masked("iter 2/4 loss 1.5 6.075 s/iter, 0.3 img/s, eta 0:00:12\ninit: /a/b/model_cards/demo/x (3)") == \
        ["iter 2/4 loss 1.5 <time>, <time>, eta <time>", "init: .../model_cards/demo/x (3)"]


@pytest.mark.parametrize("language,code,expected", runnable_blocks())
def test_readme_block_runs(language, code, expected, workdir):
    env = {**os.environ, "SEGTORCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "SEGTORCH_HOME": str(workdir / "home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        bin_dir = str(Path(sys.executable).parent)  # `segtorch` and `python` of the environment under test
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        command = ["bash", "-euo", "pipefail", "-c", without_pip_install(code)]
    done = subprocess.run(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}"
    if expected is not None:
        assert masked(done.stdout) == masked(expected), f"README.md's printed output is not what it prints:\n{done.stdout}"
