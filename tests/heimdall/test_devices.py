"""heimdall.devices: the accelerator a run trains on (every branch) and the precision rules."""
from __future__ import annotations

import pickle

import pytest

from heimdall.devices import (
    ACCELERATORS,
    PRECISIONS,
    Placement,
    TrainerConfig,
    check_precision,
    choose_placement,
    precision_problem,
)
from heimdall.errors import AcceleratorError, ConfigError, HeimdallError


@pytest.mark.parametrize("gpu_ids", [None, []])
@pytest.mark.parametrize("cuda", [False, True])
def test_a_ray_worker_without_a_gpu_trains_on_cpus_even_where_cuda_is(gpu_ids, cuda) -> None:
    # A CPU-only trial on a GPU node must leave the GPUs to the trials that reserved them.
    assert choose_placement(gpu_ids=gpu_ids, cuda_available=cuda) == Placement("cpu", "auto")


@pytest.mark.parametrize("gpu_ids", [[0], ["3"], [0, 1]])
def test_a_ray_worker_given_a_gpu_trains_on_cuda(gpu_ids) -> None:
    assert choose_placement(gpu_ids=gpu_ids, cuda_available=True) == Placement("cuda", "auto")


def test_a_ray_worker_given_a_gpu_its_torch_cannot_see_fails_with_the_fix() -> None:
    with pytest.raises(AcceleratorError) as info:
        choose_placement(gpu_ids=[2], cuda_available=False)
    text = str(info.value)
    assert "given GPU 2 by Ray" in text and "cannot see CUDA" in text and len(text) < 250
    assert "fix: install the CUDA build of torch on GPU nodes" in text and "--gpus-per-worker 0" in text
    # Deterministic for the study (HeimdallError: never retried) and intact across Ray's pickling.
    assert isinstance(info.value, HeimdallError)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is AcceleratorError and str(again) == text


@pytest.mark.parametrize(("requested", "cuda", "expected"), [
    ("cpu", False, Placement("cpu", 1)),
    ("cpu", True, Placement("cpu", 1)),
    ("auto", False, Placement("cpu", 1)),
    ("auto", True, Placement("cuda", 1)),
    ("gpu", True, Placement("cuda", 1)),
])
def test_outside_ray_the_flag_decides(requested, cuda, expected) -> None:
    assert choose_placement(gpu_ids=None, cuda_available=cuda, requested=requested) == expected


def test_outside_ray_gpu_without_cuda_fails_with_the_fix() -> None:
    with pytest.raises(AcceleratorError, match=r"--accelerator gpu needs CUDA.*fix: install the CUDA build of torch.*--accelerator cpu"):
        choose_placement(gpu_ids=None, cuda_available=False, requested="gpu")


def test_an_unknown_request_is_a_programming_error() -> None:
    assert "ray" not in ACCELERATORS
    with pytest.raises(ValueError, match="requested must be 'ray' or one of auto, cpu, gpu, got 'tpu'"):
        choose_placement(gpu_ids=None, cuda_available=True, requested="tpu")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_on_a_gpu(precision) -> None:
    assert precision_problem(precision, True, "--precision") is None
    check_precision(precision, True, "--precision")


def test_only_float16_needs_a_gpu() -> None:
    assert precision_problem("32", False, "--precision") is None
    assert precision_problem("bf16-mixed", False, "--precision") is None
    with pytest.raises(ConfigError, match=r"--precision 16-mixed needs a GPU.*fix: bf16-mixed on CPUs"):
        check_precision("16-mixed", False, "--precision")


@pytest.mark.parametrize("bad", [32, "fp8", None, "16"])
def test_an_unknown_precision_names_the_valid_ones(bad) -> None:
    assert precision_problem(bad, True, "x") == f"x must be one of 32, bf16-mixed, 16-mixed, got {bad!r}"


def test_trainer_config_is_none_or_a_known_precision() -> None:
    assert TrainerConfig().precision is None
    assert TrainerConfig("bf16-mixed").precision == "bf16-mixed"
    with pytest.raises(ConfigError, match=r"quote 32 in YAML.*got 32"):
        TrainerConfig(32)  # type: ignore[arg-type]


def test_devices_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, heimdall.devices; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
