"""The library stays free of Ray (and of the S3 SDK until an S3 store is opened)."""
from __future__ import annotations

import json
import subprocess
import sys

# A fresh interpreter: other tests in this process may have imported ray already.
_PROBE = """
import json, sys
import heimdall, heimdall.scene, heimdall.geometry, heimdall.store
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "minio"))))
"""


def test_importing_heimdall_leaves_ray_and_minio_unloaded() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
