"""LocalizationModule: a tiny real Lightning run on CPU, metrics, checkpoints, configs."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from heimdall.errors import ConfigError
from heimdall.features import FeatureConfig
from heimdall.geometry import default_frame
from heimdall.losses import LossConfig
from heimdall.models import ResNetConfig, SetNetConfig, TargetScaling, build_model
from heimdall.module import LocalizationModule, OptimizerConfig, _lr_factor

TINY_RESNET = ResNetConfig(stage_depths=(1,), width=8, stem_channels=2, head_hidden=32, dropout=0.0)


class _LevelDataset(Dataset):
    """Feature planes whose level falls with log-distance to each receiver: learnable in seconds."""

    def __init__(self, n: int, seed: int, with_oracle: bool = False) -> None:
        rng = np.random.default_rng(seed)
        stations = default_frame().stations_local()
        pos = rng.uniform(-150.0, 150.0, (n, 2))
        dist = np.linalg.norm(pos[:, None] - stations[None], axis=-1).clip(5.0)
        level = 3.0 - 1.5 * np.log10(dist) + rng.normal(0.0, 0.05, dist.shape)
        noise = rng.normal(0.0, 0.2, (n, 7, 128, 32))
        self.features = torch.tensor(level[..., None, None] + noise, dtype=torch.float32)
        self.mask = torch.tensor(rng.random((n, 7)) > 0.1)
        self.target = torch.tensor(pos / 100.0, dtype=torch.float32)
        self.with_oracle = with_oracle
        self.oracle_mean = torch.tensor(pos + rng.normal(0.0, 20.0, pos.shape))
        self.oracle_cov = torch.eye(2, dtype=torch.float64).expand(n, 2, 2) * 400.0

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"features": self.features[i], "mask": self.mask[i], "target": self.target[i]}
        if self.with_oracle:
            item.update(oracle_mean=self.oracle_mean[i], oracle_cov=self.oracle_cov[i])
        return item


class _LossHistory(pl.Callback):
    def __init__(self) -> None:
        self.train: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.train.append(float(trainer.callback_metrics["train/loss"]))


def _trainer(max_epochs: int, **kw: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_tiny_training_run_decreases_loss_and_logs_km_metrics(tmp_path):
    torch.manual_seed(0)
    opt = OptimizerConfig(lr=1e-2, batch_size=32, max_epochs=6, warmup=0.5)
    module = LocalizationModule(build_model("resnet", TINY_RESNET), LossConfig(mse_warmup_epochs=1), opt)
    train = DataLoader(_LevelDataset(256, 0), batch_size=32, shuffle=True)
    val = DataLoader(_LevelDataset(96, 1, with_oracle=True), batch_size=48)
    history = _LossHistory()
    trainer = _trainer(6, callbacks=[history], enable_checkpointing=False)
    trainer.fit(module, train, val)

    # NLL epochs (after the 1-epoch MSE warm-up) must fall.
    assert history.train[-1] < history.train[1] - 0.5, history.train
    m = trainer.callback_metrics
    for key in ("val/loss", "val/median_km", "val/p90_km", "val/nll_km", "val/coverage_1sigma", "val/coverage_2sigma",
                "val/coverage_95", "val/coverage_mad", "val/sharpness_km", "val/oracle_ratio"):
        assert key in m and math.isfinite(float(m[key])), key
    # Positions spread over +-150 km: the centre guess has a median error near 110 km.
    assert float(m["val/median_km"]) < 70.0
    assert 0.0 <= float(m["val/coverage_1sigma"]) <= 1.0
    assert float(m["val/oracle_ratio"]) == pytest.approx(float(m["val/median_km"]) / float(m["val/oracle_median_km"]))

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = LocalizationModule.from_checkpoint(path)
    batch = next(iter(val))
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch["features"], batch["mask"]), module(batch["features"], batch["mask"]))
    assert restored.hparams["feature_config"] == FeatureConfig().to_dict()
    assert restored.hparams["target_scaling"]["target_scale_km"] == 100.0


def test_predict_gaussian_and_geographic_model_share_units():
    module = LocalizationModule(build_model("resnet", TINY_RESNET))
    module.eval()
    x = torch.randn(3, 7, 128, 32)
    with torch.no_grad():
        mean_km, cov = module.predict_gaussian(x)
        geo = module.geographic_model()(x)
    lat, lon = default_frame().to_geographic(mean_km[:, 0].numpy(), mean_km[:, 1].numpy())
    np.testing.assert_allclose(geo[:, 0].numpy(), lat, atol=1e-4)
    np.testing.assert_allclose(geo[:, 1].numpy(), lon, atol=1e-4)
    np.testing.assert_allclose(geo[:, 2].numpy(), np.sqrt(cov[:, 0, 0].numpy()) * 1000.0, rtol=1e-5)


def test_setnet_with_full_head_runs_one_epoch_with_onecycle():
    model = build_model("setnet", SetNetConfig(encoder_channels=(4, 8), embed_dim=16, n_heads=2, head="full", head_hidden=16))
    module = LocalizationModule(model, LossConfig(family="beta_nll", beta=0.5, mse_warmup_epochs=0),
                                OptimizerConfig(schedule="onecycle", max_epochs=1, warmup=0.3))
    trainer = _trainer(1, enable_checkpointing=False, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DataLoader(_LevelDataset(64, 2), batch_size=32), DataLoader(_LevelDataset(32, 3), batch_size=32))
    assert math.isfinite(float(trainer.callback_metrics["val/nll_km"]))
    assert "val/oracle_ratio" not in trainer.callback_metrics


def test_module_rejects_bad_batches_and_inconsistent_configs():
    module = LocalizationModule(build_model("resnet", TINY_RESNET))
    bad = {"features": torch.randn(2, 6, 128, 32), "mask": torch.ones(2, 6, dtype=torch.bool), "target": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="7 receivers"):
        module.training_step(bad, 0)
    with pytest.raises(ConfigError) as err:
        LocalizationModule(build_model("resnet", TINY_RESNET), LossConfig(family="full_nll", mse_warmup_epochs=3),
                           OptimizerConfig(max_epochs=3))
    assert len(err.value.problems) == 2
    with pytest.raises(ConfigError, match="build_model"):
        LocalizationModule(torch.nn.Linear(2, 2))


def test_optimizer_config_lists_every_problem_and_roundtrips():
    with pytest.raises(ConfigError) as err:
        OptimizerConfig(lr=0.0, batch_size=0, schedule="step", warmup=5.0, max_epochs=5, grad_clip=-1.0)
    assert len(err.value.problems) == 5
    cfg = OptimizerConfig(lr=1e-3, schedule="constant")
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert _lr_factor("cosine", 0.5, 1.0, 10) == pytest.approx(0.5)
    assert _lr_factor("cosine", 1.0, 1.0, 10) == pytest.approx(1.0)
    assert _lr_factor("cosine", 5.5, 1.0, 10) == pytest.approx(0.5)
    assert _lr_factor("cosine", 10.0, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor("constant", 9.0, 1.0, 10) == 1.0


def test_target_scaling_is_saved_and_used():
    scaling = TargetScaling(target_scale_km=50.0)
    module = LocalizationModule(build_model("resnet", TINY_RESNET), target_scaling=scaling)
    head = torch.tensor([[1.0, -2.0, math.log(0.99), math.log(1.99)]])
    mean_km, cov = module._to_km(head)
    torch.testing.assert_close(mean_km, torch.tensor([[50.0, -100.0]]))
    torch.testing.assert_close(torch.diagonal(cov, dim1=-2, dim2=-1), torch.tensor([[2500.0, 10000.0]]))
    assert LocalizationModule.from_hparams(dict(module.hparams)).target_scaling == scaling
