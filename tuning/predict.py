"""``python -m tuning.predict``: locate a transmitter from IQ recordings with an exported model.

The code lives in :mod:`tuning.release.predict` (tuning/release/predict.py).
"""
import sys

from tuning.release.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
