"""Robustness to receiver gain: what a +6 dB gain step at one station does to
models trained with the gain fixed (today's generator) and with unknown gain
drift (``GeneratorConfig.gain_drift_sigma_db``), next to the Bayes oracle.

    python bench/bench_gain.py                      # ~6-10 min on 2 cores
    python bench/bench_gain.py --train 600 --epochs 2 --test 200   # a quick look

Everything is in memory (no catalogue, no Ray): two ResNets (default config)
are trained with plain Lightning on the CPU, one per world, for the same epochs
on the same number of recordings, their ellipses calibrated on a validation set
of their own world, then scored on held-out test sets:

- ``fixed``: today's world;
- ``drift``: the unknown-gain world (per-recording, per-station drift);
- ``+6 dB signal``: the fixed world after training, with one station's
  signal-path gain 6 dB higher (what the drift models: signal and SNR move,
  the noise floor does not; more receivers hear);
- ``+6 dB receiver``: the fixed world with one station's whole IQ 6 dB louder
  (signal and noise, as when an operator turns the RF gain up; who hears is
  unchanged).

When :mod:`heimdall.calibration` offers ``estimate_station_offsets`` and
:class:`~heimdall.features.FeatureConfig` its ``station_offsets_db``, a third
row re-estimates the offsets from known-source recordings of the shifted world
and feeds them to the fixed-world model's features.

The oracle is given what it is always given (the recorded power minus the
known calibration, and who heard), so it too is blind to the step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from heimdall.calibration import fit_covariance_scale
from heimdall.data import HeimdallDataModule, HeimdallDataset
from heimdall.evaluation import predict
from heimdall.features import FeatureConfig, SpectrogramFeatures
from heimdall.geometry import LocalFrame
from heimdall.losses import LossConfig
from heimdall.metrics import LocalizationReport, localization_report
from heimdall.models import ResNetConfig, TargetScaling, build_model
from heimdall.module import LocalizationModule, OptimizerConfig
from heimdall.oracle import BayesOracle
from heimdall.receivers import STATIONS, station_index
from heimdall.scene import GeneratorConfig, Scene, sample_scene, station_params
from heimdall.synthetic import synthesize_iq
from tuning.study.spaces import TrialConfigs, fit_budget


def _shifted(scene: Scene, config: GeneratorConfig, station: int, db: float) -> Scene:
    """``scene`` with ``db`` more signal at one station (SNR and heard follow)."""
    rx = scene.rx_power_dbm.copy()
    rx[:, station] += db
    snr = rx - station_params(config).noise_floor_dbm
    return dataclasses.replace(scene, rx_power_dbm=rx, snr_db=snr, heard=snr >= config.snr_threshold_db)


def _world(config: GeneratorConfig, n: int, seed: int, *, station: int = 0, signal_db: float = 0.0,
           receiver_db: float = 0.0) -> tuple[Scene, np.ndarray]:
    """Scene and IQ of ``n`` recordings, optionally with one station's gain stepped."""
    rng = np.random.default_rng([seed, 77])
    scene = sample_scene(config, n, rng)
    if signal_db:
        scene = _shifted(scene, config, station, signal_db)
    iq = synthesize_iq(config, scene, rng)
    if receiver_db:
        iq[:, station] *= np.float32(10.0 ** (receiver_db / 20.0))
        scene = dataclasses.replace(scene, rx_power_dbm=scene.rx_power_dbm + receiver_db * (np.arange(len(STATIONS)) == station))
    return scene, iq


def _dataset(scene: Scene, iq: np.ndarray, features: FeatureConfig) -> HeimdallDataset:
    feats = SpectrogramFeatures(features)
    with torch.no_grad():
        x = torch.cat([feats(torch.from_numpy(iq[i:i + 64]), torch.from_numpy(scene.heard[i:i + 64]))
                       for i in range(0, len(scene), 64)])
    scaling = TargetScaling()
    east, north = LocalFrame(scaling.origin_lat, scaling.origin_lon).to_local(scene.tx_lat, scene.tx_lon)
    target = torch.from_numpy(np.stack([east, north], -1) / scaling.target_scale_km).float()
    return HeimdallDataset(x, torch.from_numpy(scene.heard), target, np.arange(len(scene)))


def _train(train: HeimdallDataset, val: HeimdallDataset, epochs: int, seed: int) -> tuple[LocalizationModule, float]:
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    c = fit_budget(TrialConfigs("resnet", ResNetConfig(), LossConfig(), OptimizerConfig()), epochs)
    module = LocalizationModule(build_model("resnet", c.model), c.loss, c.optimizer)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=HeimdallDataModule({"train": train, "val": val, "test": val},
                                                      c.optimizer.batch_size, seed))
    return module, time.perf_counter() - start


def _truth(ds: HeimdallDataset) -> np.ndarray:
    return ds.target.double().numpy() * TargetScaling().target_scale_km


def _calibrated_scale(module: LocalizationModule, val: HeimdallDataset) -> float:
    module.calibrate(1.0)
    mean, cov = predict(module, val)
    return fit_covariance_scale(mean, cov, _truth(val))


def _score(module: LocalizationModule, scale: float, ds: HeimdallDataset) -> LocalizationReport:
    mean, cov = predict(module, ds)
    return localization_report(mean, cov * scale, _truth(ds))


def _oracle(config: GeneratorConfig, scene: Scene) -> LocalizationReport:
    mean, cov = BayesOracle(config).posterior(scene.rx_power_dbm, scene.heard, scene.frequency_hz, ellipse="calibrated")
    return localization_report(mean, cov, np.stack([scene.tx_east_km, scene.tx_north_km], -1))


def _offset_estimator():
    """The station-offset estimate of :mod:`heimdall.calibration` when this checkout has it, else None."""
    import heimdall.calibration as cal

    if hasattr(cal, "estimate_station_offsets") and "station_offsets_db" in {f.name for f in dataclasses.fields(FeatureConfig)}:
        return cal
    return None


def _estimated_offsets(cal, config: GeneratorConfig, scene: Scene, iq: np.ndarray, features: FeatureConfig) -> np.ndarray:
    """Offsets from known-source recordings: positions and carriers known, transmit power not."""
    level = cal.iq_signal_level_dbm(iq, scene.snr_db, features.reference_dbm)
    labels = dict(tx_lat=scene.tx_lat, tx_lon=scene.tx_lon, frequency_hz=scene.frequency_hz, heard=scene.heard,
                  snr_db=scene.snr_db)
    return cal.estimate_station_offsets(level, labels, config).offsets_db


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1500, help="training recordings per world")
    p.add_argument("--val", type=int, default=300, help="validation recordings per world (ellipse scale)")
    p.add_argument("--test", type=int, default=400, help="recordings per test world")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--known", type=int, default=300, help="known-source recordings per offset estimate")
    p.add_argument("--drift", type=float, default=6.0, help="gain_drift_sigma_db of the drift world")
    p.add_argument("--shift", type=float, default=6.0, help="gain step after training, dB")
    p.add_argument("--station", default="torino", help="station whose gain steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    station = station_index(args.station)
    fixed, drift = GeneratorConfig(), GeneratorConfig(gain_drift_sigma_db=args.drift)
    features = FeatureConfig()
    t0 = time.perf_counter()

    tests = {
        "fixed": (fixed, _world(fixed, args.test, args.seed + 10)),
        "drift": (drift, _world(drift, args.test, args.seed + 11)),
        f"+{args.shift:g} dB signal": (fixed, _world(fixed, args.test, args.seed + 10, station=station, signal_db=args.shift)),
        f"+{args.shift:g} dB receiver": (fixed, _world(fixed, args.test, args.seed + 10, station=station,
                                                         receiver_db=args.shift)),
    }
    test_ds = {k: _dataset(*w, features) for k, (_, w) in tests.items()}
    rows: dict[str, dict[str, LocalizationReport]] = {"oracle (knows the world's drift sigma, not the step)": {}}
    for k, (cfg, (scene, _)) in tests.items():
        rows["oracle (knows the world's drift sigma, not the step)"][k] = _oracle(cfg, scene)
    print(f"data + oracle: {time.perf_counter() - t0:.0f} s", flush=True)

    for name, cfg, seed in (("model trained with fixed gain", fixed, 1), (f"model trained with drift {args.drift:g} dB", drift, 2)):
        train = _dataset(*_world(cfg, args.train, args.seed + seed), features)
        val = _dataset(*_world(cfg, args.val, args.seed + seed + 100), features)
        module, secs = _train(train, val, args.epochs, args.seed)
        scale = _calibrated_scale(module, val)
        rows[name] = {k: _score(module, scale, ds) for k, ds in test_ds.items()}
        print(f"{name}: trained {args.epochs} epochs in {secs:.0f} s", flush=True)
        if cfg is fixed:
            fixed_model, fixed_scale = module, scale

    cal = _offset_estimator()
    if cal is not None:
        rows["model trained with fixed gain, offsets re-estimated"] = _corrected(cal, fixed_model, fixed_scale, tests,
                                                                               features, args)
    else:
        print("station-offset estimate not in this checkout: its row is skipped")

    _print(rows, list(tests), args, time.perf_counter() - t0)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({r: {k: v.to_dict() for k, v in cols.items()} for r, cols in rows.items()}, fh, indent=2, default=float)


def _corrected(cal, module: LocalizationModule, scale: float, tests: dict, features: FeatureConfig,
               args: argparse.Namespace) -> dict[str, LocalizationReport]:
    """The fixed-gain model fed features corrected by re-estimated offsets.

    Offsets are estimated from ``--known`` known-source recordings of the
    training world and of each test world (other transmitters than the test's);
    the model learnt the training world's levels, so the features are corrected
    by the change, ``new - training``: the same features a model trained on
    offset-corrected data would see after subtracting the new offsets.
    """
    fixed = GeneratorConfig()
    before = _estimated_offsets(cal, fixed, *_world(fixed, args.known, args.seed + 20), features)
    station = station_index(args.station)
    steps = {"fixed": {}, f"+{args.shift:g} dB signal": {"signal_db": args.shift},
             f"+{args.shift:g} dB receiver": {"receiver_db": args.shift}}
    out = {}
    for k, step in steps.items():
        after = _estimated_offsets(cal, fixed, *_world(fixed, args.known, args.seed + 21, station=station, **step),
                                   features)
        print(f"{k}: offset change at {args.station} {after[station] - before[station]:+.2f} dB, "
              f"others within {np.abs(np.delete(after - before, station)).max():.2f} dB", flush=True)
        corrected = dataclasses.replace(features, station_offsets_db=tuple(float(x) for x in after - before))
        scene, iq = tests[k][1]
        out[k] = _score(module, scale, _dataset(scene, iq, corrected))
    return out


def _print(rows: dict[str, dict[str, LocalizationReport]], worlds: list[str], args: argparse.Namespace, secs: float) -> None:
    print(f"\n{args.train} training recordings per world, {args.epochs} epochs, {args.test} test recordings per world; "
          f"step at {args.station}; {secs / 60:.1f} min")
    print("| row | " + " | ".join(f"{w}: median km / cov 1σ / cov 2σ" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    for name, cols in rows.items():
        cells = [f"{cols[w].median_km:.1f} / {cols[w].coverage_1sigma:.2f} / {cols[w].coverage_2sigma:.2f}" if w in cols
                 else "—" for w in worlds]
        print(f"| {name} | " + " | ".join(cells) + " |")
    oracle = next(iter(rows.values()))
    for name, cols in list(rows.items())[1:]:
        print(f"{name}: median / oracle " + ", ".join(f"{w} {cols[w].ratio_to(oracle[w]):.2f}" for w in worlds if w in cols))


if __name__ == "__main__":
    main()
