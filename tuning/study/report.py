"""End of a study: the best trials as a table, Optuna's plots, ``summary.json``.

Trials are ranked by their best validated epoch (the checkpoint that Train
keeps as the best and that the export stage picks up), not by their last one:
ASHA stops most trials early and a trial's last epoch is not always its best.
Optuna itself records each trial's last reported value.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from tuning.study.trial import (
    EPOCHS_METRIC,
    LATENCY_METRIC,
    MODEL_PARAMS_METRIC,
    OPTUNA_NUMBER_KEY,
    Objective,
    trial_params,
)

__all__ = ["TABLE_METRICS", "TrialRow", "trial_rows", "format_table", "save_plots", "study_counts", "write_summary"]

#: Columns of the summary table: (metric, header, format).
TABLE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("val/median_km", "median km", "{:.1f}"),
    ("val/p90_km", "p90 km", "{:.1f}"),
    ("val/coverage_1sigma", "cov 1σ", "{:.0%}"),
    ("val/coverage_2sigma", "cov 2σ", "{:.0%}"),
    ("val/nll_km", "NLL", "{:.3f}"),
    ("val/oracle_ratio", "÷oracle", "{:.2f}"),
)


@dataclass(frozen=True)
class TrialRow:
    """One trial's outcome at its best epoch.

    Attributes:
        number: the Optuna trial number (None if the config lacks it).
        trial_id: Tune's trial id (also the Train run's name).
        status: ``"complete"``, ``"stopped"`` (by ASHA or the time budget) or ``"error"``.
        epochs: epochs completed.
        best_epoch: the epoch with the best objective (0 if none was reported).
        value: the objective at ``best_epoch`` (None if nothing was reported).
        metrics: every reported metric at ``best_epoch``.
        params: the sampled parameters.
        checkpoint_path: Train's checkpoint of ``best_epoch`` (kept as the best).
    """

    number: int | None
    trial_id: str
    status: str
    epochs: int
    best_epoch: int
    value: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row(result: Any, objective: Objective, max_epochs: int) -> TrialRow:
    df = result.metrics_dataframe
    config = dict(result.config or {})
    number = config.get(OPTUNA_NUMBER_KEY)
    trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
    best: dict[str, Any] = {}
    if df is not None and objective.metric in df and df[objective.metric].notna().any():
        values = df[objective.metric]
        best = df.loc[values.idxmin() if objective.mode == "min" else values.idxmax()].to_dict()
    epochs = int(max(df[EPOCHS_METRIC].max(), 0)) if df is not None and EPOCHS_METRIC in df else 0
    status = "error" if result.error else ("complete" if epochs >= max_epochs else "stopped")
    metrics = {k: float(v) for k, v in best.items()
               if (k.startswith("val/") or k in (LATENCY_METRIC, MODEL_PARAMS_METRIC)) and _finite(v)}
    value = metrics.get(objective.metric)
    return TrialRow(
        number=int(number) if number is not None else None, trial_id=trial_id, status=status, epochs=epochs,
        best_epoch=int(best.get(EPOCHS_METRIC, 0) or 0), value=value, metrics=metrics,
        params=trial_params(config), checkpoint_path=best.get("checkpoint_path") or None,
    )


def trial_rows(results: Sequence[Any], objective: Objective, max_epochs: int) -> list[TrialRow]:
    """Every trial's row, best first (trials without a value last).

    Args:
        results: a Tune ``ResultGrid`` (or any sequence of its ``Result`` objects).
        objective: what the study minimises.
        max_epochs: a full trial's epochs (tells complete from stopped).

    Returns:
        Rows sorted by objective.
    """
    rows = [_row(r, objective, max_epochs) for r in results]
    sign = 1.0 if objective.mode == "min" else -1.0
    return sorted(rows, key=lambda r: (r.value is None, sign * r.value if r.value is not None else 0.0))


def format_table(rows: Sequence[TrialRow], objective: Objective, top: int = 5,
                 baselines: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The best ``top`` trials as an aligned text table, plus the best trial's parameters.

    Args:
        rows: from :func:`trial_rows`.
        objective: ranks the rows (its column is marked).
        top: rows shown.
        baselines: optional reference rows, e.g. ``{"centre": {"val/median_km": ...}}``.

    Returns:
        Multi-line text.
    """
    header = ["rank", "trial", "status", "epochs"] + [h for _, h, _ in TABLE_METRICS]
    lines_data: list[list[str]] = []
    for i, r in enumerate(rows[:top], 1):
        cells = [str(i), f"#{r.number}" if r.number is not None else r.trial_id, r.status, f"{r.best_epoch}/{r.epochs}"]
        cells += [fmt.format(r.metrics[m]) if m in r.metrics else "-" for m, _, fmt in TABLE_METRICS]
        lines_data.append(cells)
    for name, values in (baselines or {}).items():
        cells = ["", name, "baseline", ""]
        cells += [fmt.format(values[m]) if _finite(values.get(m)) else "-" for m, _, fmt in TABLE_METRICS]
        lines_data.append(cells)
    widths = [max(len(c[i]) for c in [header, *lines_data]) for i in range(len(header))]
    out = [f"best trials by {objective.metric} ({objective.mode}, at each trial's best epoch; epochs = best/run)"]
    for cells in [header, *lines_data]:
        out.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if rows and rows[0].value is not None:
        best = rows[0]
        out.append("")
        out.append(f"best trial #{best.number}: {objective.metric} = {best.value:.4g} at epoch {best.best_epoch}")
        out += [f"  {k} = {v!r}" for k, v in sorted(best.params.items())]
        if best.checkpoint_path:
            out.append(f"  checkpoint: {best.checkpoint_path}")
    return "\n".join(out)


def study_counts(study: optuna.Study) -> dict[str, int]:
    """Trials of an Optuna study by state (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ...)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def save_plots(study: optuna.Study, out_dir: Path) -> dict[str, str]:
    """Save Optuna's optimisation history and parameter importances as PNG.

    Args:
        study: the finished study.
        out_dir: where the files go.

    Returns:
        ``{plot name: path}`` for each saved plot, or ``{name: "skipped: reason"}``
        where Optuna cannot draw it (e.g. importances need two finished trials
        with varied parameters).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances)):
        path = out_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                verbosity = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said below
                try:  # a two-objective study is drawn on its first objective (Optuna asks for a target)
                    ax = plot(study, target=(lambda t: t.values[0]) if len(study.directions) > 1 else None)
                finally:
                    optuna.logging.set_verbosity(verbosity)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out[name] = str(path)
        except Exception as err:  # Optuna raises ValueError/RuntimeError for too few trials
            out[name] = f"skipped: {err}"
    return out


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (TrialRows become dicts; NaN becomes null).

    Returns:
        The file's path.
    """
    def clean(x: Any) -> Any:
        if isinstance(x, TrialRow):
            return clean(asdict(x))
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Path):
            return str(x)
        return x

    path = out_dir / "summary.json"
    path.write_text(json.dumps(clean(summary), indent=2) + "\n", encoding="utf-8")
    return path
