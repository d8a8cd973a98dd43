"""Search spaces: every shipped YAML against the real configs and models, and
the validator, converter and trial-config builder on purpose-made spaces."""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from heimdall.errors import ConfigError
from heimdall.losses import LossConfig, validate_model_and_loss
from heimdall.models import build_model, head_size
from tuning.study.spaces import (
    SPACES_DIR,
    SearchSpace,
    available_spaces,
    build_configs,
    load_space,
    space_summary,
    to_optuna,
    validate_space,
    with_overrides,
)

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))
N_SAMPLES = 25

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` trials' flat params drawn by Optuna's RandomSampler through ``to_optuna``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define_by_run = to_optuna(space)
    out = []
    for _ in range(n):
        trial = study.ask()
        assert define_by_run(trial) is None  # OptunaSearch accepts None or a dict of constants
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def _small_space(**parameters: Any) -> dict[str, Any]:
    base = {
        "loss.family": {"choice": ["gaussian_nll", "beta_nll"]},
        "loss.beta": {"uniform": [0.25, 1.0], "when": {"loss.family": "beta_nll"}},
        "model.width": {"choice": [16, 32]},
    }
    return {"arch": "resnet", "parameters": {**base, **parameters}}


# --------------------------------------------------------------------------- shipped spaces


def test_the_registry_lists_the_shipped_files() -> None:
    assert SHIPPED, f"no search spaces in {SPACES_DIR}"
    assert available_spaces() == [p.stem for p in SHIPPED]
    assert {"resnet", "setnet"} <= set(available_spaces())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny forward passes: one thread is several times faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_builds_working_models(path: Path, one_thread: None) -> None:
    space = load_space(path.stem)
    assert space == load_space(str(path))
    assert space.name == path.stem and space.source == path
    assert space.arch in space_summary(space) and space.sha256[:12] in space_summary(space)

    trials = _sample(space, N_SAMPLES)
    x = torch.randn(2, 7, 128, 32)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])
    for params in trials:
        configs = build_configs(space, params)
        validate_model_and_loss(configs.model, configs.loss, configs.optimizer)
        net = build_model(configs.arch, configs.model, 7).eval()
        with torch.no_grad():
            head = net(x, mask)
        assert head.shape == (2, head_size(configs.model.head)), params
        assert torch.isfinite(head).all(), params
    seen = set().union(*trials)
    assert seen == {p.name for p in space.parameters}, "a parameter was never suggested in 25 trials"


# --------------------------------------------------------------------------- validation


def test_a_malformed_space_reports_every_problem_at_once() -> None:
    raw = {
        "arch": "resnet",
        "parameters": {
            "model.widht": {"choice": [16, 32]},                                    # unknown field
            "model.dropout": {"normal": [0.0, 0.1]},                                # unknown kind
            "optimizer.lr": {"loguniform": [0.0, 1.0e-3]},                          # log scale with low 0
            "model.kernel_size": {"choice": []},                                    # empty choice
            "loss.beta": {"uniform": [0.25, 1.0], "when": {"loss.familly": "beta_nll"}},  # unknown reference
        },
    }
    with pytest.raises(ConfigError) as info:
        validate_space(raw)
    problems = info.value.problems
    assert len(problems) == 5, problems
    expected = [
        "model.widht: unknown field 'widht'",
        "model.dropout: unknown kind or option 'normal'; valid kinds: choice, uniform, loguniform, int",
        "optimizer.lr: a log scale needs low > 0",
        "model.kernel_size: choice needs a non-empty list",
        "loss.beta: when refers to 'loss.familly', which is not searched",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert "valid fields: stage_depths, width," in problems[0]


def test_an_unsupported_kind_is_a_value_error_naming_it() -> None:
    raw = _small_space(**{"model.dropout": {"quniform": [0.0, 0.3, 0.1]}})
    with pytest.raises(ValueError, match="unknown kind or option 'quniform'; valid kinds: choice"):
        validate_space(raw)


@pytest.mark.parametrize(("parameters", "fixed", "message"), [
    ({"model.width": {"int": [32, 16]}}, {}, "low <= high must hold, but got low=32, high=16"),
    ({"model.width": {"uniform": [16.0, 32.0]}}, {}, "kind uniform gives float values, but the field is int"),
    ({"model.norm": {"choice": ["batch", 3]}}, {}, "choice values [3] are not of the field's type str"),
    ({"model.width": {"int": [16, 40], "step": 16}}, {}, "must be a multiple of step"),
    ({"model.width": {"choice": [16, 32], "step": 2}}, {}, "option 'step' does not apply to choice"),
    ({}, {"model.width": 24}, "model.width is both fixed and searched"),
    ({}, {"model.head": "diag"}, "fixed model.head: 'diag' is already the dataclass default"),
    ({}, {"data.batch": 1}, "unknown section 'data'; valid sections: model, loss, optimizer"),
    ({"loss.beta": {"uniform": [0.25, 1.0], "when": {"loss.family": "beta-nll"}}}, {},
     "when loss.family = 'beta-nll' can never hold"),
    ({"loss.beta": {"uniform": [0.25, 1.0], "when": {"model.width": {"in": [16, 64]}}}}, {},
     "when model.width = 64 can never hold"),
])
def test_structural_problems_are_named(parameters: dict, fixed: dict, message: str) -> None:
    raw = _small_space(**parameters) | ({"fixed": fixed} if fixed else {})
    with pytest.raises(ConfigError) as info:
        validate_space(raw)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_an_exponent_without_a_dot_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "lr.yaml"
    path.write_text("arch: resnet\nparameters:\n  optimizer.lr: {loguniform: [3e-4, 3.0e-3]}\n")
    with pytest.raises(ConfigError, match=r"got \['3e-4', 0.003\] \(YAML reads 3e-4 as text"):
        load_space(path)


def test_top_level_and_arch_problems_list_the_valid_values() -> None:
    with pytest.raises(ConfigError) as info:
        validate_space({"arch": "transformer", "parameters": {"loss.beta": {"uniform": [0.0, 1.0]}}, "seed": 3})
    text = str(info.value)
    assert "unknown top-level key 'seed'; valid keys: arch, fixed, parameters" in text
    assert "unknown architecture 'transformer'; valid: resnet, setnet" in text


def test_condition_cycles_are_reported() -> None:
    raw = {"arch": "resnet", "parameters": {
        "model.norm": {"choice": ["batch", "group"], "when": {"model.pooling": "avg"}},
        "model.pooling": {"choice": ["avg", "max"], "when": {"model.norm": "batch"}},
        "model.width": {"choice": [16, 32]},
    }}
    with pytest.raises(ConfigError, match="cycle among model.norm, model.pooling"):
        validate_space(raw)


def test_semantic_clashes_at_the_corners_name_the_assignment() -> None:
    raw = _small_space(**{
        "loss.family": {"choice": ["beta_nll", "gaussian_nll"]},   # gaussian_nll clashes with the full head
        "model.dropout": {"uniform": [0.0, 1.0]},                  # dropout must be < 1
    }) | {"fixed": {"model.head": "full"}}
    with pytest.raises(ConfigError) as info:
        validate_space(raw)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith("with loss.family='gaussian_nll'") and "rho untrained" in p for p in problems)
    assert any(p.startswith("with model.dropout=1.0") and "dropout must lie in [0, 1)" in p for p in problems)


def test_a_repeated_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("arch: resnet\nparameters:\n  model.width: {choice: [16]}\n  model.width: {choice: [32]}\n")
    with pytest.raises(ConfigError, match="duplicate key 'model.width'"):
        load_space(path)


# --------------------------------------------------------------------------- registry and hash


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_space("resent")
    message = str(info.value)
    assert "unknown search space 'resent'" in message
    assert "valid names: " + ", ".join(available_spaces()) in message
    assert "path" in message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_space(tmp_path / "nope.yaml")


def test_the_hash_follows_the_content_not_the_layout(tmp_path: Path) -> None:
    original = load_space("resnet")
    assert load_space("resnet").sha256 == original.sha256
    raw = yaml.safe_load((SPACES_DIR / "resnet.yaml").read_text())
    reordered = {"parameters": dict(reversed(list(raw["parameters"].items()))), "arch": raw["arch"]}
    relaid = tmp_path / "relaid.yaml"
    relaid.write_text(yaml.safe_dump(reordered, default_flow_style=False))  # no comments, block style
    assert load_space(relaid).sha256 == original.sha256
    assert [p.name for p in load_space(relaid).parameters] == [p.name for p in original.parameters]
    raw["parameters"]["model.width"] = {"choice": [16, 24, 48]}
    assert validate_space(raw).sha256 != original.sha256


# --------------------------------------------------------------------------- Optuna and trial configs


def test_a_conditional_parameter_is_absent_when_its_condition_is_false() -> None:
    space = validate_space(_small_space())
    define_by_run = to_optuna(space)
    # FixedTrial raises if asked for a value it was not given, i.e. if beta were suggested.
    off = optuna.trial.FixedTrial({"loss.family": "gaussian_nll", "model.width": 16})
    define_by_run(off)
    assert set(off.params) == {"loss.family", "model.width"}
    assert build_configs(space, off.params).loss.beta == LossConfig().beta
    on = optuna.trial.FixedTrial({"loss.family": "beta_nll", "loss.beta": 0.5, "model.width": 16})
    define_by_run(on)
    assert on.params["loss.beta"] == 0.5
    assert build_configs(space, on.params).loss.beta == 0.5
    for params in _sample(space, 40, seed=1):
        assert ("loss.beta" in params) == (params["loss.family"] == "beta_nll"), params


def test_list_choices_travel_as_json_text_and_become_tuples() -> None:
    space = validate_space(_small_space(**{"model.stage_depths": {"choice": [[1, 1, 1], [1, 2, 2]]}}))
    labels = {p["model.stage_depths"] for p in _sample(space, 20)}
    assert labels == {"[1,1,1]", "[1,2,2]"}
    params = {"loss.family": "gaussian_nll", "model.width": 16}
    assert build_configs(space, params | {"model.stage_depths": "[1,2,2]"}).model.stage_depths == (1, 2, 2)
    assert build_configs(space, params | {"model.stage_depths": [1, 2, 2]}).model.stage_depths == (1, 2, 2)


def test_build_configs_lists_every_problem_of_a_trial() -> None:
    space = load_space("resnet")
    params = _sample(space, 1)[0]
    params.pop("model.width")
    params |= {"model.kernel_size": 7, "model.colour": "red", "loss.family": "gaussian_nll", "loss.beta": 0.5}
    with pytest.raises(ConfigError) as info:
        build_configs(space, params)
    text = str(info.value)
    assert len(info.value.problems) == 4, info.value.problems
    assert "'model.colour' is not a parameter of this space" in text
    assert "model.width is missing" in text
    assert "model.kernel_size: 7 lies outside the space (3, 5)" in text
    assert "loss.beta is given but its condition loss.family = beta_nll does not hold" in text


def test_overrides_are_checked_against_the_space_before_a_study() -> None:
    space = load_space("resnet")
    with pytest.raises(ConfigError, match=r"with loss.mse_warmup_epochs=3 .*must be < max_epochs \(2\)"):
        with_overrides(space, {"optimizer.max_epochs": 2})
    with pytest.raises(ConfigError, match="when refers to 'loss.family', which is not searched"):
        with_overrides(space, {"loss.family": "beta_nll"})
    short = with_overrides(space, {"optimizer.max_epochs": 4})
    assert short.sha256 != space.sha256 and short.overrides == {"optimizer.max_epochs": 4}
    assert "optimizer.max_epochs=4 (override)" in space_summary(short)
    flat = build_configs(short, _sample(short, 1)[0]).as_flat_dict()
    assert flat["optimizer.max_epochs"] == 4 and flat["loss.rho_limit"] == LossConfig().rho_limit
    # A one-epoch smoke test pins what the budget no longer allows; pinned parameters leave the search.
    smoke = with_overrides(short, {"optimizer.max_epochs": 1, "optimizer.warmup": 0.5,
                                   "loss.mse_warmup_epochs": 0, "optimizer.batch_size": 8})
    assert {"loss.mse_warmup_epochs", "optimizer.batch_size"}.isdisjoint(p.name for p in smoke.parameters)
    configs = build_configs(smoke, _sample(smoke, 1)[0])
    assert (configs.optimizer.max_epochs, configs.optimizer.batch_size, configs.loss.mse_warmup_epochs) == (1, 8, 0)


def test_the_define_by_run_function_survives_pickling() -> None:
    # OptunaSearch.save pickles its state, define-by-run function included, at each Tune checkpoint.
    space = load_space("setnet")
    restored = pickle.loads(pickle.dumps(to_optuna(space)))
    assert _sample_with(restored, 5) == _sample(space, 5)


def _sample_with(define_by_run: Any, n: int) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        define_by_run(trial)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def test_ray_optuna_search_takes_the_function_and_checkpoints_it(tmp_path: Path) -> None:
    # The real contract, without a Ray session: suggestions arrive as the flat
    # dotted dict build_configs reads, and the searcher state (which holds the
    # define-by-run function) saves and restores as Tune does at checkpoints.
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("resnet")

    def searcher() -> OptunaSearch:
        return OptunaSearch(space=to_optuna(space), metric="val_loss", mode="min",
                            sampler=optuna.samplers.RandomSampler(seed=0))

    first = searcher()
    config = first.suggest("trial_0")
    assert set(config) <= {p.name for p in space.parameters} and "model.width" in config
    assert build_configs(space, config).arch == "resnet"
    first.on_trial_complete("trial_0", {"val_loss": 1.0})
    first.save_to_dir(str(tmp_path))
    restored = searcher()
    restored.restore_from_dir(str(tmp_path))
    assert restored.suggest("trial_1") == first.suggest("trial_1")
