"""One exception root for Heimdall, so callers can catch everything we raise.

Every message states the rule that was broken, the offending value and the fix.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "HeimdallError",
    "ConfigError",
    "DataError",
    "ServiceUnavailableError",
    "NotFoundError",
    "AlreadyExistsError",
    "AcceleratorError",
    "collect_problems",
]


class HeimdallError(Exception):
    """Root of every error Heimdall raises on purpose."""


class ConfigError(HeimdallError, ValueError):
    """A configuration (dataclass, YAML, CLI flags) breaks one or more rules.

    All problems are reported at once: ``problems`` holds one line per rule.
    """

    def __init__(self, what: str, problems: Iterable[str]) -> None:
        self.what = what
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self) -> tuple:
        # Ray ships a trial's or worker's exception to the driver by pickling it; the
        # default would call __init__(message) and fail there, hiding the real error.
        return type(self), (self.what, self.problems)


class DataError(HeimdallError, ValueError):
    """Stored data is corrupt, truncated, of the wrong shape/dtype or non-finite."""


class ServiceUnavailableError(HeimdallError, ConnectionError):
    """A database, object server or tracking server cannot be reached."""


class NotFoundError(HeimdallError, LookupError):
    """A named dataset, shard, object or model does not exist."""


class AlreadyExistsError(HeimdallError):
    """Creating something whose name is already taken."""


class AcceleratorError(HeimdallError, RuntimeError):
    """A run was given or asked for a GPU that its torch cannot use (no silent CPU fallback)."""


def collect_problems(what: str, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem, if there are any.

    Args:
        what: what was being validated, e.g. ``"GeneratorConfig"``.
        problems: one human-readable line per broken rule.

    Raises:
        ConfigError: when ``problems`` is not empty.
    """
    if problems:
        raise ConfigError(what, problems)
