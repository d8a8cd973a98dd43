"""ASHA as the study builds it: rungs count the epochs a trial trained its NLL, after its MSE warm-up."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from torch.utils.data import DataLoader, TensorDataset

from heimdall.losses import LossConfig
from heimdall.models import ResNetConfig, build_model
from heimdall.module import LocalizationModule, OptimizerConfig
from tuning.study.trial import EPOCHS_METRIC, NLL_EPOCHS_METRIC
from tuning.study.tune import GRACE_NLL_EPOCHS, StudyConfig, make_scheduler
from tuning.study.worker import TrialMetrics

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


class _Recordings(TensorDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        features, target = super().__getitem__(i)
        return {"features": features, "mask": torch.ones(7, dtype=torch.bool), "target": target}


class _Seen(pl.Callback):
    """What Ray's report callback would read after each epoch (it runs after TrialMetrics)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        self.seen.append((float(m[EPOCHS_METRIC]), float(m[NLL_EPOCHS_METRIC])))


def test_a_worker_counts_nll_epochs_after_its_trials_mse_warm_up() -> None:
    g = torch.Generator().manual_seed(0)
    data = _Recordings(torch.randn(8, 7, 128, 32, generator=g), torch.rand(8, 2, generator=g) * 2 - 1)
    loss = LossConfig(mse_warmup_epochs=2)
    module = LocalizationModule(build_model("resnet", ResNetConfig(stage_depths=(1,), width=8, stem_channels=2,
                                                                   head_hidden=16, dropout=0.0)),
                                loss, OptimizerConfig(batch_size=8, warmup=0.0, max_epochs=4))
    seen = _Seen()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                         callbacks=[TrialMetrics(warmup_epochs=loss.mse_warmup_epochs), seen])
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert seen.seen == [(1.0, 0.0), (2.0, 0.0), (3.0, 1.0), (4.0, 2.0)]
