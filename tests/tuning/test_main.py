"""``python -m tuning`` lists every command: each command module of ``tuning/`` and the ``tuning.data`` package."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tuning

PACKAGE = Path(tuning.__file__).parent


def _commands() -> set[str]:
    """``tuning.X`` for every ``tuning/X.py`` that runs as a command, plus each sub-package with a ``__main__``."""
    modules = {f"tuning.{p.stem}" for p in PACKAGE.glob("*.py")
               if p.stem != "__main__" and 'if __name__ == "__main__":' in p.read_text()}
    packages = {f"tuning.{p.parent.name}" for p in PACKAGE.glob("*/__main__.py")}
    return modules | packages


def test_every_command_is_listed_once_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "tuning"], capture_output=True, text=True, check=True).stdout
    listed = [line.split()[2] for line in out.splitlines() if line.strip().startswith("python -m ")]
    assert "tuning.data" in _commands() and len(_commands()) == 7, sorted(_commands())
    assert sorted(listed) == sorted(_commands()), out
    assert len(listed) == len(set(listed))
