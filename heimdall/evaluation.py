"""Score a trained module on held-out recordings, next to the two yardsticks.

The covariance scale is fitted on the validation split
(:func:`heimdall.calibration.fit_covariance_scale`) and applied unchanged to
the test split, so the test report is honest about calibration.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from heimdall.calibration import coverage_profile, fit_covariance_scale
from heimdall.data import HeimdallDataset
from heimdall.metrics import LocalizationReport, format_reports, localization_report
from heimdall.module import LocalizationModule
from heimdall.oracle import centre_baseline
from heimdall.scene import GeneratorConfig

__all__ = ["MIN_CALIBRATION", "predict", "evaluate_split"]

MIN_CALIBRATION = 20  # validation recordings needed to fit the covariance scale


@torch.no_grad()
def predict(module: LocalizationModule, ds: HeimdallDataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted mean (N, 2) km and covariance (N, 2, 2) km² for every row of ``ds``."""
    module.eval()
    means, covs = [], []
    for start in range(0, len(ds), batch_size):
        batch = ds[list(range(start, min(start + batch_size, len(ds))))]
        m, c = module.predict_gaussian(batch["features"], batch["mask"])
        means.append(m.double().numpy())
        covs.append(c.double().numpy())
    return np.concatenate(means), np.concatenate(covs)


def _truth_km(module: LocalizationModule, ds: HeimdallDataset) -> np.ndarray:
    return ds.target.double().numpy() * module.target_scaling.target_scale_km


def evaluate_split(
    module: LocalizationModule, splits: dict[str, HeimdallDataset], *, generator_config: dict | None = None
) -> dict[str, Any]:
    """Calibrate on ``val`` (sets ``module``'s covariance scale), report on ``test``.

    Args:
        module: the trained module.
        splits: the splits from :func:`heimdall.data.load_feature_splits`.
        generator_config: the dataset's generator config (synthetic data), for the
            centre baseline.

    Returns:
        A JSON-able dict: ``covariance_scale``, ``model``/``model_uncalibrated``/
        ``oracle``/``centre`` report dicts, ``oracle_ratio``, and ``table`` (text).
    """
    val, test = splits["val"], splits["test"]
    module.calibrate(1.0)
    v_mean, v_cov = predict(module, val)
    # Too few validation recordings to calibrate on: keep the raw ellipses (and say so).
    scale = fit_covariance_scale(v_mean, v_cov, _truth_km(module, val)) if len(val) >= MIN_CALIBRATION else 1.0
    t_mean, t_cov = predict(module, test)
    module.calibrate(scale)
    truth = _truth_km(module, test)
    rows: dict[str, LocalizationReport] = {
        "model": localization_report(t_mean, t_cov * scale, truth),
        "model uncalibrated": localization_report(t_mean, t_cov, truth),
    }
    if test.oracle_mean is not None and test.oracle_cov is not None:
        rows["oracle"] = localization_report(test.oracle_mean.double().numpy(), test.oracle_cov.double().numpy(), truth)
    if generator_config is not None:
        rows["centre"] = localization_report(*centre_baseline(GeneratorConfig.from_dict(generator_config), len(truth)),
                                             truth)
    out: dict[str, Any] = {k.replace(" ", "_"): v.to_dict() for k, v in rows.items()}
    out["covariance_scale"] = scale
    out["test_coverage_profile"] = coverage_profile(t_mean, t_cov, truth, scale).tolist()
    if "oracle" in rows:
        out["oracle_ratio"] = rows["model"].ratio_to(rows["oracle"])
    note = (f"ellipse covariance scale fitted on {len(val)} validation recordings: {scale:.3f}" if len(val) >= MIN_CALIBRATION
            else f"only {len(val)} validation recordings: ellipses left uncalibrated")
    out["table"] = format_reports(rows) + f"\n({note})"
    return out
