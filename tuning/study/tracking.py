"""Live MLflow tracking of a study: a Tune callback on the driver.

While the study runs, MLflow shows (experiment named after the study):

* one parent run per study, named after it and tagged ``heimdall.study`` and
  ``heimdall.study_run``, holding the study's settings as parameters: RUNNING
  while the study runs, FINISHED when it ends, KILLED when it is interrupted
  (RUNNING again on ``--resume``);
* a child run per trial, created when the trial starts, named by Tune's trial
  id and tagged ``heimdall.trial_id`` and ``heimdall.optuna_number``, with the
  trial's parameters;
* every epoch's ``val/*`` and ``train/*`` metrics (and ``latency_ms``) as Tune
  receives them, at step = epoch;
* the trial's status at its end: FINISHED (all ``--max-epochs``), KILLED
  (stopped by ASHA or the time budget, or still running when the study was
  interrupted; the ``heimdall.status`` tag says which), FAILED (error).

The export stage then completes these same runs (:meth:`Registry.log_trials`
adds only the epochs a run lacks) and registers the best trial's model from
its run, so the registered version links to the run that was watched live.

The callback is pickled with the Tuner, so ``--resume`` brings it back: it
keeps only settings (the MLflow URI without password: MLflow reads credentials
from ``MLFLOW_TRACKING_USERNAME``/``..._PASSWORD``), reconnects on first use and
finds its runs again by their tags. MLflow that stops answering never costs
the study: one warning, and live tracking is off for the rest of this run (the
export stage logs the trials, or says how to finish that later).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ray import tune

from tuning.study.trial import EPOCHS_METRIC, OPTUNA_NUMBER_KEY, trial_params
from tuning.study.tune import STOPPING, StudyConfig, describe_url

if TYPE_CHECKING:
    from tuning.release.registry import Registry
    from tuning.settings import RegistrySettings

__all__ = ["LiveTracking", "epoch_metrics", "study_tracking"]

#: Metrics of a Tune result that go to the trial's run each epoch.
METRIC_PREFIXES = ("val/", "train/")
METRIC_NAMES = ("latency_ms",)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def study_tracking(config: StudyConfig, settings: RegistrySettings | None) -> list[tune.Callback]:
    """The callbacks that track ``config``'s study live in MLflow: none without a registry (``--no-export``,
    which is how a study runs without MLflow)."""
    if settings is None:
        return []
    return [LiveTracking(config.name, settings, config.to_dict(), config.max_epochs)]


def epoch_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric ``val/*``, ``train/*`` and ``latency_ms`` values of a Tune result."""
    return {k: float(v) for k, v in result.items()
            if (k.startswith(METRIC_PREFIXES) or k in METRIC_NAMES)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


class LiveTracking(tune.Callback):
    """Writes the study to MLflow as it runs (see the module docstring).

    Args:
        study: the study name (the experiment, the parent run).
        settings: where MLflow is (``RegistrySettings.registry()`` connects).
        params: the parent run's parameters (the study's settings; never URLs or credentials).
        max_epochs: epochs of a trial that ran to the end (FINISHED; fewer: KILLED).
        warn: where the one warning goes (stderr by default).
    """

    def __init__(self, study: str, settings: RegistrySettings, params: Mapping[str, Any], max_epochs: int,
                 warn: Callable[[str], None] = _warn) -> None:
        self.study = study
        self.settings = settings
        self.params = dict(params)
        self.max_epochs = max_epochs
        self.warn = warn
        self._forget()

    def _forget(self) -> None:
        self._registry: Registry | None = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id, found again by tag after unpickling
        # trial id -> last epoch logged by this driver (after a driver restart, the one epoch a
        # resumed trial reports again may be logged twice at the same step)
        self._logged: dict[str, int] = {}
        self._off = False

    def __getstate__(self) -> dict[str, Any]:
        from dataclasses import replace

        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        # Tune's saved state lives in the run storage: no password goes there, and no client.
        state["settings"] = replace(self.settings, mlflow_uri=describe_url(self.settings.mlflow_uri))
        state["warn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.warn = self.warn or _warn
        self._forget()

    # -- Tune's events ------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Open (or, resumed, find again) the study's parent run."""
        self._guard(self._connect)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Create (or find again) the trial's run with its parameters."""
        self._guard(lambda: self._run_of(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Log the epoch's metrics at step = epoch."""
        epoch = result.get(EPOCHS_METRIC)
        metrics = epoch_metrics(result)
        if epoch is None or not metrics:
            return
        # A resumed trial reports its checkpoint's epoch again (tuning.study.worker.TrialMetrics): once per epoch.
        if int(epoch) <= self._logged.get(trial.trial_id, 0):
            return
        self._logged[trial.trial_id] = int(epoch)
        self._guard(lambda: self._connect().log_epoch(self._run_of(trial), metrics, int(epoch)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """FINISHED after every epoch, KILLED when stopped early or by an interruption."""
        if trial.status == "PENDING" and trial.trial_id not in self._runs:
            return  # stopped before it started (time budget): no run to end
        epochs = int((getattr(trial, "last_result", None) or {}).get(EPOCHS_METRIC, 0) or 0)
        status = "interrupted" if STOPPING.is_set() else "complete" if epochs >= self.max_epochs else "stopped"
        self._end(trial, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """FAILED."""
        self._end(trial, "error")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """End the runs still open (trials interrupted, or cut by the time budget) and the parent."""
        for trial in trials:
            if trial.trial_id in self._runs:  # opened by this run of the driver and not ended
                self._end(trial, "interrupted" if STOPPING.is_set() else "stopped")
        if self._parent is not None:
            parent = self._parent
            self._guard(lambda: self._connect().end_run(parent, "interrupted" if STOPPING.is_set() else "complete"))

    # -- MLflow ---------------------------------------------------------------------------------------

    def _connect(self) -> Registry:
        if self._registry is None:
            registry = self.settings.registry()
            experiment_id = registry.experiment(self.study)
            self._parent = registry.study_run(experiment_id, self.study, self.params)
            self._registry, self._experiment_id = registry, experiment_id
        return self._registry

    def _run_of(self, trial: Any) -> str:
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            registry = self._connect()
            number = trial.config.get(OPTUNA_NUMBER_KEY)
            run_id = registry.trial_run(self._experiment_id, self.study, self._parent, trial.trial_id,
                                        int(number) if number is not None else None, trial_params(trial.config))
            self._runs[trial.trial_id] = run_id
        return run_id

    def _end(self, trial: Any, status: str) -> None:
        self._guard(lambda: self._connect().end_run(self._run_of(trial), status))
        self._runs.pop(trial.trial_id, None)

    def _guard(self, call: Callable[[], Any]) -> None:
        """Run an MLflow call unless tracking is off; on any failure warn once and turn it off."""
        if self._off:
            return
        try:
            call()
        # Deliberately broad: whatever MLflow raises, a lost metric is not worth a lost study.
        except Exception as exc:  # noqa: BLE001
            self._off = True
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            self.warn(f"warning:   live MLflow tracking at {describe_url(self.settings.mlflow_uri)} stopped for the "
                      f"rest of this run ({first}); the study goes on, and the export stage logs its trials")
