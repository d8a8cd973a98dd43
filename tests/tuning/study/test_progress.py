"""The study's progress lines (StudyProgress) with trials created before they start."""
from __future__ import annotations

from ray.tune.experiment import Trial

from tuning.study.trial import OBJECTIVES, OPTUNA_NUMBER_KEY
from tuning.study.tune import StudyProgress


def test_two_trials_created_together_are_counted_by_their_starts() -> None:
    lines: list[str] = []
    progress = StudyProgress(OBJECTIVES["nll"], trials=8, max_epochs=4, write=lines.append)
    trials = [Trial("fn", config={OPTUNA_NUMBER_KEY: n, "model.width": 16}, stub=True) for n in range(3)]
    # Tune has created all three when the first two start (two at a time).
    progress.on_trial_start(0, trials, trials[0])
    progress.on_trial_start(0, trials, trials[1])
    progress.on_trial_start(0, trials, trials[0])  # a retried start is the same trial
    progress.on_trial_start(0, trials, trials[2])
    started = [line for line in lines if " started (" in line]
    assert [s.split(" started (")[1].split(")")[0] for s in started] == ["1/8", "2/8", "2/8", "3/8"], started
