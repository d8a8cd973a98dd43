"""``python -m tuning.run`` is quiet by default: only our own lines reach the terminal.

Each test runs a real study in a subprocess (its own local Ray), because what
matters is what reaches file descriptors 1 and 2, C++ lines of Ray's core
worker included. :data:`OUR_LINES` lists every line shape our code prints;
any other line on the terminal (a Ray or Ray Data warning, Tune's tables, a
worker's forwarded output, a Python warning) fails the quiet tests, and
``--verbose`` must bring such lines back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.console import LOG_NAME

#: The shapes of the lines our code prints during a study (tuning.run, StudyProgress, the summary
#: table, the feature cache, the dataset's progress bar); a new kind of line must be added here.
OUR_LINES = [re.compile(p) for p in (
    r"$",
    r"(note|log|ray|study|summary|plot|export|release|mlflow|champion|report|error):\s",
    r"interrupted\b",
    r"Heimdall Tune: plan",
    r"  [a-z]+ {2,}\S",  # the plan's rows
    r"(building|built|reusing) feature cache ",
    r"generate dataset \S+: +\d+%\|",  # tqdm, split at each carriage return
    r"\[ *\d+:\d\d\] #\S+ (started|epoch|finished|stopped|FAILED)\b",
    r"best trials by ",
    r"rank +trial +status ",
    r" +\d+ +#\d+ +(complete|stopped|error) ",
    r" +(centre|oracle) +baseline ",
    r"best trial #\d+: ",
    r"  [a-z_]+\.[a-z_]+ = ",  # the best trial's parameters
    r"  checkpoint: ",
)]
#: Shapes of lines that only Ray and the libraries print: Python logging of Ray and Ray Data, C++ glog
#: lines, output forwarded from Ray workers.
RAY_LINES = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR) \S+\.py:\d+ -- |\[[\d\-: ,]+ [IWE] \d+ \d+\] "
                       r"\S+\.cc:\d+:|\((RayTrainWorker|TrainController|ImplicitFunc|\w+) pid=\d+\)")


def _study(data: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "tuning.run", "--smoke-test", "--recordings", "64",
                           "--data-dir", str(data), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _foreign(text: str) -> list[str]:
    """The lines of ``text`` that are not ours (``\\r`` splits progress-bar redraws)."""
    lines = [line.rstrip() for line in re.split(r"\r\n|\r|\n", text)]
    return [line for line in lines if not any(p.match(line) for p in OUR_LINES)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module: the second study reuses the first one's dataset."""
    return tmp_path_factory.mktemp("quiet") / "data"


def test_the_allowlist_rejects_the_lines_ray_printed_before() -> None:
    # Lines a clean run printed before this was quiet: each must count as foreign.
    leaked = [
        "2026-11-30 13:58:00,150\tWARNING util.py:650 -- The argument ``concurrency`` is deprecated in Ray 2.51.",
        "[2026-11-30 13:58:00,303 E 20566 20566] core_worker.cc:2465: Actor with class name: 'MapWorker'",
        "[I 2026-11-30 13:57:37,117] A new study created in RDB with name: q1",
        "2026/11/30 13:57:34 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "│ Configuration for experiment     q1                      │",
        "View detailed results here: /tmp/data/runs/q1",
        "(RayTrainWorker pid=9819) 2026-11-30T14:07:00.003 heimdall: trial 27296c15 rank 0/1",
        "/site-packages/lightning/pytorch/trainer/connectors/result.py:433: PossibleUserWarning: It is recommended",
        "  warnings.warn(",
    ]
    assert _foreign("\n".join(leaked)) == leaked
    assert all(RAY_LINES.search(line) for line in (leaked[0], leaked[1], leaked[6]))


@pytest.mark.ray
@pytest.mark.slow
def test_a_clean_study_prints_only_our_lines_and_keeps_rays_in_its_log(data: Path) -> None:
    done = _study(data, "--dataset", "tiny", "--name", "quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _foreign(done.stdout) == [] and _foreign(done.stderr) == [], done.stdout + done.stderr
    log = data / "studies" / "quiet" / LOG_NAME
    assert f"log:       {log} " in done.stdout
    assert "[  0:" in done.stdout and "best trials by val/nll_km" in done.stdout and "champion:" in done.stdout
    text = log.read_text(encoding="utf-8")
    # Diverted, not dropped: Ray's own lines (its Python logging, the core worker's C++ lines) are in the log.
    assert RAY_LINES.search(text), text[-3000:]
    assert "Progress bars disabled" in text, text[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_verbose_prints_rays_lines_on_the_terminal(data: Path) -> None:
    done = _study(data, "--dataset", "tiny", "--name", "loud", "--verbose", "--no-export")
    assert done.returncode == 0, done.stdout + done.stderr
    foreign = _foreign(done.stdout) + _foreign(done.stderr)
    assert any(RAY_LINES.search(line) for line in foreign), done.stdout + done.stderr
    assert any("pid=" in line for line in foreign), "no worker output was forwarded"
    assert not (data / "studies" / "loud" / LOG_NAME).exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_bad_dataset_is_one_error_on_the_terminal_and_its_details_in_the_log(data: Path) -> None:
    generated = subprocess.run([sys.executable, "-m", "tuning.data", "generate", "--dataset", "broken",
                                "--recordings", "16", "--data-dir", str(data)], capture_output=True, text=True,
                               timeout=300)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    shards = sorted((data / "store" / "datasets" / "broken").glob("*.parquet"))
    assert shards
    content = bytearray(shards[0].read_bytes())
    content[len(content) // 2:len(content) // 2 + 64] = bytes(64)  # same size, other checksum: found by the
    shards[0].write_bytes(bytes(content))                           # Ray Data actors that build the features

    done = _study(data, "--dataset", "broken", "--name", "broken", "--no-export")
    assert done.returncode == 1, done.stdout + done.stderr
    assert _foreign(done.stdout) == [] and _foreign(done.stderr) == [], done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "feature cache of dataset 'broken'" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert RAY_LINES.search((data / "studies" / "broken" / LOG_NAME).read_text(encoding="utf-8"))
