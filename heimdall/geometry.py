"""Local east/north tangent frame (km) and great-circle distances.

Models, the generator and the oracle work in a tangent plane centred on the
network; latitude/longitude appear only at the edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from heimdall.receivers import STATIONS, network_centroid

__all__ = ["EARTH_RADIUS_KM", "LocalFrame", "default_frame", "haversine_km"]

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius


@dataclass(frozen=True)
class LocalFrame:
    """Orthographic tangent plane on a sphere, centred at ``(origin_lat, origin_lon)``.

    ``to_local`` and ``to_geographic`` are exact inverses within the visible
    hemisphere; within ±200 km of the origin the plane distance differs from the
    great-circle distance by under 0.1%.
    """

    origin_lat: float
    origin_lon: float

    def __post_init__(self) -> None:
        if not -90.0 < self.origin_lat < 90.0:
            raise ValueError(f"origin_lat must lie in (-90, 90), got {self.origin_lat}")
        if not -180.0 <= self.origin_lon <= 180.0:
            raise ValueError(f"origin_lon must lie in [-180, 180], got {self.origin_lon}")

    def to_local(self, lat: ArrayLike, lon: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Convert degrees to (east_km, north_km); broadcasts like numpy."""
        phi = np.radians(np.asarray(lat, dtype=np.float64))
        dlam = np.radians(np.asarray(lon, dtype=np.float64) - self.origin_lon)
        phi0 = np.radians(self.origin_lat)
        east = EARTH_RADIUS_KM * np.cos(phi) * np.sin(dlam)
        north = EARTH_RADIUS_KM * (
            np.cos(phi0) * np.sin(phi) - np.sin(phi0) * np.cos(phi) * np.cos(dlam)
        )
        return east, north

    def to_geographic(self, east_km: ArrayLike, north_km: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Convert (east_km, north_km) back to (lat, lon) degrees."""
        x = np.asarray(east_km, dtype=np.float64) / EARTH_RADIUS_KM
        y = np.asarray(north_km, dtype=np.float64) / EARTH_RADIUS_KM
        rho = np.hypot(x, y)
        c = np.arcsin(np.clip(rho, 0.0, 1.0))
        phi0 = np.radians(self.origin_lat)
        sin_c, cos_c = np.sin(c), np.cos(c)
        safe_rho = np.where(rho > 0, rho, 1.0)
        phi = np.arcsin(cos_c * np.sin(phi0) + np.where(rho > 0, y * sin_c * np.cos(phi0) / safe_rho, 0.0))
        lam = np.arctan2(x * sin_c, rho * cos_c * np.cos(phi0) - y * sin_c * np.sin(phi0))
        return np.degrees(phi), self.origin_lon + np.degrees(lam)

    def stations_local(self) -> np.ndarray:
        """Receiver positions in this frame, shape (R, 2) as (east_km, north_km)."""
        east, north = self.to_local([s.lat for s in STATIONS], [s.lon for s in STATIONS])
        return np.stack([east, north], axis=-1)


def default_frame() -> LocalFrame:
    """The frame centred on the receiver network's centroid."""
    lat, lon = network_centroid()
    return LocalFrame(lat, lon)


def haversine_km(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasts)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlam = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
