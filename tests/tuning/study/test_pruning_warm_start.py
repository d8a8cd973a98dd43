"""``--warm-start STUDY``: TPE starts from an earlier study's finished trials, pruned ones included."""
from __future__ import annotations

from pathlib import Path

import optuna

from tuning.study.spaces import load_space
from tuning.study.trial import EPOCHS_METRIC, OPTUNA_NUMBER_KEY
from tuning.study.tune import WARM_START_ATTR, StudyConfig, make_searcher, open_optuna_storage

State = optuna.trial.TrialState
SPACE = """\
arch: resnet
fixed:
  loss.mse_warmup_epochs: 0
parameters:
  optimizer.lr: {loguniform: [1.0e-5, 3.0e-3]}
  loss.family: {choice: [gaussian_nll, beta_nll]}
  loss.beta: {uniform: [0.25, 1.0], when: {loss.family: beta_nll}}
"""


def _result(value: float, epoch: int) -> dict:
    return {"val/nll_km": value, EPOCHS_METRIC: epoch, "training_iteration": epoch}


def test_a_warm_started_study_begins_with_the_earlier_trials_and_samples_near_them(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = open_optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    space = load_space(str(tmp_path / "space.yaml"))
    earlier = make_searcher(StudyConfig(name="earlier", space=str(tmp_path / "space.yaml"), max_epochs=2), space, storage)
    for i in range(8):
        config = earlier.suggest(f"t{i}")
        # Learning rates near 1e-3 are best; the others are stopped by ASHA after one epoch.
        loss = abs(config["optimizer.lr"] - 1e-3) * 1e3
        if loss < 0.5:
            earlier.on_trial_result(f"t{i}", _result(5.0 + loss, 1))
            earlier.on_trial_complete(f"t{i}", _result(4.0 + loss, 2))
        else:
            earlier.on_trial_complete(f"t{i}", _result(9.0 + loss, 1))
    earlier.suggest("running")  # unfinished: not copied
    old = optuna.load_study(study_name="earlier", storage=storage).trials

    config = StudyConfig(name="later", space=str(tmp_path / "space.yaml"), max_epochs=2, warm_start="earlier", seed=1)
    later = make_searcher(config, space, storage)
    copied = optuna.load_study(study_name="later", storage=storage).trials
    assert len(copied) == 8 and all(t.system_attrs[WARM_START_ATTR] == "earlier" for t in copied)
    assert [(t.state, t.value, t.params, t.intermediate_values) for t in copied] == [
        (t.state, t.value, t.params, t.intermediate_values) for t in old[:8]]
    assert {State.PRUNED, State.COMPLETE} <= {t.state for t in copied}
    # New trials are numbered after the copies; TPE (past its start-up trials already) models them.
    assert later.suggest("n0")[OPTUNA_NUMBER_KEY] == 8
    # A second searcher on the same study (what --resume builds) copies nothing again.
    make_searcher(config, space, storage)
    assert len(optuna.load_study(study_name="later", storage=storage).trials) == 9
