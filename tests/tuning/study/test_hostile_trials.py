"""Careless trial settings never crash a trial or train the wrong thing, and a deterministic failure is not retried.

The fast tests need no Ray: the lr schedules on runs of one step per epoch
(a batch larger than the split), the study's epoch budget against a space's
warm-ups, how a failed Train run is classified, the resource message. The
``ray`` test runs one small real study: a trial with ``onecycle`` and a batch
larger than the split trains and reports, and a trial whose configuration its
space rejects fails once, ends FAIL in Optuna, and the study still finishes.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import uuid
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import ray.exceptions
import ray.train
import torch
from ray import tune
from torch.utils.data import DataLoader, Dataset

from heimdall.errors import ConfigError, DataError
from heimdall.losses import LossConfig
from heimdall.models import ResNetConfig, build_model
from heimdall.module import LocalizationModule, OptimizerConfig, _lr_factor, _onecycle_pct_start
from tuning.run import main
from tuning.study.spaces import (
    TrialConfigs,
    budget_overrides,
    build_configs,
    check_space_budget,
    fit_budget,
    load_space,
    validate_space,
    with_overrides,
)
from tuning.study.trial import TrialFailed, TrialSpec, deterministic_cause
from tuning.study.tune import StudyConfig, plan_resources
from tuning.train import _configs, build_parser

TINY_RESNET = ResNetConfig(stage_depths=(1,), width=8, stem_channels=2, head_hidden=16, dropout=0.0)


class _Recordings(Dataset):
    """Random features of the right shape: enough for the schedule and the metrics to run."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, 7, 128, 32, generator=g)
        self.target = torch.rand(n, 2, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "mask": torch.ones(7, dtype=torch.bool), "target": self.target[i]}


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(optimizer: OptimizerConfig, loss: LossConfig, epochs: int, rows: int = 10) -> tuple[pl.Trainer, list[float]]:
    module = LocalizationModule(build_model("resnet", TINY_RESNET), loss, optimizer)
    rates = _LearningRates()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                         callbacks=[rates])
    trainer.fit(module, DataLoader(_Recordings(rows, 0), batch_size=optimizer.batch_size),
                DataLoader(_Recordings(8, 1), batch_size=8))
    return trainer, rates.seen


# -- the lr schedule on runs of one step per epoch ---------------------------------------------


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
@pytest.mark.parametrize("warmup,epochs", [(1.0, 2), (0.0, 1), (0.5, 1), (1.9, 2)])
def test_a_batch_larger_than_the_split_trains_one_partial_batch_per_epoch(schedule: str, warmup: float,
                                                                          epochs: int) -> None:
    # 10 recordings, batch 64: one step per epoch. (1.0, 2) with onecycle raised ZeroDivisionError in torch.
    optimizer = OptimizerConfig(schedule=schedule, batch_size=64, warmup=warmup, max_epochs=epochs)
    trainer, rates = _fit(optimizer, LossConfig(mse_warmup_epochs=0), epochs)
    assert len(rates) == epochs, "one partial batch per epoch"
    assert all(math.isfinite(r) and 0 < r <= optimizer.lr * 1.0001 for r in rates), rates
    assert math.isfinite(float(trainer.callback_metrics["val/nll_km"]))


@pytest.mark.parametrize("total_steps", range(2, 41))
def test_onecycle_phases_are_never_empty(total_steps: int) -> None:
    for share in (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0, 3.0):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total_steps,
                                                    pct_start=_onecycle_pct_start(share, total_steps))
        for _ in range(total_steps - 1):
            opt.step()
            sched.step()
            assert 0 < opt.param_groups[0]["lr"] <= 1e-3
    with pytest.raises(ValueError, match="total_steps >= 2"):
        _onecycle_pct_start(0.3, 1)


def test_lr_factor_with_one_step_per_epoch_stays_in_range() -> None:
    for schedule in ("cosine", "constant"):
        for warmup, epochs in ((0.0, 1), (0.5, 1), (1.0, 2), (2.5, 3)):
            factors = [_lr_factor(schedule, float(step), warmup, epochs) for step in range(epochs + 1)]
            assert all(0.0 <= f <= 1.0 for f in factors), (schedule, warmup, factors)


def test_an_empty_training_loader_is_refused_instead_of_validating_an_untrained_model() -> None:
    optimizer = OptimizerConfig(batch_size=4, warmup=0.0, max_epochs=1)
    with pytest.raises(ConfigError, match="training loader yields no batch.*fix:"):
        _fit(optimizer, LossConfig(mse_warmup_epochs=0), 1, rows=0)


# -- the study's epoch budget --------------------------------------------------------------------


def test_budget_validator_lists_every_warmup_that_reaches_max_epochs_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        check_space_budget(load_space("setnet"), 1)
    problems = err.value.problems
    assert len(problems) == 2, problems
    mse = next(p for p in problems if p.startswith("loss.mse_warmup_epochs"))
    assert "can reach 3 epochs" in mse and "never train the NLL" in mse and "raise --max-epochs to 4" in mse
    lr = next(p for p in problems if p.startswith("optimizer.warmup"))
    assert "can reach 2 epochs" in lr and "raise --max-epochs to 3" in lr
    check_space_budget(load_space("setnet"), 4)  # the default study's budget fits both shipped spaces
    check_space_budget(load_space("resnet"), 4)


def test_budget_validator_covers_fixed_warmups_and_a_horizon_set_by_the_space() -> None:
    space = validate_space({"arch": "resnet", "fixed": {"loss.mse_warmup_epochs": 2},
                            "parameters": {"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-3]}}})
    with pytest.raises(ConfigError, match=r"loss.mse_warmup_epochs is fixed at 2 epochs.*at most 1"):
        check_space_budget(space, 2)
    check_space_budget(space, 3)
    pinned = with_overrides(space, {"optimizer.max_epochs": 6})
    with pytest.raises(ConfigError, match="optimizer.max_epochs is set by the space"):
        check_space_budget(pinned, 6)
    with pytest.raises(ConfigError, match="--max-epochs must be an integer >= 1"):
        check_space_budget(space, 0)


def test_a_short_run_can_pin_the_warmups_the_space_searches() -> None:
    space = load_space("setnet")
    short = with_overrides(space, budget_overrides(space, 1))
    check_space_budget(short, 1)
    assert {"optimizer.warmup", "loss.mse_warmup_epochs"}.isdisjoint(p.name for p in short.parameters)


def test_one_warmup_policy_horizon_is_the_budget_defaults_off_chosen_refused() -> None:
    space = load_space("resnet")
    params = {p.name: p.corners()[0] for p in space.parameters if not p.when}
    spec = TrialSpec(StudyConfig(name="t", max_epochs=1), space, train_storage="unused")
    configs = spec.configs(params)  # mse warm-up searched at 0; lr warm-up a default that cannot fit: off
    assert configs.optimizer.max_epochs == 1 and configs.optimizer.warmup == 0.0
    assert configs.loss.mse_warmup_epochs == 0
    with pytest.raises(ConfigError, match="loss.mse_warmup_epochs is 3 epochs.*never train the NLL"):
        spec.configs({**params, "loss.mse_warmup_epochs": 3})  # no longer a stretched horizon
    four = TrialSpec(StudyConfig(name="t", max_epochs=4), space, train_storage="unused")
    kept = four.configs({**params, "loss.mse_warmup_epochs": 3})
    assert (kept.optimizer.max_epochs, kept.optimizer.warmup, kept.loss.mse_warmup_epochs) == (4, 1.0, 3)


def test_tuning_train_uses_the_same_policy_for_its_default_warmups() -> None:
    _, loss, optimizer = _configs(build_parser().parse_args(["--epochs", "1"]))
    assert (optimizer.max_epochs, optimizer.warmup, loss.mse_warmup_epochs) == (1, 0.0, 0)
    _, loss, optimizer = _configs(build_parser().parse_args(["--epochs", "3"]))
    assert (optimizer.max_epochs, optimizer.warmup, loss.mse_warmup_epochs) == (3, 1.0, 1)
    configs = build_configs(load_space("resnet"), {p.name: p.corners()[0] for p in load_space("resnet").parameters
                                                   if not p.when})
    with pytest.raises(ConfigError, match="optimizer.warmup is 1 epochs"):
        fit_budget(TrialConfigs(configs.arch, configs.model, configs.loss, configs.optimizer), 1,
                   chosen={"optimizer.warmup"})


def test_every_train_worker_needs_rows_of_each_split() -> None:
    spec = TrialSpec(StudyConfig(name="t", max_epochs=1, workers_per_trial=2), load_space("resnet"),
                     train_storage="unused")
    spec.check_rows({"train": 2, "val": 2})
    with pytest.raises(ConfigError) as err:
        spec.check_rows({"train": 1, "val": 0})
    assert len(err.value.problems) == 2 and "fewer --workers-per-trial" in err.value.problems[0]


# -- which failures are retried -------------------------------------------------------------------


def test_only_failures_a_retry_could_fix_are_retried() -> None:
    config_error = ConfigError("trial configuration", ["loss.sigma_floor: 0.5 lies outside the space"])
    assert deterministic_cause(config_error) is config_error
    assert deterministic_cause(DataError("non-finite features")) is not None
    assert deterministic_cause(ZeroDivisionError("float division by zero")) is not None
    assert deterministic_cause(RuntimeError("connection reset")) is None
    one_rank = ray.train.WorkerGroupError("rank 1 raised", {0: RuntimeError("gloo: peer closed"), 1: config_error})
    assert deterministic_cause(one_rank) is config_error
    died = ray.train.WorkerGroupError("rank 0 died", {0: ray.exceptions.ActorDiedError(), 1: ValueError("collateral")})
    assert deterministic_cause(died) is None, "a dead worker makes the run worth restarting"
    assert deterministic_cause(ray.train.ControllerError(TimeoutError("worker group did not start"))) is None


def test_errors_survive_the_trip_from_a_worker_to_the_driver() -> None:
    error = pickle.loads(pickle.dumps(ConfigError("trial configuration", ["a", "b"])))
    assert error.problems == ["a", "b"] and str(error).startswith("invalid trial configuration (2 problem(s))")
    assert str(pickle.loads(pickle.dumps(TrialFailed("ConfigError: bad")))) == "ConfigError: bad"


# -- the resource message ---------------------------------------------------------------------------


@pytest.mark.parametrize("cpus,workers", [(2.0, 1), (2.0, 2), (3.0, 3), (7.3, 2)])
def test_resource_message_states_the_sum_and_a_limit_that_fits(cpus: float, workers: int) -> None:
    with pytest.raises(ConfigError) as err:
        plan_resources(cpus, workers, 100.0, trials=1)
    message = err.value.problems[0]
    terms = re.search(r"needs --workers-per-trial (\d+) x --cpus-per-worker (\S+) \+ (\S+) CPU for its Ray Data "
                      r"reads = (\S+) CPUs, more than the cluster's", message)
    assert terms, message
    w, c, data, total = (float(x) for x in terms.groups())
    assert w * c + data == pytest.approx(total, abs=0.006), message
    limit = float(re.search(r"fix: --cpus-per-worker (\S+) or less", message).group(1))
    plan_resources(cpus, workers, limit, trials=1)  # the advertised limit is accepted
    with pytest.raises(ConfigError):
        plan_resources(cpus, workers, limit + 0.02, trials=1)
    # Trials that read nothing (features in the object store): no reads term, and the whole CPUs fit.
    with pytest.raises(ConfigError) as err:
        plan_resources(cpus, workers, 100.0, trials=1, data_cpus=0.0)
    message = err.value.problems[0]
    assert "Ray Data" not in message and f"= {workers * 100:.2f} CPUs" in message, message
    limit = float(re.search(r"fix: --cpus-per-worker (\S+) or less", message).group(1))
    plan_resources(cpus, workers, limit, trials=1, data_cpus=0.0)


def test_resource_message_when_no_worker_fits() -> None:
    with pytest.raises(ConfigError, match="a cluster with more CPUs .*no worker fits"):
        plan_resources(0.4, 1, 1.0, trials=1)


# -- one real study -----------------------------------------------------------------------------------

#: onecycle with a batch above the train split (64 recordings: ~51 train), one epoch.
HOSTILE_SPACE = """\
arch: resnet
fixed:
  optimizer.schedule: onecycle
  optimizer.batch_size: 256
  model.stage_depths: [1]
  model.width: 8
parameters:
  loss.sigma_floor: {loguniform: [0.01, 0.02]}
"""
#: A trial configuration its space rejects (a hand-enqueued Optuna trial, say): a deterministic failure.
OUT_OF_SPACE = {"loss.sigma_floor": 0.5}


class _EnqueueFirst(tune.Callback):
    """Puts one trial configuration first in the study's Optuna queue before Tune asks for trials."""

    def __init__(self, storage: str, name: str, params: dict) -> None:
        self.storage, self.name, self.params = storage, name, params

    def setup(self, **info: object) -> None:
        optuna.load_study(study_name=self.name, storage=self.storage).enqueue_trial(self.params)


@pytest.mark.ray
def test_onecycle_batch_above_split_trains_and_a_deterministic_failure_is_tried_once(
    ray_session: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "hostile.yaml"
    space.write_text(HOSTILE_SPACE)
    name, storage = f"hostile-{uuid.uuid4().hex[:6]}", f"sqlite:///{tmp_path / 'optuna.db'}"
    code = main(["--space", str(space), "--recordings", "64", "--dataset", "tiny", "--trials", "2",
                 "--max-epochs", "1", "--time-budget", "none", "--data-dir", str(tmp_path), "--name", name,
                 "--optuna-storage", storage, "--no-export"],
                callbacks=[_EnqueueFirst(storage, name, OUT_OF_SPACE)])
    out, err = capsys.readouterr()
    assert code == 0, out + err  # as documented: the study finished and a trial has a result

    study = optuna.load_study(study_name=name, storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.COMPLETE}, states
    assert math.isfinite(study.trials[1].value)

    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    assert summary["tune_status"] == {"complete": 1, "stopped": 0, "error": 1}
    failed = next(r for r in summary["trials"] if r["status"] == "error")
    assert failed["number"] == 0 and failed["epochs"] == 0

    # Tried once: the first attempt recorded the reason; Tune's retry of the function (it retries
    # every error) found the record and ended at once, with no Train run of its own.
    run_dir = tmp_path / "runs" / name / "train-runs" / failed["trial_id"]
    reason = (run_dir / "heimdall-failure.txt").read_text()
    assert reason.startswith("ConfigError:") and "loss.sigma_floor: 0.5 lies outside the space" in reason
    assert sorted(p.name for p in run_dir.iterdir()) == ["heimdall-failure.txt"], "a Train run was started"
    errors = next((tmp_path / "runs" / name).glob(f"trial-0000-{failed['trial_id']}/error.txt")).read_text()
    first, retry = errors.split("Failure # 2")
    assert "Failure # 1" in first and "TrialFailed: ConfigError:" in first and "not retried" not in first
    assert "not retried: the trial's first attempt failed" in retry and "Failure # 3" not in retry
    failed_line = next(line for line in out.splitlines() if "#0 FAILED" in line)
    assert "ConfigError" in failed_line, failed_line  # the reason is on the progress line, not only in a file
