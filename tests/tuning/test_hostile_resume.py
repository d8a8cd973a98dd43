"""A driver killed at the worst moments of a trial's end, then ``--resume``.

Tune and Optuna keep separate books: Optuna commits a trial's end at once,
Tune saves its experiment state (and the results it logged) every few
seconds. Each test runs a real two-trial study as a subprocess whose driver
carries :class:`KillDriver`, a Tune callback that SIGKILLs the driver's whole
process group (the driver and the local Ray it started: a machine losing
power) at one chosen event of trial #0's last epoch:

* ``result-received``: Tune has the last result but has not logged it, Optuna's trial RUNNING;
* ``result-logged``: the result is logged (next controller step), the trial's end not yet told;
* ``optuna-complete``: Optuna recorded the trial COMPLETE, Tune's saved state still has it running
  (the race that made ``report()`` raise ``UpdateFinishedTrialError`` on resume).

Then ``python -m tuning.run --resume`` must finish with both books final and
agreeing, and every trial's epochs logged exactly once.

``python -m tests.tuning.test_hostile_resume POINT MARKER -- ARGS`` is the
driver: ``tuning.run.main(ARGS)`` with the killer armed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray import tune

from tuning.trainer import EPOCHS_METRIC, OPTUNA_NUMBER_KEY

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
POINTS = ("result-received", "result-logged", "optuna-complete")
MAX_EPOCHS = 1
TRIALS = 2
TIMEOUT_S = 420
#: A small, fast space whose every point is valid for a one-epoch run (no MSE warm-up).
SPACE = """\
arch: resnet
fixed:
  loss.mse_warmup_epochs: 0
parameters:
  optimizer.lr: {loguniform: [3.0e-4, 3.0e-3]}
  model.dropout: {uniform: [0.0, 0.3]}
"""


class KillDriver(tune.Callback):
    """SIGKILLs this process group at ``point`` of trial #0's last epoch, once.

    The first kill writes ``marker`` (what Optuna said at that instant); an
    existing marker disarms it, since the resumed Tuner unpickles its
    callbacks, this one included.
    """

    def __init__(self, point: str, marker: str, optuna_url: str, study: str) -> None:
        assert point in POINTS, point
        self.point, self.marker, self.optuna_url, self.study = point, marker, optuna_url, study
        self.logged: Any = None

    def _armed(self, trial: Any) -> bool:
        return trial.config.get(OPTUNA_NUMBER_KEY) == 0 and not os.path.exists(self.marker)

    def _kill(self, trial: Any) -> None:
        number = trial.config[OPTUNA_NUMBER_KEY]
        state = optuna.load_study(study_name=self.study, storage=self.optuna_url).trials[number].state.name
        Path(self.marker).write_text(json.dumps({"point": self.point, "number": number, "optuna_state": state}))
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._armed(trial) and result.get(EPOCHS_METRIC, 0) >= MAX_EPOCHS:
            if self.point == "result-received":
                self._kill(trial)
            elif self.point == "result-logged":
                self.logged = trial  # Tune's loggers run after this callback, in the same step

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.logged is not None and self._armed(self.logged):
            self._kill(self.logged)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.point == "optuna-complete" and self._armed(trial):
            self._kill(trial)  # the searcher has told Optuna already: it runs before the callbacks


def _args(tmp_path: Path, shared: Path) -> list[str]:
    return ["--space", str(shared / "tiny.yaml"), "--recordings", "64", "--dataset", "tiny", "--trials", str(TRIALS), "--max-epochs", str(MAX_EPOCHS),
            "--time-budget", "none", "--no-export", "--name", "study", "--data-dir", str(tmp_path),
            "--catalog", f"sqlite:///{shared / 'catalog.db'}", "--store", str(shared / "store"),
            "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Catalogue, store and space shared by the module's studies: the dataset and its features are built once."""
    shared = tmp_path_factory.mktemp("shared-data")
    (shared / "tiny.yaml").write_text(SPACE)
    return shared


def _run_killed_driver(args: list[str], point: str, marker: Path) -> subprocess.CompletedProcess:
    driver = subprocess.Popen([sys.executable, "-m", "tests.tuning.test_hostile_resume", point, str(marker), "--",
                               *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        out, _ = driver.communicate(timeout=TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return subprocess.CompletedProcess(driver.args, driver.returncode, out, "")


@pytest.mark.parametrize("point", POINTS)
def test_resume_after_the_driver_is_killed_neither_loses_nor_reruns_trials(
    point: str, shared: Path, tmp_path: Path
) -> None:
    args, marker, optuna_url = _args(tmp_path, shared), tmp_path / "killed.json", f"sqlite:///{tmp_path / 'optuna.db'}"
    started = time.monotonic()
    killed = _run_killed_driver(args, point, marker)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    at_kill = json.loads(marker.read_text())
    expected = "COMPLETE" if point == "optuna-complete" else "RUNNING"
    assert at_kill["optuna_state"] == expected, at_kill

    resumed = subprocess.run([sys.executable, "-m", "tuning.run", *args, "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "UpdateFinishedTrialError" not in resumed.stdout + resumed.stderr

    # Both books final and agreeing: every Optuna trial ended, one COMPLETE per Tune trial, same values.
    study = optuna.load_study(study_name="study", storage=optuna_url)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, states
    complete = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    summary = json.loads((tmp_path / "studies" / "study" / "summary.json").read_text())
    assert summary["tune_trials"] == TRIALS and sorted(complete) == list(range(TRIALS)), (summary, states)
    assert summary["tune_status"]["error"] == 0
    assert sorted(summary["optuna_orphans_failed"]) == [
        t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    for row in summary["trials"]:
        assert row["value"] == pytest.approx(complete[row["number"]]), (row, complete)

    # Every trial's epochs logged once, in order: none lost, none replayed.
    for number in range(TRIALS):
        result = next((tmp_path / "runs" / "study").glob(f"trial-{number:04d}-*/result.json"))
        epochs = [json.loads(line)[EPOCHS_METRIC] for line in result.read_text().splitlines()]
        assert epochs == list(range(1, MAX_EPOCHS + 1)), (number, epochs)
    print(f"{point}: killed and resumed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    from tuning.run import main

    point_, marker_, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    url = argv[argv.index("--optuna-storage") + 1]
    sys.exit(main(argv, callbacks=[KillDriver(point_, marker_, url, argv[argv.index("--name") + 1])]))
