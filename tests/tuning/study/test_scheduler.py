"""ASHA as the study builds it: rungs count the epochs a trial trained its NLL, after its MSE warm-up."""
from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from tuning.study.trial import EPOCHS_METRIC, NLL_EPOCHS_METRIC
from tuning.study.tune import GRACE_NLL_EPOCHS, StudyConfig, make_scheduler

METRIC = "val/nll_km"


def _result(epochs: int, warmup: int, value: float) -> dict:
    return {EPOCHS_METRIC: epochs, NLL_EPOCHS_METRIC: max(0, epochs - warmup), METRIC: value}


def test_the_first_rung_is_two_nll_epochs_or_the_whole_budget_when_shorter() -> None:
    assert GRACE_NLL_EPOCHS == 2
    assert StudyConfig(name="s").first_rung == 2
    assert StudyConfig(name="s", max_epochs=1).first_rung == 1  # a 1-epoch smoke test stays valid
    assert StudyConfig(name="s", grace_period=3, max_epochs=4).first_rung == 3
    with pytest.raises(Exception, match=r"grace_period \(5\) must not exceed max_epochs \(2\)"):
        StudyConfig(name="s", grace_period=5, max_epochs=2)


def test_no_rung_judges_a_trial_during_its_mse_warm_up() -> None:
    scheduler = make_scheduler(StudyConfig(name="s", max_epochs=8))
    scheduler.set_search_properties(METRIC, "min")
    fast, warm, slow = (Trial("fn", config={}, stub=True) for _ in range(3))
    for t in (fast, warm, slow):
        scheduler.on_trial_add(None, t)
    # Two trials without warm-up reach the first rung (2 NLL epochs) at epoch 2.
    assert scheduler.on_trial_result(None, fast, _result(2, 0, 5.0)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, slow, _result(2, 0, 9.0)) == TrialScheduler.STOP
    # A trial with 3 epochs of MSE warm-up scores badly meanwhile: never judged on those epochs...
    for epoch in (1, 2, 3, 4):
        assert scheduler.on_trial_result(None, warm, _result(epoch, 3, 50.0)) == TrialScheduler.CONTINUE, epoch
    # ...and judged at epoch 5, its second NLL epoch, against the others' second NLL epoch.
    assert scheduler.on_trial_result(None, warm, _result(5, 3, 9.5)) == TrialScheduler.STOP
