"""Where and in which numeric precision a model trains.

Pure settings and choices (no torch import): the study's and ``tuning.train``'s
flags are checked against them before any process starts, and a worker passes
in what it sees (the GPUs Ray gave it, whether its torch can reach CUDA) to get
Lightning's ``accelerator``/``devices``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from heimdall.errors import AcceleratorError, collect_problems

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "ACCELERATORS", "Placement", "TrainerConfig",
           "choose_placement", "check_precision", "precision_problem"]

#: Lightning ``Trainer(precision=...)`` values a run may ask for: full float32,
#: bfloat16 autocast (CPUs and recent GPUs), float16 autocast with loss scaling (GPUs).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DEFAULT_PRECISION = "32"
#: ``tuning.train --accelerator``: ``auto`` is the GPU when torch sees one, else the CPU.
ACCELERATORS = ("auto", "cpu", "gpu")




@dataclass(frozen=True)
class Placement:
    """What a Lightning ``Trainer`` is given: ``accelerator`` (``"cpu"`` or ``"cuda"``) and ``devices``.

    Under Ray Train ``devices`` is ``"auto"``: ``RayDDPStrategy.root_device`` is the GPU Ray
    assigned (``ray.train.torch.get_device()``), one process per Train worker.
    """

    accelerator: str
    devices: int | str


@dataclass(frozen=True)
class TrainerConfig:
    """A search space's ``trainer`` section: what a trial may set about its Trainer.

    Attributes:
        precision: one of :data:`PRECISIONS`, or None for the study's ``--precision``.
    """

    precision: str | None = None

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            collect_problems("TrainerConfig", [
                f"precision must be one of {', '.join(PRECISIONS)} (quote 32 in YAML: \"32\"), "
                f"got {self.precision!r}"])


def choose_placement(*, gpu_ids: Sequence[object] | None, cuda_available: bool,
                     requested: str = "ray") -> Placement:
    """Lightning's accelerator and devices for what this process was given: never a silent CPU fallback.

    Args:
        gpu_ids: the GPUs Ray assigned this Train worker (``ray.get_gpu_ids()``; a fraction
            of one GPU is still its id), or None outside Ray.
        cuda_available: ``torch.cuda.is_available()`` in this process.
        requested: ``"ray"`` (a Train worker: CUDA exactly when Ray gave it a GPU) or, outside
            Ray, one of :data:`ACCELERATORS` (``tuning.train --accelerator``).

    Returns:
        The :class:`Placement`.

    Raises:
        AcceleratorError: a GPU was given or asked for, but this torch cannot reach CUDA
            (a CPU build of torch on a GPU node, or no GPU at all).
        ValueError: ``requested`` is not ``"ray"`` or one of :data:`ACCELERATORS`.
    """
    if requested == "ray":
        if not gpu_ids:
            return Placement("cpu", "auto")
        if not cuda_available:
            # Short: the progress line of a failed trial shows 300 characters, its error class names included.
            raise AcceleratorError(
                f"worker given GPU {','.join(map(str, gpu_ids))} by Ray, but its torch cannot see CUDA (a CPU build?); "
                f"fix: install the CUDA build of torch on GPU nodes (the cluster image has it), or --gpus-per-worker 0")
        return Placement("cuda", "auto")
    if requested not in ACCELERATORS:
        raise ValueError(f"requested must be 'ray' or one of {', '.join(ACCELERATORS)}, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not cuda_available):
        return Placement("cpu", 1)
    if not cuda_available:
        raise AcceleratorError("--accelerator gpu needs CUDA, but this torch cannot see it (a CPU build of torch, or "
                               "no GPU/driver here); fix: install the CUDA build of torch (pip install torch "
                               "--index-url https://download.pytorch.org/whl/cu124), or --accelerator cpu")
    return Placement("cuda", 1)


def precision_problem(precision: object, on_gpu: bool, where: str) -> str | None:
    """The one problem with training at ``precision`` (on a GPU or not), or None.

    Args:
        precision: the value asked for.
        on_gpu: whether the run trains on a GPU.
        where: what set it, for the message (e.g. ``"--precision"``).
    """
    if precision not in PRECISIONS:
        return f"{where} must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "16-mixed" and not on_gpu:
        return (f"{where} 16-mixed needs a GPU (float16 autocast on a CPU is slower than float32 and loses range), "
                f"but this run trains on CPUs; fix: bf16-mixed on CPUs, or train on a GPU")
    return None


def check_precision(precision: object, on_gpu: bool, where: str) -> None:
    """Raise :class:`~heimdall.errors.ConfigError` when :func:`precision_problem` finds one."""
    problem = precision_problem(precision, on_gpu, where)
    collect_problems(f"precision ({where})", [problem] if problem else [])
