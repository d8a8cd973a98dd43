"""Text summary of a dataset: sizes, SNR/heard statistics, and the two
yardsticks (Bayes oracle, network centre) on its held-out test split."""
from __future__ import annotations

import numpy as np

from heimdall.catalog import Catalog
from heimdall.datasets import TEST, SplitConfig, open_dataset, split_codes
from heimdall.errors import ConfigError
from heimdall.geometry import default_frame
from heimdall.metrics import format_reports, localization_report
from heimdall.oracle import BayesOracle, centre_baseline
from heimdall.receivers import STATION_IDS
from heimdall.scene import GeneratorConfig

__all__ = ["describe_dataset", "baseline_reports"]


def baseline_reports(config: GeneratorConfig, labels: dict[str, np.ndarray], *, moments: bool = False) -> dict:
    """Oracle and centre reports on the given recordings (labels from the catalogue).

    The oracle row uses the coverage-calibrated ellipse of the exact posterior
    (see :meth:`BayesOracle.posterior`); ``moments=True`` adds the raw moment ellipse.
    """
    east, north = default_frame().to_local(labels["tx_lat"], labels["tx_lon"])
    truth = np.stack([east, north], axis=-1)
    oracle = BayesOracle(config)
    observed = (labels["rx_power_dbm"], labels["heard"], labels["frequency_hz"])
    mean, cov = oracle.posterior(*observed, ellipse="calibrated")
    rows = {"oracle": localization_report(mean, cov, truth)}
    if moments:
        m_mean, m_cov = oracle.posterior(*observed)
        rows["oracle moments"] = localization_report(m_mean, m_cov, truth)
    c_mean, c_cov = centre_baseline(config, len(truth))
    rows["centre"] = localization_report(c_mean, c_cov, truth)
    return rows


def describe_dataset(catalog: Catalog, name: str, *, max_oracle: int = 2000) -> str:
    """Multi-line description of dataset ``name``.

    Args:
        catalog: the catalogue holding it.
        name: dataset name (must be complete).
        max_oracle: at most this many test recordings go to the oracle (it costs ~ms each), >= 1.

    Raises:
        ConfigError: ``max_oracle`` < 1.
        NotFoundError / DataError: no such dataset, or it is pending.
    """
    if max_oracle < 1:
        raise ConfigError("describe", [f"max_oracle must be >= 1, got {max_oracle}"])
    info = open_dataset(catalog, name)
    labels = catalog.recordings(name)
    n = len(labels["recording_id"])
    heard = labels["heard"].astype(bool)
    snr = labels["snr_db"]
    size = sum(s.n_bytes for s in catalog.shards(name))
    lines = [
        f"dataset {info.name!r} ({info.kind}, seed {info.seed}), created {info.created_at:%Y-%m-%d %H:%M}",
        f"  {n} recordings in {info.n_shards} shards, {size / 1e6:.1f} MB, store {info.store}",
        f"  receivers heard per recording: mean {heard.sum(1).mean():.2f} of {heard.shape[1]}; "
        f"inside hull {np.mean(labels['inside_hull']):.1%}",
        f"  SNR of heard receivers (dB): p10 {np.percentile(snr[heard], 10):.1f}, "
        f"median {np.median(snr[heard]):.1f}, p90 {np.percentile(snr[heard], 90):.1f}",
        "  heard fraction per receiver: " + ", ".join(f"{s} {heard[:, i].mean():.0%}" for i, s in enumerate(STATION_IDS)),
    ]
    if info.kind != "synthetic":
        lines.append("  (imported data: no generator, so no oracle baseline)")
        return "\n".join(lines)
    config = GeneratorConfig.from_dict(info.config)
    test = np.flatnonzero(split_codes(labels["recording_id"], labels["split_group"], SplitConfig()) == TEST)[:max_oracle]
    # A small dataset may have no recording in the test split: then only the 'all' rows.
    rows = baseline_reports(config, {k: v[test] for k, v in labels.items()}) if len(test) else {}
    # The oracle is not trained, so every recording is held out for it: the whole
    # dataset gives its calibration with a smaller binomial error than the test split.
    every = np.arange(min(n, max_oracle))
    rows.update(_rows(config, {k: v[every] for k, v in labels.items()}, " all"))
    lines += ["", f"baselines (km, local frame) on the held-out test split ({len(test)} recordings) and on "
              f"{len(every)} recordings of the whole dataset ('all'); (hull) = transmitter inside the receivers' hull:",
              format_reports(rows),
              f"nominal coverage: 1σ 0.393, 2σ 0.865, 95% 0.950; binomial std of 1σ coverage on the 'all' rows "
              f"±{np.sqrt(0.393 * 0.607 / max(len(every), 1)):.3f}. 'oracle' draws the exact posterior's mean with "
              f"an ellipse scaled so the posterior's own mass in its 1σ/2σ ellipses is closest to nominal; 'oracle moments' uses its raw "
              f"covariance, which over-covers at 1σ because the posterior has long tails."]
    return "\n".join(lines)


def _rows(config: GeneratorConfig, sub: dict[str, np.ndarray], tag: str) -> dict:
    rows = {f"{k}{tag}": v for k, v in baseline_reports(config, sub, moments=True).items()}
    inside = sub["inside_hull"].astype(bool)
    if inside.any():
        hull = baseline_reports(config, {k: v[inside] for k, v in sub.items()})
        rows.update({f"{k}{tag} (hull)": v for k, v in hull.items()})
    return rows
