"""``python -m tuning.localcluster``: a real multi-node Ray cluster on one machine (up | down | status).

The code lives in :mod:`tuning.ops.localcluster` (tuning/ops/localcluster.py).
"""
import sys

from tuning.ops.localcluster import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
