"""``--warm-start`` naming a study that is missing, this very study, or one of another space."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from heimdall.errors import ConfigError, NotFoundError
from tuning.study.spaces import load_space
from tuning.study.tune import StudyConfig, make_searcher, open_optuna_storage

SPACE = """\
arch: resnet
parameters:
  optimizer.lr: {loguniform: [1.0e-5, 3.0e-3]}
"""


def _setup(tmp_path: Path) -> tuple[optuna.storages.BaseStorage, str]:
    (tmp_path / "space.yaml").write_text(SPACE)
    return open_optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), str(tmp_path / "space.yaml")


def test_warm_start_from_a_missing_study_names_the_fix(tmp_path: Path) -> None:
    storage, space = _setup(tmp_path)
    with pytest.raises(NotFoundError, match=r"'nope'.*fix: give the name of an earlier study"):
        make_searcher(StudyConfig(name="s", space=space, warm_start="nope"), load_space(space), storage)


def test_warm_start_from_itself_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="warm_start must name another study"):
        StudyConfig(name="s", warm_start="s")


def test_warm_start_from_a_study_of_another_space_is_refused(tmp_path: Path) -> None:
    storage, space = _setup(tmp_path)
    other = optuna.create_study(study_name="other", storage=storage)
    other.optimize(lambda t: t.suggest_float("optimizer.lr", 1e-3, 1e-1, log=True), n_trials=2)  # other bounds
    with pytest.raises(ConfigError, match=r"none of the 2 finished trial\(s\) of study 'other' fits.*fix:"):
        make_searcher(StudyConfig(name="s", space=space, warm_start="other"), load_space(space), storage)


def test_warm_start_from_a_study_of_the_other_direction_is_refused(tmp_path: Path) -> None:
    storage, space = _setup(tmp_path)
    optuna.create_study(study_name="other", storage=storage, direction="maximize")
    with pytest.raises(ConfigError, match="fix: warm-start from a study of the same objective"):
        make_searcher(StudyConfig(name="s", space=space, warm_start="other"), load_space(space), storage)
