"""Trials in Optuna the way its own pruners leave them: PRUNED, COMPLETE, FAIL, or still RUNNING.

The searcher-level tests drive :class:`tuning.study.tune.StudySearch` with the
calls Tune makes (results, then the end); the ``ray`` test runs a real study
whose ASHA stops trials, interrupts it with SIGINT and resumes it.

``python -m tests.tuning.study.test_pruning -- ARGS`` is the interrupted driver:
``tuning.run.main(ARGS)`` with :class:`InterruptAt` armed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray import tune

from tuning.study.spaces import load_space
from tuning.study.trial import EPOCHS_METRIC, OPTUNA_NUMBER_KEY
from tuning.study.tune import (
    INTERRUPTED_ATTR,
    STOPPING,
    StudyConfig,
    make_searcher,
    open_optuna_storage,
    prune_stopped,
)

REPO = Path(__file__).resolve().parents[3]
State = optuna.trial.TrialState
METRIC = "val/nll_km"
#: A fast space whose learning rate spans two decades, so ASHA has slow learners to stop.
SPACE = """\
arch: resnet
fixed:
  loss.mse_warmup_epochs: 0
parameters:
  optimizer.lr: {loguniform: [1.0e-5, 3.0e-3]}
  model.dropout: {uniform: [0.0, 0.3]}
"""
MAX_EPOCHS = 2
TRIALS = 4
#: The driver is interrupted when this trial starts (two trials are then over, one is running).
INTERRUPT_AT = 2
#: Generous: on a loaded 2-core machine a trial's Train workers can take minutes to start.
TIMEOUT_S = 1200


def _searcher(tmp_path: Path, n: int, max_epochs: int = 3) -> tuple[Any, optuna.storages.BaseStorage]:
    (tmp_path / "tiny.yaml").write_text(SPACE)
    storage = open_optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    config = StudyConfig(name="study", space=str(tmp_path / "tiny.yaml"), max_epochs=max_epochs)
    searcher = make_searcher(config, load_space(config.space), storage)
    for i in range(n):
        assert searcher.suggest(f"t{i}")[OPTUNA_NUMBER_KEY] == i
    return searcher, storage


def _result(value: float, epoch: int) -> dict[str, Any]:
    return {METRIC: value, EPOCHS_METRIC: epoch, "training_iteration": epoch}


def _trials(storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="study", storage=storage).trials


def test_each_end_is_told_as_optuna_would_record_it(tmp_path: Path) -> None:
    searcher, storage = _searcher(tmp_path, 4)
    # t0 runs all three epochs; Tune passes every result, the last one again at the end.
    for epoch, value in enumerate((9.0, 8.0, 7.5), 1):
        searcher.on_trial_result("t0", _result(value, epoch))
    searcher.on_trial_complete("t0", _result(7.5, 3))
    # t1: ASHA stops it on its first result, which Tune then gives only to on_trial_complete.
    searcher.on_trial_complete("t1", _result(12.0, 1))
    # t2: stopped at the second rung after one passed result.
    searcher.on_trial_result("t2", _result(10.0, 1))
    searcher.on_trial_complete("t2", _result(9.5, 2))
    # t3 fails.
    searcher.on_trial_result("t3", _result(11.0, 1))
    searcher.on_trial_complete("t3", error=True)

    t0, t1, t2, t3 = _trials(storage)
    assert (t0.state, t0.value, t0.intermediate_values) == (State.COMPLETE, 7.5, {1: 9.0, 2: 8.0, 3: 7.5})
    assert (t1.state, t1.value, t1.intermediate_values) == (State.PRUNED, 12.0, {1: 12.0})
    assert (t2.state, t2.value, t2.intermediate_values) == (State.PRUNED, 9.5, {1: 10.0, 2: 9.5})
    assert (t3.state, t3.value, t3.intermediate_values) == (State.FAIL, None, {1: 11.0})


def test_a_trial_stopped_at_max_epochs_by_the_scheduler_is_complete_with_every_epoch(tmp_path: Path) -> None:
    searcher, storage = _searcher(tmp_path, 1, max_epochs=2)
    searcher.on_trial_result("t0", _result(9.0, 1))
    searcher.on_trial_complete("t0", _result(8.0, 2))  # ASHA's STOP at max_t: the result went nowhere else
    (t0,) = _trials(storage)
    assert (t0.state, t0.value, t0.intermediate_values) == (State.COMPLETE, 8.0, {1: 9.0, 2: 8.0})


def test_an_interrupted_trial_stays_running_and_a_finished_one_is_not_rewritten(tmp_path: Path) -> None:
    searcher, storage = _searcher(tmp_path, 2)
    searcher.on_trial_complete("t0", _result(12.0, 1))
    # A resumed Tune replays t0's last result and end: Optuna's PRUNED trial stays as it was.
    searcher.on_trial_result("t0", _result(11.0, 2))
    searcher.on_trial_complete("t0", _result(11.0, 2))
    searcher.on_trial_result("t1", _result(9.0, 1))
    STOPPING.set()
    try:
        searcher.on_trial_complete("t1", error=True)  # the trial function killed by the interruption
    finally:
        STOPPING.clear()
    t0, t1 = _trials(storage)
    assert (t0.state, t0.value, t0.intermediate_values) == (State.PRUNED, 12.0, {1: 12.0})
    assert (t1.state, t1.intermediate_values) == (State.RUNNING, {1: 9.0})


def test_trials_the_time_budget_stopped_are_pruned_or_failed_without_a_value(tmp_path: Path) -> None:
    searcher, storage = _searcher(tmp_path, 3)
    searcher.on_trial_result("t0", _result(9.0, 1))  # then the budget ran out: Tune tells the searcher nothing
    # t1 started but reported nothing; t2 stays RUNNING: it is not among the stopped trials.
    assert prune_stopped(storage, "study", {0, 1}) == [0, 1]
    t0, t1, t2 = _trials(storage)
    assert (t0.state, t0.value) == (State.PRUNED, 9.0)
    assert t1.state == State.FAIL and t2.state == State.RUNNING
    assert prune_stopped(storage, "study", {0, 1}) == []


def test_tpe_ranks_pruned_trials_by_their_intermediate_values(tmp_path: Path) -> None:
    """Optuna's TPE splits PRUNED trials by (deepest epoch, value there): what ASHA-stopped trials now give it."""
    from optuna.samplers._tpe.sampler import _split_trials

    searcher, storage = _searcher(tmp_path, 3)
    searcher.on_trial_complete("t0", _result(12.0, 1))
    searcher.on_trial_result("t1", _result(11.0, 1))
    searcher.on_trial_complete("t1", _result(9.0, 2))
    searcher.on_trial_complete("t2", _result(10.0, 1))
    study = optuna.load_study(study_name="study", storage=storage)
    below, above = _split_trials(study, study.get_trials(states=(State.PRUNED,)), n_below=2)
    assert [t.number for t in below] == [1, 2] and [t.number for t in above] == [0]


class InterruptAt(tune.Callback):
    """Sends this driver SIGINT (what Ctrl-C does) when trial ``number`` starts, once (a marker file disarms it)."""

    def __init__(self, number: int, marker: str) -> None:
        self.number, self.marker = number, marker

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.config.get(OPTUNA_NUMBER_KEY) == self.number and not os.path.exists(self.marker):
            Path(self.marker).write_text("interrupted")
            os.kill(os.getpid(), signal.SIGINT)


def _snapshot(trial: optuna.trial.FrozenTrial) -> tuple[str, float | None, dict[int, float]]:
    return trial.state.name, trial.value, dict(trial.intermediate_values)


@pytest.mark.ray
def test_a_study_records_asha_stopped_trials_as_pruned_and_a_resume_keeps_them(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(SPACE)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--space", str(tmp_path / "tiny.yaml"), "--recordings", "64", "--dataset", "tiny",
            "--trials", str(TRIALS), "--max-epochs", str(MAX_EPOCHS), "--time-budget", "none", "--no-export",
            "--name", "study", "--data-dir", str(tmp_path), "--optuna-storage", url,
            # A rung after 1 epoch (the default, 2, equals MAX_EPOCHS: nothing would be stopped); one trial
            # at a time, so that trials 0 and 1 are over when trial 2 starts.
            "--grace-period", "1", "--max-concurrent", "1"]
    first = subprocess.run([sys.executable, "-m", "tests.tuning.study.test_pruning", str(tmp_path / "marker"), "--",
                            *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    (tmp_path / "first.log").write_text(first.stdout + first.stderr)
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    before = {t.number: t for t in optuna.load_study(study_name="study", storage=url).trials}
    assert all(before[n].state.is_finished() for n in range(INTERRUPT_AT)), before
    assert before[INTERRUPT_AT].state == State.RUNNING and INTERRUPTED_ATTR in before[INTERRUPT_AT].system_attrs

    resumed = subprocess.run([sys.executable, "-m", "tuning.run", *args, "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    trials = optuna.load_study(study_name="study", storage=url).trials
    for n in range(INTERRUPT_AT):  # finished before the interruption: untouched by the resume
        assert _snapshot(trials[n]) == _snapshot(before[n])
    rows = {r["number"]: r for r in json.loads((tmp_path / "studies" / "study" / "summary.json").read_text())["trials"]}
    assert sorted(rows) == list(range(TRIALS)) == [t.number for t in trials]
    for t in trials:
        row = rows[t.number]
        epochs = list(range(1, row["epochs"] + 1))
        assert sorted(t.intermediate_values) == epochs, (t.number, t.intermediate_values, row)
        assert t.value == t.intermediate_values[row["epochs"]]
        assert t.state == {"complete": State.COMPLETE, "stopped": State.PRUNED}[row["status"]], (t.number, row)
    states = [t.state for t in trials]
    assert State.PRUNED in states and State.COMPLETE in states, states


if __name__ == "__main__":
    from tuning.run import main

    marker_, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    sys.exit(main(argv, callbacks=[InterruptAt(INTERRUPT_AT, marker_)]))
