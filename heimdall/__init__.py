"""Heimdall: locating VHF/UHF transmitters from WebSDR IQ recordings.

A pure library: receivers and geometry, the synthetic generator and its Bayes
oracle, features, models, losses, metrics, the Lightning module and the
catalogue/blob-store adapters. It never imports Ray; orchestration lives in
``tuning``.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
