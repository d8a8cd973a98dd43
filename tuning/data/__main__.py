"""``python -m tuning.data``: generate | describe | list | verify | import | delete datasets (see :mod:`tuning.data.cli`)."""
import sys

from tuning.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
