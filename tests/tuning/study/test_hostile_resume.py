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
  (the race that made ``report()`` raise ``UpdateFinishedTrialError`` on resume);
* ``optuna-complete-synced``: the same, after Tune's background sync copied the trial's logged
  results (not yet its state) to the run storage: the trial must be closed, not rerun, and the
  study must go on to its next trial (the concurrency slot it held is freed).

Then ``python -m tuning.run --resume`` must finish with both books final and
agreeing, and every trial's epochs logged exactly once.

``python -m tests.tuning.study.test_hostile_resume POINT MARKER -- ARGS`` is the
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
import pyarrow.fs
import pytest
from ray import tune

from tuning.study.spaces import load_space
from tuning.study.trial import EPOCHS_METRIC, OPTUNA_NUMBER_KEY
from tuning.study.tune import INTERRUPTED_ATTR, StudyConfig, make_searcher, mark_interrupted, open_optuna_storage

REPO = Path(__file__).resolve().parents[3]
POINTS = ("result-received", "result-logged", "optuna-complete", "optuna-complete-synced")
MAX_EPOCHS = 1
#: One trial where the resume only has to finish trial #0; two where it must also go on.
TRIALS = {"result-received": 1, "result-logged": 1, "optuna-complete": 1, "optuna-complete-synced": 2}
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
        if self.point.startswith("optuna-complete") and self._armed(trial):
            if self.point == "optuna-complete-synced":  # what Tune's syncer does, minus the state file
                storage = trial.storage
                pyarrow.fs.copy_files(f"{storage.trial_driver_staging_path}/result.json",
                                      f"{storage.trial_fs_path}/result.json",
                                      destination_filesystem=storage.storage_filesystem)
            self._kill(trial)  # the searcher has told Optuna already: it runs before the callbacks


def _args(tmp_path: Path, shared: Path, trials: int) -> list[str]:
    return ["--space", str(shared / "tiny.yaml"), "--recordings", "64", "--dataset", "tiny", "--trials", str(trials), "--max-epochs", str(MAX_EPOCHS),
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
    driver = subprocess.Popen([sys.executable, "-m", "tests.tuning.study.test_hostile_resume", point, str(marker), "--",
                               *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        out, _ = driver.communicate(timeout=TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return subprocess.CompletedProcess(driver.args, driver.returncode, out, "")


def _searcher_with_a_trial(tmp_path: Path) -> tuple[Any, Any, str]:
    (tmp_path / "tiny.yaml").write_text(SPACE)
    storage = open_optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    config = StudyConfig(name="study", space=str(tmp_path / "tiny.yaml"))
    searcher = make_searcher(config, load_space(config.space), storage)
    assert searcher.suggest("t0")[OPTUNA_NUMBER_KEY] == 0
    return searcher, storage, config.objective_spec.metric


def test_a_result_replayed_into_a_trial_optuna_finished_is_dropped_not_raised(tmp_path: Path) -> None:
    searcher, storage, metric = _searcher_with_a_trial(tmp_path)
    searcher.on_trial_result("t0", {metric: 9.0, EPOCHS_METRIC: 1, "training_iteration": 1})
    # The killed driver told Optuna after Tune saved this searcher's state: the searcher does not know.
    optuna.load_study(study_name="study", storage=storage).tell(0, 9.0)
    # What a resumed Tune replays for that trial (plain OptunaSearch raised UpdateFinishedTrialError
    # here and ended the study).
    searcher.on_trial_result("t0", {metric: 7.0, EPOCHS_METRIC: 1, "training_iteration": 1})
    searcher.on_trial_complete("t0", {metric: 7.0, EPOCHS_METRIC: 1})
    trial = optuna.load_study(study_name="study", storage=storage).trials[0]
    assert trial.value == 9.0 and trial.intermediate_values == {1: 9.0}


def test_intermediate_values_are_keyed_by_epoch_across_a_restarted_trial_function(tmp_path: Path) -> None:
    searcher, storage, metric = _searcher_with_a_trial(tmp_path)
    searcher.on_trial_result("t0", {metric: 9.0, EPOCHS_METRIC: 1, "training_iteration": 1})
    # Restarted from its epoch-1 checkpoint, the trial function counts Tune iterations from 1 again.
    searcher.on_trial_result("t0", {metric: 8.0, EPOCHS_METRIC: 2, "training_iteration": 1})
    trial = optuna.load_study(study_name="study", storage=storage).trials[0]
    assert trial.intermediate_values == {1: 9.0, 2: 8.0}


def test_interrupted_trials_stay_resumable_and_orphans_fail(tmp_path: Path) -> None:
    searcher, storage, _ = _searcher_with_a_trial(tmp_path)
    searcher.suggest("t1")  # asked, but Tune never saved a trial for it
    assert mark_interrupted(storage, "study", tune_numbers={0}) == [0]
    trials = optuna.load_study(study_name="study", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]
    assert INTERRUPTED_ATTR in trials[0].system_attrs
    # --resume reports into the interrupted trial as usual.
    searcher.on_trial_complete("t0", {"val/nll_km": 5.0, EPOCHS_METRIC: 1})
    assert optuna.load_study(study_name="study", storage=storage).trials[0].value == 5.0


@pytest.mark.ray
@pytest.mark.parametrize("point", POINTS)
def test_resume_after_the_driver_is_killed_neither_loses_nor_reruns_trials(
    point: str, shared: Path, tmp_path: Path
) -> None:
    trials = TRIALS[point]
    args, marker, optuna_url = _args(tmp_path, shared, trials), tmp_path / "killed.json", f"sqlite:///{tmp_path / 'optuna.db'}"
    started = time.monotonic()
    killed = _run_killed_driver(args, point, marker)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    at_kill = json.loads(marker.read_text())
    expected = "COMPLETE" if point.startswith("optuna-complete") else "RUNNING"
    assert at_kill["optuna_state"] == expected, at_kill

    resumed = subprocess.run([sys.executable, "-m", "tuning.run", *args, "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    (tmp_path / "killed.log").write_text(killed.stdout)
    (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "UpdateFinishedTrialError" not in resumed.stdout + resumed.stderr

    # Both books final and agreeing: every Optuna trial ended, one COMPLETE per Tune trial, same values.
    study = optuna.load_study(study_name="study", storage=optuna_url)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, states
    complete = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    summary = json.loads((tmp_path / "studies" / "study" / "summary.json").read_text())
    assert summary["tune_trials"] == trials and sorted(complete) == list(range(trials)), (summary, states)
    assert summary["tune_status"]["error"] == 0
    assert sorted(summary["optuna_orphans_failed"]) == [
        t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    for row in summary["trials"]:
        assert row["value"] == pytest.approx(complete[row["number"]]), (row, complete)

    # Every trial's epochs logged once, in order: none lost, none replayed.
    for number in range(trials):
        result = next((tmp_path / "runs" / "study").glob(f"trial-{number:04d}-*/result.json"))
        epochs = [json.loads(line)[EPOCHS_METRIC] for line in result.read_text().splitlines()]
        assert epochs == list(range(1, MAX_EPOCHS + 1)), (number, epochs)
    if point == "optuna-complete-synced":
        assert "resume:    #0 finished in Optuna, closed in Tune's state" in resumed.stdout, resumed.stdout[-3000:]
    how = next((line for line in resumed.stdout.splitlines() if line.startswith("resume:")), "resume:    no change")
    print(f"{point}: killed and resumed in {time.monotonic() - started:.0f} s; {how}")


if __name__ == "__main__":
    from tuning.run import main

    point_, marker_, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    url = argv[argv.index("--optuna-storage") + 1]
    sys.exit(main(argv, callbacks=[KillDriver(point_, marker_, url, argv[argv.index("--name") + 1])]))
