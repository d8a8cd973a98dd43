"""Spectrogram features in fixed, absolute dB units.

A recording is 4096 complex samples at 12 kHz per receiver. Each receiver's IQ
becomes a power spectrogram of 128 frequency bins x 32 frames:

* **Frames.** Non-overlapping 128-sample Hann frames (hop = n_fft = 128), so
  4096 samples give exactly 32 frames of 10.7 ms and every sample is used once.
  Overlap would add frames but no information about the level, which is what
  locates the transmitter.
* **Bins.** The two-sided baseband spectrum, fftshifted so bin 0 is -6 kHz and
  bin 64 is DC; linear bins of 12000 / 128 = 93.75 Hz. An NBFM channel
  (+-2.5-5 kHz deviation plus carrier offset) spans most of the 12 kHz, so
  linear bins keep its whole shape; a log-frequency axis would only make
  sense for audio.
* **Power units.** Bin power is ``|FFT(w x)|^2 / (n_fft * sum(w^2))``: by
  Parseval the bins of a frame sum to the frame's (window-weighted) mean
  ``|x|^2``, and white noise of power P reads P / n_fft in every bin. With
  ``|x|^2 = 1`` meaning ``reference_dbm``, a bin's level is
  ``10 log10(power) + reference_dbm`` in dBm.
* **Network units.** ``(dBm - db_offset) / db_scale``: one FIXED affine map
  for every sample, receiver and split. No per-sample z-scoring: the absolute
  level across receivers is what carries the location, and a fixed map needs
  no statistics that could go missing at inference. Levels below
  ``floor_db`` are clamped (an all-zero frame would give -inf).
* **Station offsets.** With ``station_offsets_db`` set (real receivers, whose
  gain their operators choose; estimated by
  :func:`heimdall.calibration.estimate_station_offsets` and stored with an
  imported dataset), receiver ``r``'s levels are lowered by its offset before
  the floor and the map: every receiver reads on the propagation model's
  scale, the one a model trained elsewhere expects. ``None`` (synthetic data,
  whose offsets the network learns) changes nothing.
* **Masked receivers.** A receiver marked not heard (mask False) has every
  feature set to ``mask_fill`` (network units; the default 0.0 is
  ``db_offset`` dBm per bin). The mask itself is passed to the networks too,
  so the fill value carries no meaning of its own.

Example::

    feats = SpectrogramFeatures(FeatureConfig())
    x = feats(torch.from_numpy(recordings.iq), torch.from_numpy(scene.heard))  # (N, 7, 128, 32)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from heimdall.errors import collect_problems
from heimdall.receivers import STATION_IDS

__all__ = ["FeatureConfig", "SpectrogramFeatures", "feature_config_for", "spectrogram_numpy", "validate_features"]

_WINDOWS = ("hann", "rect")


@dataclass(frozen=True)
class FeatureConfig:
    """How IQ becomes the network's input; every default lives here.

    Attributes:
        sample_rate_hz: IQ sample rate (12 kHz for the WebSDR captures).
        n_fft: frame length and FFT size; the number of frequency bins.
        hop: samples between frame starts (``hop == n_fft``: no overlap).
        n_frames: frames per recording; the IQ must hold exactly
            ``(n_frames - 1) * hop + n_fft`` samples (4096 by default).
        window: ``"hann"`` (periodic) or ``"rect"``.
        reference_dbm: the power that ``|x|^2 = 1`` represents in the IQ.
        db_offset: dBm per bin mapped to 0 network units.
        db_scale: dB per network unit (20: the -180..-40 dBm range of bins
            maps to about -2.5..4.5).
        floor_db: bin levels below this (dBm per bin) are clamped to it;
            -180 lies ~20 dB under the weakest noise floor per bin.
        mask_fill: value of every feature of a masked receiver, network units.
        station_offsets_db: per receiver (:data:`~heimdall.receivers.STATION_IDS`
            order), dB subtracted from its levels; ``None``: no correction. Left out
            of :meth:`to_dict` when ``None``, so configs without it keep their
            cache keys and saved forms.
    """

    sample_rate_hz: float = 12_000.0
    n_fft: int = 128
    hop: int = 128
    n_frames: int = 32
    window: str = "hann"
    reference_dbm: float = -100.0
    db_offset: float = -130.0
    db_scale: float = 20.0
    floor_db: float = -180.0
    mask_fill: float = 0.0
    station_offsets_db: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.station_offsets_db is not None:
            p.extend(self._coerce_offsets())
        if not self.sample_rate_hz > 0:
            p.append(f"sample_rate_hz must be > 0, got {self.sample_rate_hz}")
        for name in ("n_fft", "hop", "n_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be an integer >= 1, got {value!r}")
        if self.window not in _WINDOWS:
            p.append(f"window must be one of {', '.join(_WINDOWS)}, got {self.window!r}")
        if not (math.isfinite(self.db_scale) and self.db_scale > 0):
            p.append(f"db_scale must be finite and > 0 (dB per network unit), got {self.db_scale}; e.g. 20")
        for name in ("reference_dbm", "db_offset", "floor_db", "mask_fill"):
            if not math.isfinite(getattr(self, name)):
                p.append(f"{name} must be finite, got {getattr(self, name)}")
        collect_problems("FeatureConfig", p)

    def _coerce_offsets(self) -> list[str]:
        """Store the offsets as a tuple of floats (lists come from JSON); the problems, if any."""
        value = self.station_offsets_db
        try:
            offsets = tuple(float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return [f"station_offsets_db must be a sequence of {len(STATION_IDS)} numbers (dB, in "
                    f"{', '.join(STATION_IDS)} order) or None, got {value!r}"]
        object.__setattr__(self, "station_offsets_db", offsets)
        p = []
        if len(offsets) != len(STATION_IDS):
            p.append(f"station_offsets_db must hold one offset per receiver ({len(STATION_IDS)}: "
                     f"{', '.join(STATION_IDS)}), got {len(offsets)}; fix: estimate them with "
                     "heimdall.calibration.estimate_station_offsets")
        if not all(math.isfinite(v) for v in offsets):
            p.append(f"station_offsets_db must be finite, got {list(offsets)}; fix: use 0 for a station without an estimate")
        return p

    @property
    def n_samples(self) -> int:
        """IQ samples per receiver that the frames cover exactly."""
        return (self.n_frames - 1) * self.hop + self.n_fft

    @property
    def bin_hz(self) -> float:
        """Width of one frequency bin (93.75 Hz by default)."""
        return self.sample_rate_hz / self.n_fft

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; saved with every model so inference rebuilds the same features."""
        data = dataclasses.asdict(self)
        if self.station_offsets_db is None:
            del data["station_offsets_db"]
        else:
            data["station_offsets_db"] = list(self.station_offsets_db)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: for unknown keys (naming the valid ones) or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        collect_problems("FeatureConfig", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        return cls(**data)  # __post_init__ turns a JSON list of offsets back into a tuple


def feature_config_for(dataset_config: Mapping[str, Any], base: FeatureConfig | None = None) -> FeatureConfig:
    """The FeatureConfig to train on a dataset with: ``base`` plus the dataset's station offsets.

    An imported dataset's config may hold ``station_offsets_db`` (estimated from its
    known-source recordings by :func:`heimdall.calibration.estimate_station_offsets`);
    a synthetic one has none, and ``base`` comes back unchanged.

    Args:
        dataset_config: the dataset's ``DatasetInfo.config``.
        base: the other feature settings; default :class:`FeatureConfig`.

    Raises:
        ConfigError: the stored offsets are not one finite number per receiver.
    """
    base = base or FeatureConfig()
    offsets = dataset_config.get("station_offsets_db")
    return base if offsets is None else dataclasses.replace(base, station_offsets_db=offsets)


def _window_numpy(config: FeatureConfig) -> np.ndarray:
    if config.window == "rect":
        return np.ones(config.n_fft)
    # Periodic Hann, as torch.hann_window(periodic=True) and scipy.signal.get_window("hann").
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(config.n_fft) / config.n_fft)


def _offset_gain(config: FeatureConfig, n_receivers: int) -> np.ndarray | None:
    """Linear power factor per receiver, (R, 1, 1), that removes the station offsets; None without them."""
    if config.station_offsets_db is None:
        return None
    if n_receivers != len(config.station_offsets_db):
        raise ValueError(f"station_offsets_db holds {len(config.station_offsets_db)} offsets but the IQ has "
                         f"{n_receivers} receivers; keep STATIONS order")
    return 10.0 ** (-np.asarray(config.station_offsets_db, dtype=np.float64) / 10.0)[:, None, None]


def _check_length(n_samples: int, config: FeatureConfig) -> None:
    if n_samples != config.n_samples:
        raise ValueError(
            f"IQ must hold (n_frames - 1) * hop + n_fft = {config.n_samples} samples per receiver, got {n_samples}; "
            "trim or pad the recording, or change n_frames/hop/n_fft"
        )


def spectrogram_numpy(iq: np.ndarray, config: FeatureConfig, mask: np.ndarray | None = None) -> np.ndarray:
    """Reference implementation of :class:`SpectrogramFeatures` in float64 numpy.

    Args:
        iq: complex array (..., R, T) with ``T == config.n_samples``.
        config: feature settings.
        mask: optional bool array (..., R); False receivers get ``config.mask_fill``.

    Returns:
        float32 array (..., R, n_fft, n_frames) in network units.

    Raises:
        ValueError: when the sample count does not match the config.
    """
    x = np.asarray(iq).astype(np.complex128)
    _check_length(x.shape[-1], config)
    w = _window_numpy(config)
    starts = np.arange(config.n_frames) * config.hop
    frames = x[..., starts[:, None] + np.arange(config.n_fft)]  # (..., R, frames, n_fft)
    spec = np.fft.fftshift(np.fft.fft(frames * w, axis=-1), axes=-1)
    power = np.abs(spec) ** 2 / (config.n_fft * np.sum(w**2))
    gain = _offset_gain(config, x.shape[-2])
    if gain is not None:  # before the floor, which stays the floor of the corrected level
        power = power * gain
    db = 10.0 * np.log10(np.maximum(power, 10.0 ** ((config.floor_db - config.reference_dbm) / 10.0)))
    out = (db + config.reference_dbm - config.db_offset) / config.db_scale
    out = np.swapaxes(out, -1, -2)
    if mask is not None:
        out = np.where(np.asarray(mask, dtype=bool)[..., None, None], out, config.mask_fill)
    return out.astype(np.float32)


class SpectrogramFeatures(nn.Module):
    """IQ (B, R, T) -> features (B, R, n_fft, n_frames) float32 in network units.

    Runs before the network (and outside any exported model): it takes complex
    input, which exported graphs avoid.

    Args:
        config: feature settings; defaults to :class:`FeatureConfig`.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureConfig()
        window = torch.from_numpy(_window_numpy(self.config))  # float64, like the FFT
        self.register_buffer("window", window, persistent=False)
        self._power_scale = 1.0 / (self.config.n_fft * float(np.sum(_window_numpy(self.config) ** 2)))
        self._power_floor = 10.0 ** ((self.config.floor_db - self.config.reference_dbm) / 10.0)
        gain = _offset_gain(self.config, len(self.config.station_offsets_db or ()))
        self.register_buffer("offset_gain", None if gain is None else torch.from_numpy(gain), persistent=False)

    def forward(self, iq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the spectrogram features.

        Args:
            iq: complex tensor (B, R, T), or its real view, float (B, R, T, 2);
                computed in float64 whatever the input precision.
            mask: optional bool (B, R); False receivers are filled with
                ``config.mask_fill``. ``None`` means every receiver is heard.

        Returns:
            float32 tensor (B, R, n_fft, n_frames).

        Raises:
            ValueError: on a wrong rank, dtype or sample count, or a mask of the wrong shape.
        """
        # float64 FFT: a -40 dBm carrier and -160 dBm noise bins span 120 dB, near
        # float32's limit; the features are cheap next to the network anyway.
        x = _as_complex(iq).to(torch.complex128)
        _check_length(x.shape[-1], self.config)
        c = self.config
        frames = x.unfold(-1, c.n_fft, c.hop)  # (B, R, frames, n_fft)
        spec = torch.fft.fftshift(torch.fft.fft(frames * self.window, dim=-1), dim=-1)
        power = (spec.real.square() + spec.imag.square()) * self._power_scale
        if self.offset_gain is not None:
            if x.shape[1] != self.offset_gain.shape[0]:
                raise ValueError(f"station_offsets_db holds {self.offset_gain.shape[0]} offsets but the IQ has "
                                 f"{x.shape[1]} receivers; keep STATIONS order")
            power = power * self.offset_gain
        db = 10.0 * torch.log10(power.clamp_min(self._power_floor))
        out = ((db + (c.reference_dbm - c.db_offset)) / c.db_scale).transpose(-1, -2).to(torch.float32)
        if mask is not None:
            if mask.shape != out.shape[:2]:
                raise ValueError(f"mask must have shape (B, R) = {tuple(out.shape[:2])}, got {tuple(mask.shape)}")
            out = torch.where(mask.to(torch.bool)[..., None, None], out, torch.full_like(out, c.mask_fill))
        return out


def _as_complex(iq: torch.Tensor) -> torch.Tensor:
    if iq.is_complex():
        if iq.dim() != 3:
            raise ValueError(f"complex IQ must have shape (B, R, T), got {tuple(iq.shape)}")
        return iq
    if iq.dim() == 4 and iq.shape[-1] == 2 and iq.is_floating_point():
        return torch.view_as_complex(iq.to(torch.float64).contiguous())
    raise ValueError(
        f"IQ must be complex (B, R, T) or its real view float (B, R, T, 2), got dtype {iq.dtype} shape {tuple(iq.shape)}; "
        "use torch.from_numpy(iq) on the complex64 array"
    )


def validate_features(x: torch.Tensor, mask: torch.Tensor | None = None, n_receivers: int | None = None,
                      config: FeatureConfig | None = None) -> None:
    """Check a feature batch before it reaches a network.

    Args:
        x: features, expected float (B, R, n_fft, n_frames).
        mask: optional bool (B, R).
        n_receivers: expected R, if known (the model's receiver count).
        config: expected bin and frame counts; defaults to :class:`FeatureConfig`.

    Raises:
        ValueError: naming the problem: wrong rank, dtype, receiver count, bin
            or frame count, mask shape or dtype, or non-finite values.
    """
    c = config or FeatureConfig()
    if x.dim() != 4:
        raise ValueError(f"features must have rank 4 (B, R, {c.n_fft}, {c.n_frames}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"features must be floating point, got {x.dtype}; compute them with SpectrogramFeatures")
    if n_receivers is not None and x.shape[1] != n_receivers:
        raise ValueError(f"features must have {n_receivers} receivers (dim 1), got {x.shape[1]}; keep STATIONS order")
    if tuple(x.shape[2:]) != (c.n_fft, c.n_frames):
        raise ValueError(f"features must have {c.n_fft} bins x {c.n_frames} frames, got {tuple(x.shape[2:])}; check the FeatureConfig")
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must have shape (B, R) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {mask.dtype}; pass heard flags as torch.bool")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        b, r = (int(v) for v in torch.nonzero(bad)[0][:2])
        raise ValueError(f"features must be finite, found {int(bad.sum())} non-finite value(s), first at sample {b} receiver {r}")
