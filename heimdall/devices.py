"""Where and in which numeric precision a model trains.

Pure settings (no torch import): the study's and ``tuning.train``'s flags are
checked against them before any process starts.
"""
from __future__ import annotations

__all__ = ["PRECISIONS", "DEFAULT_PRECISION"]

#: Lightning ``Trainer(precision=...)`` values a run may ask for: full float32,
#: bfloat16 autocast (CPUs and recent GPUs), float16 autocast with loss scaling (GPUs).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DEFAULT_PRECISION = "32"
