"""The Heimdall WebSDR receiver network in north-west Italy.

The order of :data:`STATIONS` is the receiver order of every array, shard,
feature tensor and exported model.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Station", "STATIONS", "STATION_IDS", "station_index", "network_centroid"]


@dataclass(frozen=True)
class Station:
    """One OpenWebRX/WebSDR receiver.

    Attributes:
        id: short identifier used in keys (``websdr_{id}.npy``).
        name: human-readable name.
        lat: latitude in degrees north.
        lon: longitude in degrees east.
        alt_m: antenna altitude above sea level in meters.
    """

    id: str
    name: str
    lat: float
    lon: float
    alt_m: float


STATIONS: tuple[Station, ...] = (
    Station("giaveno", "Aquila di Giaveno", 45.020, 7.290, 600.0),
    Station("montanaro", "Montanaro", 45.234, 7.857, 300.0),
    Station("torino", "Torino", 45.044, 7.672, 250.0),
    Station("coazze", "Coazze", 45.030, 7.270, 700.0),
    Station("giovi", "Passo del Giovi", 44.561, 8.956, 480.0),
    Station("genova", "Genova", 44.395, 8.956, 100.0),
    Station("milano", "Milano - Baggio", 45.478, 9.123, 120.0),
)

STATION_IDS: tuple[str, ...] = tuple(s.id for s in STATIONS)


def station_index(station_id: str) -> int:
    """Position of a station in :data:`STATIONS`.

    Raises:
        KeyError: for an unknown id, listing the valid ones.
    """
    try:
        return STATION_IDS.index(station_id)
    except ValueError:
        raise KeyError(
            f"unknown receiver id {station_id!r}; valid ids are {', '.join(STATION_IDS)}"
        ) from None


def network_centroid() -> tuple[float, float]:
    """Mean latitude and longitude of the network (about 44.97 N, 8.16 E)."""
    n = len(STATIONS)
    return sum(s.lat for s in STATIONS) / n, sum(s.lon for s in STATIONS) / n
