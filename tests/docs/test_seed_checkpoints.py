"""docs/seed-checkpoints.md runs as written.

Every ```bash and ```python block runs in order, each in its own process, in a
temporary working directory, with the embedded defaults: no HEIMDALL_*, MLFLOW_*,
Ray-address or S3-key variable from the caller, and ``HEIMDALL_DATA_DIR``
pointing at a temporary data directory (the doc's ``/tmp/heimdall-seed`` is
replaced by it too, so its ``export`` line stays copy-pasteable). Each block must
exit 0, and every line of the ```output block that follows it must appear in
what it printed. Blocks tagged ``ray`` (```bash ray) start a local Ray and run
only in the ``ray``-marked test, in a directory of their own.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "seed-checkpoints.md"
DOC_DATA_DIR = "/tmp/heimdall-seed"
RUNNABLE = ("bash", "python")
FENCE = re.compile(r"^```([A-Za-z]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# Variables that would point a block away from the embedded defaults.
CALLER_ONLY = re.compile(r"^(HEIMDALL_|MLFLOW_)|^(RAY_ADDRESS|RAY_API_SERVER_ADDRESS|AWS_ACCESS_KEY_ID|"
                         r"AWS_SECRET_ACCESS_KEY|AWS_ENDPOINT_URL)$")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    lang: str
    tags: tuple[str, ...]
    code: str
    line: int
    expect: list[str] = field(default_factory=list)


def doc_blocks(text: str) -> list[Block]:
    """Runnable blocks in document order, each with the lines its ```output block claims."""
    blocks: list[Block] = []
    for m in FENCE.finditer(text):
        lang, tags, code = m.group(1), tuple(m.group(2).split()), m.group(3)
        line = text.count("\n", 0, m.start()) + 1
        if lang == "output":
            assert blocks and blocks[-1].line < line, f"line {line}: an output block must follow a runnable block"
            blocks[-1].expect += [s.strip() for s in code.splitlines() if s.strip()]
        elif lang in RUNNABLE:
            blocks.append(Block(lang, tags, code, line))
    return blocks


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not CALLER_ONLY.search(k)}
    env["HEIMDALL_DATA_DIR"] = str(data_dir)
    # The checkout under test, and its interpreter as the blocks' `python`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def _run(block: Block, cwd: Path, data_dir: Path) -> None:
    code = block.code.replace(DOC_DATA_DIR, str(data_dir))
    if block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = cwd / f"block_line{block.line}.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    where = f"docs/seed-checkpoints.md line {block.line} ({block.lang})"
    tail = f"--- output (tail) ---\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{code}\n{tail}"
    missing = [s for s in block.expect if s not in proc.stdout]
    assert not missing, f"{where} did not print {missing}:\n{tail}"


def _blocks(ray: bool) -> list[Block]:
    return [b for b in doc_blocks(DOC.read_text(encoding="utf-8")) if ("ray" in b.tags) == ray]


def test_the_doc_maps_every_checkpoint_and_task_and_claims_only_checked_output() -> None:
    text = DOC.read_text(encoding="utf-8")
    headings = re.findall(r"^#{2,4} (\S+)", text, re.M)
    expected = [f"CP5.{i}" for i in range(1, 6)] + [f"T5.{i}" for i in range(1, 11)]
    assert [h for h in headings if re.fullmatch(r"(CP|T)5\.\d+", h)] == expected
    blocks = doc_blocks(text)
    assert blocks[0].lang == "bash" and f"export HEIMDALL_DATA_DIR={DOC_DATA_DIR}" in blocks[0].code
    assert any("ray" in b.tags for b in blocks)
    langs = set(re.findall(r"^```([A-Za-z]+)", text, re.M))
    assert langs <= {*RUNNABLE, "output", "console"}, langs
    # The doc stands alone: it names no file outside the project (the plan's own file, the team's folder).
    assert not re.search(r"SEED\.md|\.\./share", text)


def test_every_block_but_the_study_runs_as_written(tmp_path: Path) -> None:
    blocks = _blocks(ray=False)
    assert len(blocks) >= 8
    for block in blocks:
        _run(block, tmp_path, tmp_path / "heimdall-seed")


@pytest.mark.ray
def test_the_study_block_runs_as_written(tmp_path: Path) -> None:
    """A fresh data directory: the study generates its dataset on first use."""
    for block in _blocks(ray=True):
        _run(block, tmp_path, tmp_path / "heimdall-seed")
