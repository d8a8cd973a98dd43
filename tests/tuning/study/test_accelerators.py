"""Trials train on the device Ray gave their workers, at the study's (or the space's) precision.

Real Ray throughout. Torch here is the CPU build, so a Ray started with a
declared GPU (``num_gpus=1``) schedules GPU trials for real while CUDA is
absent: exactly a CPU build of torch on a GPU node, which must fail the trial
once with the error naming the fix, never train on CPUs instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import ray

from heimdall.errors import ConfigError
from tuning.run import main
from tuning.study.spaces import check_space_devices, validate_space
from tuning.study.trial import TrialSpec, _scaling_config, _torch_config
from tuning.study.tune import StudyConfig

#: Starts a private local Ray that declares one GPU, then runs tuning.run in it.
_GPU_RAY_DRIVER = """
import os, socket, sys
import ray
from tuning.run import main

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ["RAY_API_SERVER_ADDRESS"] = api = f"http://127.0.0.1:{port}"
ray.init(address="local", num_cpus=2, num_gpus=1, object_store_memory=512 * 1024**2, include_dashboard=True,
         dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False,
         runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
try:
    code = main(sys.argv[1:])
finally:
    ray.shutdown()
sys.exit(code)
"""

_SMALL = ["--recordings", "64", "--dataset", "tiny", "--trials", "1", "--max-epochs", "1", "--time-budget", "none",
          "--no-export"]


def _spec(**study: object) -> TrialSpec:
    return TrialSpec(study=StudyConfig("gpu", **study), space=validate_space({
        "arch": "resnet", "parameters": {"optimizer.lr": {"loguniform": [1e-4, 1e-3]}}}), train_storage="/tmp")


def test_workers_reserve_their_gpu_share_and_use_gpu_only_with_one() -> None:
    cpu = _scaling_config(_spec())
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0}
    shared = _scaling_config(_spec(gpus_per_worker=0.25, cpus_per_worker=2.0))
    assert shared.use_gpu and shared.resources_per_worker == {"CPU": 2.0, "GPU": 0.25}
    multi = _scaling_config(_spec(gpus_per_worker=1.0, workers_per_trial=2))
    assert multi.num_workers == 2 and multi.total_resources == {"CPU": 2.0, "GPU": 2.0}
    # CPU trials keep Ray's own choice (gloo); GPU trials decide per worker group.
    assert _torch_config(_spec()).backend is None
    assert _torch_config(_spec(gpus_per_worker=0.5)).backend_cls.__name__ == "_DeviceTorchBackend"


def test_a_fraction_of_a_gpu_is_refused_for_a_multi_worker_trial() -> None:
    with pytest.raises(ConfigError, match=r"gpus_per_worker 0\.5.*2 workers.*fix: --gpus-per-worker 1"):
        StudyConfig("gpu", gpus_per_worker=0.5, workers_per_trial=2)


def test_a_space_that_can_draw_float16_is_refused_on_cpu_workers() -> None:
    searched = validate_space({"arch": "resnet", "parameters": {
        "trainer.precision": {"choice": ["32", "16-mixed"]}}})
    with pytest.raises(ConfigError, match=r"trainer.precision can be 16-mixed.*--gpus-per-worker is 0.*fix: drop"):
        check_space_devices(searched, 0.0)
    check_space_devices(searched, 0.25)
    fixed = validate_space({"arch": "resnet", "fixed": {"trainer.precision": "16-mixed"},
                            "parameters": {"optimizer.lr": {"loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="is fixed at 16-mixed"):
        check_space_devices(fixed, 0.0)
    check_space_devices(validate_space({"arch": "resnet", "parameters": {
        "trainer.precision": {"choice": ["32", "bf16-mixed"]}}}), 0.0)


def test_dry_run_refuses_a_float16_space_on_cpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "half.yaml"
    space.write_text("arch: resnet\nfixed:\n  trainer.precision: 16-mixed\n"
                     "parameters:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    assert main(["--dry-run", "--space", str(space), "--data-dir", str(tmp_path), "--name", "half"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "trainer.precision is fixed at 16-mixed" in err, err


@pytest.mark.slow  # its own Ray, dataset and feature cache: 1-4 min on 2 busy cores
@pytest.mark.ray
def test_a_gpu_trial_on_a_cpu_build_of_torch_fails_once_with_the_fix(tmp_path: Path) -> None:
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    space = tmp_path / "lr.yaml"
    space.write_text("arch: resnet\nparameters:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    script = tmp_path / "driver.py"
    script.write_text(_GPU_RAY_DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script), "--space", str(space), *_SMALL, "--gpus-per-worker", "1", "--data-dir",
                           str(tmp_path), "--name", name, "--optuna-storage", f"sqlite:///{tmp_path / 'o.db'}"],
                          env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert (tmp_path / "studies" / name / "summary.json").is_file(), out
    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    assert summary["tune_status"] == {"complete": 0, "stopped": 0, "error": 1}, out
    failed = summary["trials"][0]
    run_dir = tmp_path / "runs" / name / "train-runs" / failed["trial_id"]
    reason = (run_dir / "heimdall-failure.txt").read_text()
    assert reason.startswith("AcceleratorError:") and "given GPU 0 by Ray" in reason, reason
    assert "fix: install the CUDA build of torch on GPU nodes" in reason and "--gpus-per-worker 0" in reason
    # One Train run, no restart of it, and Tune's retry ends at once on the recorded reason.
    assert "restart 1/" not in out
    errors = next((tmp_path / "runs" / name).glob(f"trial-0000-{failed['trial_id']}/error.txt")).read_text()
    assert "not retried: the trial's first attempt failed" in errors
    failed_line = next(line for line in out.splitlines() if "#0 FAILED" in line)
    assert "AcceleratorError" in failed_line and "--gpus-per-worker 0" in failed_line, failed_line
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]


@pytest.mark.ray
def test_a_space_s_bf16_mixed_trains_a_trial_on_cpu(ray_session: object, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "bf16.yaml"
    space.write_text("arch: resnet\nfixed:\n  trainer.precision: bf16-mixed\n"
                     "parameters:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    name = f"bf16-{uuid.uuid4().hex[:6]}"
    code = main(["--space", str(space), *_SMALL, "--data-dir", str(tmp_path), "--name", name,
                 "--optuna-storage", f"sqlite:///{tmp_path / 'o.db'}"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    assert summary["tune_status"] == {"complete": 1, "stopped": 0, "error": 0}
    trial_id = summary["trials"][0]["trial_id"]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = [line for log in logs.glob("worker-*.out") for line in log.read_text(errors="replace").splitlines()
             if f"heimdall: trial {trial_id} " in line]
    assert lines and all(line.endswith("training on cpu at precision bf16-mixed") for line in lines), lines
