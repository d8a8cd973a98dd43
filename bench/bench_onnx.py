"""onnxruntime versus PyTorch eager: inference latency per recording, batch 1 and 64.

Both run the same exported graph contract in the same process: PyTorch runs
:class:`tuning.release.onnx.ExportedLocalizer` (the network plus the geographic
outputs and the ellipse) under ``torch.inference_mode()``; onnxruntime runs the
file :func:`tuning.release.onnx.export_onnx` writes from it. Both get the same number
of threads (``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads``;
inter-op 1). Latency per recording is the median over repeats of one batch's
time divided by the batch size, the two runtimes timed alternately. The goal: onnxruntime <= 0.5 x PyTorch.

Usage::

    python bench/bench_onnx.py                                  # default ResNet, random weights, 1 thread
    python bench/bench_onnx.py --arch setnet --threads 2
    python bench/bench_onnx.py --checkpoint .heimdall/train/resnet-default/calibrated.ckpt
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tuning.release.onnx import ExportedLocalizer, build_metadata, export_onnx, load_checkpoint, onnx_session


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("resnet", "setnet"), default="resnet", help="network with its default config")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint instead of --arch")
    parser.add_argument("--threads", type=int, default=1, help="threads for both runtimes (default 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes (default 1 64)")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per size (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    args = parser.parse_args()
    if min(args.threads, args.repeats, *args.batch_sizes) < 1 or args.warmup < 0:
        parser.error("--threads, --repeats and --batch-sizes must be >= 1, --warmup >= 0")
    return args


def machine_info(threads: int) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    import onnxruntime

    return (f"machine: {platform.processor() or platform.machine()}, {usable} usable cores, {load}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {threads} thread(s) each")


def build_module(args: argparse.Namespace):
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    from heimdall.models import build_model
    from heimdall.module import LocalizationModule

    torch.manual_seed(0)
    return LocalizationModule(build_model(args.arch)).eval()


def median_ms(runs: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each callable; runs are interleaved so that load changes on a shared
    machine hit both runtimes alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000.0 for name, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    module = build_module(args)
    print(machine_info(args.threads))
    print(f"model: {module.hparams['arch']} ({sum(p.numel() for p in module.parameters()):,} parameters)"
          f"{' from ' + str(args.checkpoint) if args.checkpoint else ', default config, random weights'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        export_onnx(module, path, build_metadata(module))
        print(f"export: {time.perf_counter() - start:.1f} s, {path.stat().st_size / 1e6:.2f} MB")
        session = onnx_session(path, threads=args.threads)
    wrapper = ExportedLocalizer(module).eval()
    fc = module.feature_config
    rng = np.random.default_rng(0)
    print(f"\n{'batch':>5} {'torch ms/rec':>13} {'onnxruntime ms/rec':>19} {'ratio':>7}  max |diff| sigma m")
    for batch in args.batch_sizes:
        x = rng.normal(0.0, 1.5, (batch, module.model.n_receivers, fc.n_fft, fc.n_frames)).astype(np.float32)
        mask = rng.random((batch, module.model.n_receivers)) > 0.2
        tx, tm = torch.from_numpy(x), torch.from_numpy(mask)
        feed = {"features": x, "mask": mask}

        def run_torch(tx=tx, tm=tm):
            with torch.inference_mode():
                return wrapper(tx, tm)

        ms = median_ms({"torch": run_torch, "onnxruntime": lambda feed=feed: session.run(None, feed)}, args.repeats,
                       args.warmup)
        t_ms, o_ms = ms["torch"] / batch, ms["onnxruntime"] / batch
        diff = float(np.abs(session.run(None, feed)[1] - run_torch()[1].numpy()).max())
        print(f"{batch:>5} {t_ms:>13.3f} {o_ms:>19.3f} {o_ms / t_ms:>7.2f}  {diff:.3g}")
    print("\ngoal: ratio (onnxruntime / torch) <= 0.5")


if __name__ == "__main__":
    main()
