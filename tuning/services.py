"""``python -m tuning.services``: private PostgreSQL and S3 servers for development (up | down | status).

The code lives in :mod:`tuning.ops.services` (tuning/ops/services.py).
"""
import sys

from tuning.ops.services import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
