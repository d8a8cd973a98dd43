"""What the processes that only schedule a trial import.

Tune's trial actor unpickles :func:`tuning.study.trial.run_trial` with its bound
:class:`~tuning.study.trial.TrialSpec` (a ``StudyConfig``, a search space) and the
feature cache; Train's controller unpickles the same spec. Neither trains, so
neither may import Lightning (seconds per process, three processes per trial);
only the Train worker does, through :mod:`tuning.study.worker`.
"""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("lightning", "lightning.pytorch", "heimdall.module", "tuning.study.worker", "onnx", "onnxruntime",
         "matplotlib", "mlflow")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_trial_side_imports_no_lightning() -> None:
    assert _imported_after("import tuning.study.trial, tuning.study.tune, tuning.data.pipeline") == []


def test_the_worker_side_brings_lightning() -> None:
    # The control: the probe sees the import when it happens.
    assert "lightning.pytorch" in _imported_after("import tuning.study.worker")


def test_train_loop_per_worker_is_the_workers_function() -> None:
    import tuning.study.trial as trial
    import tuning.study.worker as worker

    assert trial.train_loop_per_worker.__module__ == "tuning.study.trial"  # what the controller unpickles
    assert worker.train_loop_per_worker.__module__ == "tuning.study.worker"
