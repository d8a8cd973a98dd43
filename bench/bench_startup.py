"""Per-trial start-up of a study, two source trees side by side in one run (issue 10, item 4).

``startup``: the outside measure. For each tree it runs ``python -m tuning.run --smoke-test
--space resnet --dataset tiny --recordings 128 --max-epochs 1 --no-export --trials N`` for
N = 2 and 6, interleaved (before-2, after-2, before-6, after-6) so the machine's load hits
both alike, and reports the per-trial fixed cost = (wall of 6 − wall of 2) / 4 (training is
~1 s of it), the median start-to-start gap of the trials inside the 6-trial run, and a
per-trial timeline of where the seconds go. ``--smoke-test`` is needed: without it the
space's MSE warm-up (up to 3 epochs) does not fit one epoch.

``trials-per-hour``: the default study (``python -m tuning.run --space resnet --no-export
--time-budget X``; ``--export``: with its export and registry, so with live MLflow tracking) per
tree, reporting trials and epochs per hour of its fit (from the study's summary.json).

Trees: ``--refs BEFORE AFTER`` (default ``16a8634``, the commit before issue 10's start-up
work, and ``WORKTREE``, this checkout as it is). A commit is checked out with ``git worktree
add`` into a temporary folder and run with ``PYTHONPATH`` pointing there; both trees share one
``HEIMDALL_DATA_DIR`` (same catalogue format), and each first runs an untimed 1-trial study
so that the dataset and its feature cache exist before anything is timed.

The timeline needs no timing code in the project: this script runs each study through its
own ``probe`` entry (``tuning.run.main`` with an extra Tune callback) that records when Tune
starts, hears from and completes each trial, and at the end reads Ray's task events from the
study's own GCS (creation of the trial actor, the TrainController and the RayTrainWorker:
submitted, process up and running ``__init__``, ready) and the ``heimdall: trial ... rank``
line each worker prints (its log file on this node). Phases, per trial, in seconds from the
submission of its trial actor ("up": the new process runs ``__init__``; "ready": it returned):

    trial actor up / ready, Tune's on_trial_start, controller submitted / up / ready,
    worker submitted / up / ready, worker announce (the train loop runs), first result, complete

Commands::

    python bench/bench_startup.py startup                       # 16a8634 vs this checkout
    python bench/bench_startup.py startup --trials 1 2          # a quick check
    python bench/bench_startup.py trials-per-hour --budget 6m
    python bench/bench_startup.py trials-per-hour --budget 2m --study-args "--dataset tiny --recordings 128"

Results go to stdout and ``--out`` (JSON). Machine load (1-minute load average) is printed
before and after every study: compare trees within one run, not across runs.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
DEFAULT_REFS = ("16a8634", WORKTREE)
STARTUP_ARGS = ["--smoke-test", "--space", "resnet", "--dataset", "tiny", "--recordings", "128", "--max-epochs", "1",
                "--no-export"]
PHASES = ("trial_actor_up", "trial_actor_ready", "tune_start", "controller_submitted", "controller_up", "controller_ready",
          "worker_submitted", "worker_up", "worker_ready", "worker_announce", "first_result", "complete")


# -- the probe: runs inside the study's driver (the tree under test on PYTHONPATH) ---------------


def probe(out: str, argv: list[str]) -> int:
    import ray
    from ray import tune

    import tuning
    import tuning.run

    tree = os.environ.get("BENCH_TREE")
    if tree and not Path(tuning.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"error: imported tuning from {tuning.__file__}, not from the tree under test {tree}")

    class Times(tune.Callback):
        def __init__(self) -> None:
            self.trials: dict[str, dict[str, Any]] = {}

        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
            actor = trial.temporary_state.ray_actor
            self.trials[trial.trial_id] = {"start": time.time(),
                                           "actor_id": actor._actor_id.hex() if actor is not None else None}

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            self.trials.setdefault(trial.trial_id, {}).setdefault("first_result", time.time())

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
            self.trials.setdefault(trial.trial_id, {})["complete"] = time.time()

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials, **info):  # noqa: ANN001
            time.sleep(2.0)  # task events reach the GCS about once a second
            dump = {"trials": self.trials, "tasks": [], "announce": {}}
            try:
                from ray.util.state import list_tasks

                address = ray.get_runtime_context().gcs_address
                dump["tasks"] = [
                    {k: t.get(k) for k in ("task_id", "actor_id", "func_or_class_name", "type", "parent_task_id",
                                           "worker_pid", "creation_time_ms", "start_time_ms", "end_time_ms")}
                    for t in list_tasks(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
                ]
                logs = ray._private.worker._global_node.get_session_dir_path() + "/logs"
                for path in glob.glob(f"{logs}/worker-*.out"):
                    with open(path, errors="replace") as f:
                        for line in f:
                            if " heimdall: trial " in line and " rank " in line:
                                stamp, rest = line.split(" heimdall: trial ", 1)
                                dump["announce"].setdefault(rest.split()[0], datetime.fromisoformat(stamp).timestamp())
            except Exception as error:  # a timeline is a bonus; the walls still count
                dump["error"] = repr(error)
            Path(out).write_text(json.dumps(dump))

    return tuning.run.main(argv, callbacks=[Times()])


# -- analysis --------------------------------------------------------------------------------------


def timeline(dump: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds from the submission of each trial's actor to each phase (missing phases left out)."""
    tasks = dump.get("tasks", [])
    actor_of = {t["task_id"]: t["actor_id"] for t in tasks}
    creation = [t for t in tasks if t.get("type") == "ACTOR_CREATION_TASK"]
    by_actor = {t["actor_id"]: t for t in creation}

    def created_by(actor_id: str | None, cls: str) -> list[dict[str, Any]]:
        return [t for t in creation if (t.get("func_or_class_name") or "").startswith(cls)
                and actor_of.get(t.get("parent_task_id")) == actor_id and actor_id is not None]

    out = {}
    for trial_id, tr in dump.get("trials", {}).items():
        if "start" not in tr:
            continue
        trial_task = by_actor.get(tr.get("actor_id"))
        # From the trial actor's submission (Tune calls on_trial_start once the actor is up).
        t0 = trial_task["creation_time_ms"] / 1000.0 if trial_task and trial_task.get("creation_time_ms") else tr["start"]
        ph = {"tune_start": tr["start"] - t0}

        def put(name: str, ms: float | None, ph: dict[str, float] = ph, t0: float = t0) -> None:
            if ms:
                ph[name] = ms / 1000.0 - t0

        if trial_task:
            put("trial_actor_up", trial_task["start_time_ms"])
            put("trial_actor_ready", trial_task["end_time_ms"])
        controllers = created_by(tr.get("actor_id"), "TrainController")
        if controllers:
            c = min(controllers, key=lambda t: t["creation_time_ms"] or 0)
            put("controller_submitted", c["creation_time_ms"])
            put("controller_up", c["start_time_ms"])
            put("controller_ready", c["end_time_ms"])
            workers = created_by(c["actor_id"], "RayTrainWorker")
            if workers:
                w = min(workers, key=lambda t: t["creation_time_ms"] or 0)
                put("worker_submitted", w["creation_time_ms"])
                put("worker_up", w["start_time_ms"])
                put("worker_ready", w["end_time_ms"])
        if trial_id in dump.get("announce", {}):
            ph["worker_announce"] = dump["announce"][trial_id] - t0
        for key in ("first_result", "complete"):
            if key in tr:
                ph[key] = tr[key] - t0
        out[trial_id] = ph
    return out


def phase_medians(lines: dict[str, dict[str, float]]) -> dict[str, float]:
    return {p: round(statistics.median(v[p] for v in lines.values() if p in v), 2)
            for p in PHASES if any(p in v for v in lines.values())}


def actor_classes(dump: dict[str, Any]) -> dict[str, int]:
    """Actors the study created, by class (each one a process boot on the machine)."""
    names = [(t.get("func_or_class_name") or "?").split(".")[0] for t in dump.get("tasks", [])
             if t.get("type") == "ACTOR_CREATION_TASK"]
    return {n: names.count(n) for n in sorted(set(names))}


def start_gaps(dump: dict[str, Any]) -> list[float]:
    starts = sorted(t["start"] for t in dump.get("trials", {}).values() if "start" in t)
    return [round(b - a, 2) for a, b in zip(starts, starts[1:])]


# -- running studies -------------------------------------------------------------------------------


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@contextlib.contextmanager
def trees(refs: list[str], tmp: Path):
    """{ref: source folder}: the checkout itself for WORKTREE, a git worktree for a commit."""
    made, out = [], {}
    try:
        for ref in refs:
            if ref == WORKTREE:
                out[ref] = ROOT
                continue
            path = tmp / f"tree-{ref}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                           stdout=subprocess.DEVNULL)
            made.append(path)
            out[ref] = path
        yield out
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def run_study(tree: Path, data_dir: Path, argv: list[str], dump: Path, log: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HEIMDALL_DATA_DIR": str(data_dir), "BENCH_TREE": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, start = loadavg(), time.monotonic()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe", str(dump), "--", *argv],
                              cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"error: the study exited {code}; its output: {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Only what the study's processes reaped counts (Ray's workers often are not): a lower bound.
    return {"wall_s": round(wall, 1), "reaped_cpu_s": round(cpu, 1), "load": [load0, loadavg()],
            "dump": json.loads(dump.read_text()) if dump.exists() else {}}


def warm_up(ref: str, tree: Path, args: argparse.Namespace, tmp: Path) -> None:
    print(f"warm-up {ref}: dataset and feature cache (untimed)", flush=True)
    run_study(tree, args.data_dir, [*STARTUP_ARGS, *args.study_args, "--trials", "1", "--name", _name("warm", ref)],
              tmp / f"warm-{ref}.json", tmp / f"warm-{ref}.log")


def _name(kind: str, ref: str, n: int | str = "") -> str:
    return f"bench-{kind}-{ref.lower()[:12]}-{n}-{int(time.time())}"


def startup(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, dict[int, Any]] = {ref: {} for ref in args.refs}
    with trees(args.refs, tmp) as srcs:
        for ref in args.refs:
            warm_up(ref, srcs[ref], args, tmp)
        for n in args.trials:
            for ref in args.refs:
                argv = [*STARTUP_ARGS, *args.study_args, "--trials", str(n), "--name", _name("startup", ref, n)]
                r = run_study(srcs[ref], args.data_dir, argv, tmp / f"{ref}-{n}.json", tmp / f"{ref}-{n}.log")
                dump = r.pop("dump")
                r["timeline"], r["start_gaps"] = timeline(dump), start_gaps(dump)
                r["actors"] = actor_classes(dump)
                results[ref][n] = r
                print(f"{ref:>10} trials={n}: wall {r['wall_s']:.1f} s, "
                      f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
    lo, hi = min(args.trials), max(args.trials)
    summary = {}
    for ref in args.refs:
        r = results[ref]
        lines = r[hi]["timeline"]
        summary[ref] = {
            "per_trial_s": round((r[hi]["wall_s"] - r[lo]["wall_s"]) / (hi - lo), 1),
            "start_gap_median_s": statistics.median(r[hi]["start_gaps"]) if r[hi]["start_gaps"] else None,
            "phase_medians_s": phase_medians(lines) if lines else {},
            "runs": r,
        }
    return summary


def trials_per_hour(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = {}
    with trees(args.refs, tmp) as srcs:
        for ref in args.refs:
            name = _name("tph", ref)
            argv = ["--space", "resnet", *([] if args.export else ["--no-export"]), "--time-budget", args.budget,
                    *args.study_args, "--name", name]
            # A tree whose catalogue format differs from the other's needs its own data (generated before
            # its fit, which alone is timed).
            data_dir = args.data_dir / ref if args.data_per_tree else args.data_dir
            r = run_study(srcs[ref], data_dir, argv, tmp / f"tph-{ref}.json", tmp / f"tph-{ref}.log")
            r.pop("dump")
            summary = json.loads((data_dir / "studies" / name / "summary.json").read_text())
            trials = [t for t in summary["trials"] if (t.get("epochs") or 0) >= 1]
            epochs = sum(t["epochs"] for t in trials)
            hours = summary["wall_seconds"] / 3600
            out[ref] = {"fit_s": summary["wall_seconds"], "trials": len(trials), "epochs": epochs,
                        "trials_per_hour": round(len(trials) / hours, 1), "epochs_per_hour": round(epochs / hours, 1),
                        **r}
            print(f"{ref:>10}: {len(trials)} trials, {epochs} epochs in {summary['wall_seconds']:.0f} s of fit: "
                  f"{out[ref]['trials_per_hour']} trials/h, {out[ref]['epochs_per_hour']} epochs/h; "
                  f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("startup", "trials-per-hour"))
    p.add_argument("--refs", nargs=2, default=list(DEFAULT_REFS), metavar=("BEFORE", "AFTER"),
                   help=f"commits, or {WORKTREE} for this checkout [%(default)s]")
    p.add_argument("--trials", nargs=2, type=int, default=[2, 6], metavar=("FEW", "MANY"), help="[%(default)s]")
    p.add_argument("--budget", default="6m", help="trials-per-hour: the study's --time-budget [%(default)s]")
    p.add_argument("--study-args", type=shlex.split, default=[], help="more tuning.run flags, one string")
    p.add_argument("--data-dir", type=Path, help="shared HEIMDALL_DATA_DIR [a temporary folder]")
    p.add_argument("--data-per-tree", action="store_true",
                   help="trials-per-hour: each tree gets its own data folder inside --data-dir (trees whose "
                        "catalogue formats differ; each generates the dataset before its timed fit)")
    p.add_argument("--export", action="store_true",
                   help="trials-per-hour: keep the study's export and registry, as the README's run does (the "
                        "live MLflow tracking then runs during the fit; the export after it is not counted)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.trials[0] >= args.trials[1]:
        p.error(f"--trials FEW MANY needs FEW < MANY, got {args.trials}")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as t:
        tmp = Path(t)
        args.data_dir = (args.data_dir or tmp / "data").resolve()
        print(f"bench_startup {args.mode}: refs {args.refs}, data {args.data_dir}, load {loadavg():.1f}", flush=True)
        result = startup(args, tmp) if args.mode == "startup" else trials_per_hour(args, tmp)
    if args.mode == "startup":
        report_startup(result, args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


def report_startup(summary: dict[str, Any], args: argparse.Namespace) -> None:
    lo, hi = args.trials
    print(f"\nper-trial fixed cost = (wall of {hi} - wall of {lo}) / {hi - lo}")
    print(f"{'ref':>10} {'wall ' + str(lo):>9} {'wall ' + str(hi):>9} {'per trial':>10} {'start gap':>10}")
    for ref, s in summary.items():
        runs = s["runs"]
        gap = s["start_gap_median_s"]
        print(f"{ref:>10} {runs[lo]['wall_s']:>9.1f} {runs[hi]['wall_s']:>9.1f} {s['per_trial_s']:>10.1f} "
              f"{gap if gap is not None else float('nan'):>10.1f}")
    print(f"\nactors created by the {hi}-trial study, by class")
    for ref, s in summary.items():
        print(f"{ref:>10} " + ", ".join(f"{k} {v}" for k, v in s["runs"][hi].get("actors", {}).items()))
    print(f"\ntimeline, median over the {hi}-trial run's trials, seconds from the trial actor's submission")
    print(f"{'phase':<22}" + "".join(f"{ref:>12}" for ref in summary))
    for p in PHASES:
        print(f"{p:<22}" + "".join(f"{s['phase_medians_s'].get(p, float('nan')):>12.1f}" for s in summary.values()))


if __name__ == "__main__":
    sys.exit(main())
