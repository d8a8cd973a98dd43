"""Localization networks: spectrogram features of R receivers -> a 2-D Gaussian.

Every network maps features (B, R, n_fft, n_frames) in fixed dB units plus a
bool mask (B, R) ("receiver heard") to a *head* in the normalised local frame
(:func:`heimdall.geometry.default_frame`, positions divided by
``TargetScaling.target_scale_km``):

====== ==========================================================
column meaning
====== ==========================================================
0, 1   mean east, mean north (target_scale_km units)
2, 3   ``s_e, s_n``: sigma = ``sigma_floor + exp(s)`` (see :func:`sigma_from_log`)
4      ``r``: rho = ``rho_limit * tanh(r)`` (``head="full"`` only)
====== ==========================================================

Only :func:`decode_head` interprets these columns, and
:class:`GeographicOutput` turns them into what consumers read (lat/lon in
degrees, sigmas in meters), so no consumer ever sees normalised units.

Inductive bias. The location is carried by each receiver's band power
relative to its noise floor. Both networks therefore

* look at each receiver on its own first (the ResNet's ``receiver_grouped``
  stem, the set network's shared per-receiver encoder) before mixing receivers;
* add a parameter-free *level summary* per receiver: the band power
  (a log-sum-exp over the spectrogram, which with the default
  ``level_sharpness`` is exactly ``10 log10(mean frame power)`` in feature
  units) and the mean bin level (a noise-floor estimate), so the head sees the
  quantity that matters without having to rediscover Parseval;
* zero the features of masked receivers inside the network, so what a masked
  receiver's features hold never matters.

Forward passes contain no Python control flow on tensor values and no complex
tensors, so :class:`GeographicOutput` exports with ``torch.export`` / ONNX.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from heimdall.errors import ConfigError, collect_problems
from heimdall.geometry import EARTH_RADIUS_KM, default_frame
from heimdall.receivers import network_centroid

__all__ = [
    "HEADS",
    "ARCHITECTURES",
    "ResNetConfig",
    "SetNetConfig",
    "LocalizationNet",
    "ReceiverSetNet",
    "TargetScaling",
    "GeographicOutput",
    "build_model",
    "model_config_from_dict",
    "head_size",
    "sigma_from_log",
    "rho_from_raw",
    "decode_head",
    "local_to_geographic_torch",
]

HEADS = ("diag", "full")
_NORMS = ("batch", "group", "layer", "none")
_POOLINGS = ("avg", "max", "attention")
_STEMS = ("receiver_grouped", "mixed")
# ln(10)/10 x db_scale (20 dB per unit by default): makes the level summary the exact band power.
_DEFAULT_SHARPNESS = math.log(10.0) / 10.0 * 20.0
# exp(6) ~ 400 target units (40,000 km): a cap that only stops overflow, never binds in practice.
_LOG_SIGMA_MAX = 6.0
# Initial sigma ~ 0.5 target units (50 km), about the prior's spread: NLL starts sane.
_INIT_SIGMA = 0.5
# Attention score of a masked receiver: finite so an all-masked row gives no NaN.
_MASKED_SCORE = -1e9


def head_size(head: str) -> int:
    """Number of head columns: 4 for ``"diag"``, 5 for ``"full"``."""
    return 5 if head == "full" else 4


def _check_common(p: list[str], cfg: Any) -> None:
    if cfg.head not in HEADS:
        p.append(f"head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.norm not in _NORMS:
        p.append(f"norm must be one of {', '.join(_NORMS)}, got {cfg.norm!r}")
    if cfg.kernel_size not in (3, 5):
        p.append(f"kernel_size must be 3 or 5, got {cfg.kernel_size!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        p.append(f"dropout must lie in [0, 1), got {cfg.dropout}")
    if not (isinstance(cfg.head_hidden, int) and cfg.head_hidden >= 8):
        p.append(f"head_hidden must be an integer >= 8, got {cfg.head_hidden!r}")
    if not cfg.level_sharpness > 0:
        p.append(f"level_sharpness must be > 0, got {cfg.level_sharpness}; ln(10)/10 * db_scale is exact")


class _ConfigMixin:
    """to_dict/from_dict shared by the frozen model configs."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        collect_problems(cls.__name__, [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class ResNetConfig(_ConfigMixin):
    """A ResNet over receivers-as-channels spectrograms.

    Attributes:
        stage_depths: residual blocks per stage; each stage halves both axes.
        width: channels of the first stage.
        width_multiplier: channel growth from one stage to the next.
        kernel_size: 3 or 5.
        dropout: dropout before the head's last layer.
        norm: ``"batch"``, ``"group"``, ``"layer"`` (one group) or ``"none"``.
        pooling: global pooling of the last stage, ``"avg"``, ``"max"`` or ``"attention"``.
        stem: ``"receiver_grouped"`` (per-receiver convolutions, then a 1x1
            mix: level features first, geometry later) or ``"mixed"`` (one
            convolution over all receivers at once).
        stem_channels: channels per receiver in the grouped stem.
        head: ``"diag"`` (4 outputs) or ``"full"`` (5, with a correlation).
        head_hidden: hidden units of the head's MLP.
        level_summary: feed the per-receiver band power and mean level to the head.
        level_sharpness: log-sum-exp sharpness of the level summary, per
            feature unit; ``ln(10)/10 * db_scale`` makes it the exact band power.
    """

    stage_depths: tuple[int, ...] = (1, 1)
    width: int = 16
    width_multiplier: float = 2.0
    kernel_size: int = 3
    dropout: float = 0.1
    norm: str = "batch"
    pooling: str = "avg"
    stem: str = "receiver_grouped"
    stem_channels: int = 4
    head: str = "diag"
    head_hidden: int = 128
    level_summary: bool = True
    level_sharpness: float = _DEFAULT_SHARPNESS

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_common(p, self)
        if not self.stage_depths or any(not isinstance(d, int) or d < 1 for d in self.stage_depths):
            p.append(f"stage_depths must be a non-empty tuple of integers >= 1, got {self.stage_depths!r}")
        elif len(self.stage_depths) > 5:
            p.append(f"stage_depths may have at most 5 stages (each halves 128 x 32), got {len(self.stage_depths)}")
        if not (isinstance(self.width, int) and self.width >= 4):
            p.append(f"width must be an integer >= 4, got {self.width!r}")
        if not 1.0 <= self.width_multiplier <= 4.0:
            p.append(f"width_multiplier must lie in [1, 4], got {self.width_multiplier}")
        if self.pooling not in _POOLINGS:
            p.append(f"pooling must be one of {', '.join(_POOLINGS)}, got {self.pooling!r}")
        if self.stem not in _STEMS:
            p.append(f"stem must be one of {', '.join(_STEMS)}, got {self.stem!r}")
        if not (isinstance(self.stem_channels, int) and self.stem_channels >= 1):
            p.append(f"stem_channels must be an integer >= 1, got {self.stem_channels!r}")
        collect_problems("ResNetConfig", p)

    def stage_widths(self) -> list[int]:
        """Channels of each stage."""
        return [int(round(self.width * self.width_multiplier**i)) for i in range(len(self.stage_depths))]


@dataclass(frozen=True)
class SetNetConfig(_ConfigMixin):
    """A permutation-invariant network over the set of heard receivers.

    Attributes:
        encoder_channels: channels of the shared per-receiver CNN; each layer halves both axes.
        embed_dim: per-receiver embedding size.
        n_layers: masked self-attention blocks between receivers (0: pure attention pooling).
        n_heads: attention heads; must divide ``embed_dim``.
        n_queries: learned queries of the attention pooling (outputs concatenated).
        kernel_size: 3 or 5.
        dropout: dropout in the attention blocks and the head.
        norm: normalisation of the encoder CNN (``"group"`` keeps a receiver's
            statistics its own; ``"batch"`` pools them over the batch).
        head: ``"diag"`` or ``"full"``.
        head_hidden: hidden units of the head's MLP.
        level_summary, level_sharpness: as in :class:`ResNetConfig`.
        position_scale_km: receiver positions are divided by this before embedding.
    """

    encoder_channels: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 64
    n_layers: int = 1
    n_heads: int = 4
    n_queries: int = 1
    kernel_size: int = 3
    dropout: float = 0.1
    norm: str = "group"
    head: str = "diag"
    head_hidden: int = 128
    level_summary: bool = True
    level_sharpness: float = _DEFAULT_SHARPNESS
    position_scale_km: float = 100.0

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_common(p, self)
        if not self.encoder_channels or any(not isinstance(c, int) or c < 1 for c in self.encoder_channels):
            p.append(f"encoder_channels must be a non-empty tuple of integers >= 1, got {self.encoder_channels!r}")
        elif len(self.encoder_channels) > 5:
            p.append(f"encoder_channels may have at most 5 layers (each halves 128 x 32), got {len(self.encoder_channels)}")
        if not (isinstance(self.embed_dim, int) and self.embed_dim >= 4):
            p.append(f"embed_dim must be an integer >= 4, got {self.embed_dim!r}")
        if not (isinstance(self.n_heads, int) and self.n_heads >= 1) or (
            isinstance(self.embed_dim, int) and isinstance(self.n_heads, int) and self.n_heads >= 1 and self.embed_dim % self.n_heads
        ):
            p.append(f"n_heads must be an integer >= 1 dividing embed_dim={self.embed_dim}, got {self.n_heads!r}")
        if not (isinstance(self.n_layers, int) and 0 <= self.n_layers <= 8):
            p.append(f"n_layers must be an integer in [0, 8], got {self.n_layers!r}")
        if not (isinstance(self.n_queries, int) and 1 <= self.n_queries <= 8):
            p.append(f"n_queries must be an integer in [1, 8], got {self.n_queries!r}")
        if not self.position_scale_km > 0:
            p.append(f"position_scale_km must be > 0, got {self.position_scale_km}")
        collect_problems("SetNetConfig", p)


# -- output parameterisation ---------------------------------------------------


def sigma_from_log(log_sigma: torch.Tensor, sigma_floor: float) -> torch.Tensor:
    """Sigma from the head's log-sigma column: ``sigma_floor + exp(s)``.

    The floor is added rather than clamped, so the gradient stays non-zero
    and finite however close sigma gets to it; ``s`` is capped at
    ``exp(6)`` only against overflow.
    """
    return sigma_floor + torch.exp(log_sigma.clamp(max=_LOG_SIGMA_MAX))


def rho_from_raw(rho_raw: torch.Tensor, rho_limit: float) -> torch.Tensor:
    """Correlation from the head's raw column: ``rho_limit * tanh(r)``, so ``|rho| < rho_limit``."""
    return rho_limit * torch.tanh(rho_raw)


def decode_head(head: torch.Tensor, sigma_floor: float, rho_limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split a head (B, 4|5) into mean (B, 2), sigma (B, 2) and rho (B,) or None.

    Units stay normalised (target_scale_km); see :class:`GeographicOutput` for physical ones.
    """
    mean = head[:, 0:2]
    sigma = sigma_from_log(head[:, 2:4], sigma_floor)
    rho = rho_from_raw(head[:, 4], rho_limit) if head.shape[-1] == 5 else None
    return mean, sigma, rho


# -- building blocks -----------------------------------------------------------


def _norm2d(kind: str, channels: int, groups: int = 8) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        g = math.gcd(channels, groups)
        return nn.GroupNorm(g, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class _BasicBlock(nn.Module):
    """Two convolutions with a residual connection (ResNet-18 style)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout, k, stride), _norm2d(norm, cout), nn.ReLU(inplace=True),
            _conv(cout, cout, k), _norm2d(norm, cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), _norm2d(norm, cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _LevelSummary(nn.Module):
    """Per receiver: band power (log-sum-exp over bins, mean over frames) and mean bin level, (B, R, 2)."""

    def __init__(self, sharpness: float) -> None:
        super().__init__()
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.sharpness
        n_frames = x.shape[-1]
        # Sum of bin powers per frame, averaged over frames: one log-sum-exp over both axes.
        band = torch.logsumexp(a * x.flatten(2), dim=-1) / a - math.log(n_frames) / a
        return torch.stack([band, x.mean(dim=(-1, -2))], dim=-1)


def _head(n_in: int, hidden: int, head: str, dropout: float) -> nn.Sequential:
    out = nn.Linear(hidden, head_size(head))
    with torch.no_grad():
        out.weight.mul_(0.1)
        out.bias.zero_()
        out.bias[2:4] = math.log(_INIT_SIGMA)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), out)


def _full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(torch.bool)


# -- ResNet --------------------------------------------------------------------


class LocalizationNet(nn.Module):
    """ResNet over (B, R, n_fft, n_frames) features with receivers as channels.

    The mask enters as one constant plane per receiver, interleaved with its
    features (channels ``[x_0, m_0, x_1, m_1, ...]``), so "not heard" is visible
    to the very first convolution; masked receivers' features are zeroed.

    Args:
        in_channels: number of receivers R.
        config: architecture; defaults to :class:`ResNetConfig`.
    """

    arch = "resnet"

    def __init__(self, in_channels: int = 7, config: ResNetConfig | None = None) -> None:
        super().__init__()
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ConfigError("LocalizationNet", [f"in_channels (receivers) must be an integer >= 1, got {in_channels!r}"])
        self.config = cfg = config or ResNetConfig()
        self.n_receivers = r = in_channels
        widths = cfg.stage_widths()
        self.stem = self._stem(cfg, r, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for depth, cout in zip(cfg.stage_depths, widths):
            for i in range(depth):
                blocks.append(_BasicBlock(cin, cout, cfg.kernel_size, 2 if i == 0 else 1, cfg.norm))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.attention = nn.Conv2d(cin, 1, 1) if cfg.pooling == "attention" else None
        self.level = _LevelSummary(cfg.level_sharpness) if cfg.level_summary else None
        n_in = cin + r + (2 * r if cfg.level_summary else 0)
        self.head = _head(n_in, cfg.head_hidden, cfg.head, cfg.dropout)

    @staticmethod
    def _stem(cfg: ResNetConfig, r: int, width: int) -> nn.Sequential:
        k = cfg.kernel_size
        if cfg.stem == "mixed":
            return nn.Sequential(_conv(2 * r, width, k, 2), _norm2d(cfg.norm, width), nn.ReLU(inplace=True))
        c = r * cfg.stem_channels
        return nn.Sequential(
            _conv(2 * r, c, k, 2, groups=r), _norm2d(cfg.norm, c, groups=r), nn.ReLU(inplace=True),
            _conv(c, c, k, 1, groups=r), _norm2d(cfg.norm, c, groups=r), nn.ReLU(inplace=True),
            _conv(c, width, 1), _norm2d(cfg.norm, width), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head (B, 4|5) from features (B, R, F, T) and an optional bool mask (B, R) (None: all heard)."""
        m = _full_mask(x, mask)
        mf = m.to(x.dtype)
        x = torch.where(m[..., None, None], x, torch.zeros_like(x))
        planes = mf[..., None, None].expand_as(x)
        h = self.stages(self.stem(torch.stack([x, planes], dim=2).flatten(1, 2)))
        parts = [self._pool(h), mf]
        if self.level is not None:
            parts.append((self.level(x) * mf[..., None]).flatten(1))
        return self.head(torch.cat(parts, dim=1))

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            w = torch.softmax(self.attention(h).flatten(2), dim=-1)  # (B, 1, F*T)
            return (h.flatten(2) * w).sum(-1)
        if self.config.pooling == "max":
            return h.amax(dim=(-1, -2))
        return h.mean(dim=(-1, -2))


# -- set network ---------------------------------------------------------------


def _masked_softmax(scores: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis ignoring masked keys; an all-masked row gives zeros, not NaN."""
    w = torch.softmax(scores.masked_fill(~key_mask, _MASKED_SCORE), dim=-1) * key_mask.to(scores.dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


class _MaskedAttention(nn.Module):
    """Multi-head attention of ``queries`` over keys/values, masked keys excluded."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, r, d = h.shape
        nq = queries.shape[1]
        dh = d // self.heads
        q = self.q(queries).view(b, nq, self.heads, dh).transpose(1, 2)
        k, v = self.kv(h).view(b, r, 2, self.heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        w = _masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), mask[:, None, None, :])
        return self.out(self.drop(w @ v).transpose(1, 2).reshape(b, nq, d))


class _SetBlock(nn.Module):
    """Pre-norm transformer block over receivers with masked keys."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _MaskedAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.norm1(h)
        h = h + self.attn(z, z, mask)
        return h + self.mlp(self.norm2(h))


class ReceiverSetNet(nn.Module):
    """Set network: shared per-receiver encoder + receiver position -> masked attention pooling -> head.

    Invariant to the order of receivers (permute features, mask and positions
    together) and blind to masked receivers. A recording heard by nobody gets
    the head of an empty set (pooled embedding zero).

    Args:
        n_receivers: R; receivers' positions default to
            ``default_frame().stations_local()``, which needs R = 7.
        config: architecture; defaults to :class:`SetNetConfig`.
        positions_km: (R, 2) east/north km of the receivers, to override the default network.

    Raises:
        ConfigError: when no positions are given and R differs from the default network's.
    """

    arch = "setnet"

    def __init__(self, n_receivers: int = 7, config: SetNetConfig | None = None, positions_km: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SetNetConfig()
        pos = default_frame().stations_local() if positions_km is None else np.asarray(positions_km, dtype=np.float64)
        if pos.shape != (n_receivers, 2):
            raise ConfigError("ReceiverSetNet", [
                f"positions_km must have shape (n_receivers, 2) = ({n_receivers}, 2), got {pos.shape}; "
                "pass positions_km for a network other than the default seven stations"
            ])
        self.n_receivers = n_receivers
        self.register_buffer("positions", torch.tensor(pos / cfg.position_scale_km, dtype=torch.float32))
        self.encoder = self._encoder(cfg)
        d = cfg.embed_dim
        self.level = _LevelSummary(cfg.level_sharpness) if cfg.level_summary else None
        self.embed = nn.Linear(cfg.encoder_channels[-1] + (2 if cfg.level_summary else 0), d)
        self.position = nn.Sequential(nn.Linear(2, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(_SetBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(1, cfg.n_queries, d) * 0.02)
        self.pool = _MaskedAttention(d, cfg.n_heads, cfg.dropout)
        self.head = _head(cfg.n_queries * d + 1, cfg.head_hidden, cfg.head, cfg.dropout)

    @staticmethod
    def _encoder(cfg: SetNetConfig) -> nn.Sequential:
        layers: list[nn.Module] = []
        cin = 1
        for cout in cfg.encoder_channels:
            layers += [_conv(cin, cout, cfg.kernel_size, 2), _norm2d(cfg.norm, cout), nn.ReLU(inplace=True)]
            cin = cout
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Head (B, 4|5) from features (B, R, F, T), optional bool mask (B, R).

        ``positions`` (R, 2) or (B, R, 2), normalised by ``position_scale_km``,
        overrides the stored receiver positions (used to permute receivers).
        """
        m = _full_mask(x, mask)
        b, r = x.shape[:2]
        x = torch.where(m[..., None, None], x, torch.zeros_like(x))
        enc = self.encoder(x.reshape(b * r, 1, *x.shape[2:])).mean(dim=(-1, -2)).view(b, r, -1)
        if self.level is not None:
            enc = torch.cat([enc, self.level(x)], dim=-1)
        pos = self.positions if positions is None else positions
        h = self.embed(enc) + self.position(pos.to(x.dtype)).expand(b, r, -1)
        h = torch.where(m[..., None], h, torch.zeros_like(h))
        for block in self.blocks:
            h = block(h, m)
        pooled = self.pool(self.queries.expand(b, -1, -1), self.norm(h), m).flatten(1)
        heard = m.to(x.dtype).mean(dim=1, keepdim=True)
        return self.head(torch.cat([pooled, heard], dim=1))


# -- geography -----------------------------------------------------------------


@dataclass(frozen=True)
class TargetScaling:
    """How the normalised head maps to the physical frame; saved with every model.

    Attributes:
        origin_lat, origin_lon: tangent-plane origin in degrees (default: the
            network centroid, i.e. :func:`heimdall.geometry.default_frame`).
        target_scale_km: km per normalised unit of the targets and head.
    """

    origin_lat: float = field(default_factory=lambda: network_centroid()[0])
    origin_lon: float = field(default_factory=lambda: network_centroid()[1])
    target_scale_km: float = 100.0

    def __post_init__(self) -> None:
        p: list[str] = []
        if not -90.0 < self.origin_lat < 90.0:
            p.append(f"origin_lat must lie in (-90, 90), got {self.origin_lat}")
        if not -180.0 <= self.origin_lon <= 180.0:
            p.append(f"origin_lon must lie in [-180, 180], got {self.origin_lon}")
        if not (math.isfinite(self.target_scale_km) and self.target_scale_km > 0):
            p.append(f"target_scale_km must be finite and > 0, got {self.target_scale_km}; ~100 km suits this network")
        collect_problems("TargetScaling", p)

    def to_dict(self) -> dict[str, float]:
        """Plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetScaling:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        collect_problems("TargetScaling", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        return cls(**data)


def local_to_geographic_torch(
    east_km: torch.Tensor, north_km: torch.Tensor, origin_lat: float, origin_lon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthographic tangent plane -> (lat, lon) degrees, as ``LocalFrame.to_geographic``.

    With ``c = asin(rho)``, ``sin c = rho`` exactly, which removes the
    division by ``rho`` of the textbook formula (no special case at the origin):
    ``phi = asin(cos c sin phi0 + y cos phi0)``,
    ``lambda = atan2(x, cos c cos phi0 - y sin phi0)``.
    """
    x = east_km / EARTH_RADIUS_KM
    y = north_km / EARTH_RADIUS_KM
    cos_c = torch.sqrt((1.0 - x * x - y * y).clamp_min(0.0))
    phi0 = math.radians(origin_lat)
    phi = torch.asin((cos_c * math.sin(phi0) + y * math.cos(phi0)).clamp(-1.0, 1.0))
    lam = torch.atan2(x, cos_c * math.cos(phi0) - y * math.sin(phi0))
    return torch.rad2deg(phi), origin_lon + torch.rad2deg(lam)


class GeographicOutput(nn.Module):
    """Wrap a network so it returns physical units: the exported model's contract.

    Output columns: ``lat_deg, lon_deg, sigma_east_m, sigma_north_m`` and, for a
    full head, ``rho`` (see :attr:`output_names`).

    Args:
        net: a network from :func:`build_model` (head in normalised units).
        scaling: the target scaling used in training.
        sigma_floor, rho_limit: the loss's output parameterisation
            (:class:`heimdall.losses.LossConfig`); must match training.
        covariance_scale: the ellipse calibration factor fitted on validation
            (:mod:`heimdall.calibration`); sigmas are multiplied by its square root.
    """

    def __init__(
        self, net: nn.Module, scaling: TargetScaling | None = None, sigma_floor: float = 0.01, rho_limit: float = 0.95,
        covariance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.scaling = scaling or TargetScaling()
        self.sigma_floor = sigma_floor
        self.rho_limit = rho_limit
        self.sigma_factor = math.sqrt(covariance_scale)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the output columns."""
        base = ("lat_deg", "lon_deg", "sigma_east_m", "sigma_north_m")
        return base + ("rho",) if self.net.config.head == "full" else base

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 4|5) in degrees and meters from features (B, R, F, T) and an optional mask (B, R)."""
        mean, sigma, rho = decode_head(self.net(x, mask), self.sigma_floor, self.rho_limit)
        s = self.scaling
        lat, lon = local_to_geographic_torch(mean[:, 0] * s.target_scale_km, mean[:, 1] * s.target_scale_km, s.origin_lat, s.origin_lon)
        to_m = s.target_scale_km * 1000.0 * self.sigma_factor
        cols = [lat, lon, sigma[:, 0] * to_m, sigma[:, 1] * to_m]
        if rho is not None:
            cols.append(rho)
        return torch.stack(cols, dim=1)


# -- registry ------------------------------------------------------------------

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "resnet": (ResNetConfig, LocalizationNet),
    "setnet": (SetNetConfig, ReceiverSetNet),
}


def _arch_entry(arch: str) -> tuple[type, type]:
    if arch not in ARCHITECTURES:
        raise ConfigError("model architecture", [f"unknown arch {arch!r}; valid names: {', '.join(ARCHITECTURES)}"])
    return ARCHITECTURES[arch]


def model_config_from_dict(arch: str, data: dict[str, Any]) -> ResNetConfig | SetNetConfig:
    """The config of ``arch`` from a plain dict (as saved in checkpoints and YAML).

    Raises:
        ConfigError: for an unknown arch (listing valid names), unknown keys or invalid values.
    """
    config_cls, _ = _arch_entry(arch)
    return config_cls.from_dict(data)


def build_model(arch: str, config: ResNetConfig | SetNetConfig | dict[str, Any] | None = None, n_receivers: int = 7) -> nn.Module:
    """Build a localization network by name.

    Args:
        arch: ``"resnet"`` (:class:`LocalizationNet`) or ``"setnet"`` (:class:`ReceiverSetNet`).
        config: the arch's config, a dict of it, or None for defaults.
        n_receivers: R, the receivers in the feature tensor.

    Returns:
        The network; its ``arch``, ``config`` and ``n_receivers`` attributes rebuild it.

    Raises:
        ConfigError: unknown arch (listing valid names) or a config of another arch.
    """
    config_cls, net_cls = _arch_entry(arch)
    if isinstance(config, dict):
        config = config_cls.from_dict(config)
    config = config if config is not None else config_cls()
    if not isinstance(config, config_cls):
        raise ConfigError("model architecture", [f"arch {arch!r} needs a {config_cls.__name__}, got {type(config).__name__}"])
    return net_cls(n_receivers, config)
