"""Accuracy vs latency: the Pareto front of a two-objective study and the export's choice from it.

A study run with ``--objective nll,latency_ms`` minimises both (Optuna samples
towards their Pareto front); every trial reports its exported model's
onnxruntime latency (:func:`tuning.study.worker.measure_latency_ms`) next to its
validation metrics. The front is built from each trial's row in the summary
(:func:`tuning.study.report.trial_rows`): its best epoch by the first
objective, which is the checkpoint the export takes, and the latency of its
architecture. A trial is on the front when no other trial is at least as good
on both objectives and better on one; trials with equal values are all on it.

The export rule (:func:`choose`): among the front's members whose
``latency_ms`` is at most ``--max-latency-ms`` (no bound by default), the one
with the best first objective; equal first objectives go to the lower
latency, then the lower trial number. No member within the bound is an error
before anything is exported or published.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from heimdall.errors import HeimdallError
from tuning.study.report import TrialRow
from tuning.study.trial import LATENCY_METRIC, MODEL_PARAMS_METRIC, Objective

__all__ = ["RULE", "ParetoChoiceError", "ParetoFront", "pareto_front", "choose", "study_front", "export_order"]

#: The export rule, as ``summary.json`` and the summary state it.
RULE = (f"best first objective among Pareto front members with {LATENCY_METRIC} <= max_latency_ms (none: no bound); "
        f"ties: lower second objective, then lower trial number")


class ParetoChoiceError(HeimdallError):
    """No trial on the Pareto front can be exported (an empty front, or none within the latency bound)."""


def _values(row: TrialRow, objectives: Sequence[Objective]) -> tuple[float, ...] | None:
    """The row's objectives, each signed so that smaller is better; None if one is missing."""
    values = []
    for i, o in enumerate(objectives):
        v = row.value if i == 0 else row.metrics.get(o.metric)
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            return None
        values.append(float(v) if o.mode == "min" else -float(v))
    return tuple(values)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _rank(row: TrialRow, objectives: Sequence[Objective]) -> tuple[Any, ...]:
    values = _values(row, objectives) or ()
    return (*values, row.number if row.number is not None else math.inf, row.trial_id)


def pareto_front(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> list[TrialRow]:
    """The rows no other row dominates, best first objective first.

    Args:
        rows: the study's rows (:func:`tuning.study.report.trial_rows`).
        objectives: the study's objectives; the first is each row's ``value``, the others
            are read from its ``metrics``.

    Returns:
        The front (empty when no row has every objective); rows with equal values are all on it.
    """
    scored = [(r, v) for r in rows if (v := _values(r, objectives)) is not None]
    front = [r for r, v in scored if not any(_dominates(w, v) for _, w in scored)]
    return sorted(front, key=lambda r: _rank(r, objectives))


def choose(front: Sequence[TrialRow], objectives: Sequence[Objective], max_latency_ms: float | None) -> TrialRow:
    """The front member the export takes (:data:`RULE`).

    Args:
        front: from :func:`pareto_front`.
        objectives: the study's objectives.
        max_latency_ms: the bound on ``latency_ms`` (None: no bound).

    Returns:
        The chosen row.

    Raises:
        ParetoChoiceError: the front is empty, or no member is within the bound (naming the fastest).
    """
    names = ", ".join(o.metric for o in objectives)
    if not front:
        raise ParetoChoiceError(f"the Pareto front is empty: no trial reported every objective ({names}), so there "
                                f"is nothing to export; fix: check the trial logs and run at least one full epoch "
                                f"(--max-epochs, --time-budget)")
    within = [r for r in front if max_latency_ms is None or r.metrics.get(LATENCY_METRIC, math.inf) <= max_latency_ms]
    if not within:
        fastest = min(front, key=lambda r: r.metrics.get(LATENCY_METRIC, math.inf))
        latency = fastest.metrics.get(LATENCY_METRIC, math.inf)
        raise ParetoChoiceError(
            f"no trial on the Pareto front has {LATENCY_METRIC} <= --max-latency-ms {max_latency_ms:g}: the fastest "
            f"of its {len(front)} member(s), trial #{fastest.number}, takes {latency:.3g} ms; nothing was exported; "
            f"fix: raise --max-latency-ms to at least {math.ceil(latency * 1000) / 1000:g}, drop it, or search "
            f"smaller models")
    return min(within, key=lambda r: _rank(r, objectives))


@dataclass(frozen=True)
class ParetoFront:
    """A two-objective study's front and the export's choice, as the summary shows and saves them.

    Attributes:
        objectives: the study's objectives, first first.
        members: the front, best first objective first.
        max_latency_ms: the export's bound (None: none).
        chosen: the member the export takes; None when :attr:`refusal` says why none.
        refusal: the :class:`ParetoChoiceError` message, or None.
        trials: rows the front was built from.
    """

    objectives: tuple[Objective, ...]
    members: tuple[TrialRow, ...]
    max_latency_ms: float | None
    chosen: TrialRow | None
    refusal: str | None
    trials: int

    def text(self) -> str:
        """The front as an aligned table (trial, each objective, model parameters) and the choice."""
        header = ["trial", *(o.name for o in self.objectives), "params", ""]
        lines = []
        for r in self.members:
            params = r.metrics.get(MODEL_PARAMS_METRIC)
            lines.append([f"#{r.number}" if r.number is not None else r.trial_id,
                          *(_fmt(r.value if i == 0 else r.metrics.get(o.metric)) for i, o in enumerate(self.objectives)),
                          f"{params / 1000:.1f}k" if params is not None else "-",
                          "<- exported" if r is self.chosen else ""])
        widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]
        bound = "no bound" if self.max_latency_ms is None else f"{LATENCY_METRIC} <= {self.max_latency_ms:g}"
        out = [f"Pareto front: {len(self.members)} of {self.trials} trial(s) "
               f"({', '.join(f'{o.metric} {o.mode}' for o in self.objectives)}; each trial at its best epoch)"]
        out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *lines]]
        if self.chosen is not None:
            out.append(f"export: trial #{self.chosen.number}, the best {self.objectives[0].metric} on the front "
                       f"({bound})")
        else:
            out.append(f"export: none: {self.refusal}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """``summary.json``'s ``pareto`` entry."""
        return {
            "objectives": [o.metric for o in self.objectives], "modes": [o.mode for o in self.objectives],
            "max_latency_ms": self.max_latency_ms, "rule": RULE, "trials": self.trials,
            "front": [{"number": r.number, "trial_id": r.trial_id, "best_epoch": r.best_epoch,
                       "values": {o.metric: (r.value if i == 0 else r.metrics.get(o.metric))
                                  for i, o in enumerate(self.objectives)},
                       MODEL_PARAMS_METRIC: r.metrics.get(MODEL_PARAMS_METRIC), "checkpoint_path": r.checkpoint_path}
                      for r in self.members],
            "chosen": None if self.chosen is None else {"number": self.chosen.number, "trial_id": self.chosen.trial_id},
            "refusal": self.refusal,
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def study_front(rows: Sequence[TrialRow], objectives: Sequence[Objective],
                max_latency_ms: float | None) -> ParetoFront | None:
    """The study's :class:`ParetoFront`, or None for a single-objective study.

    A front without an exportable member is returned with its :attr:`ParetoFront.refusal`;
    :func:`export_order` raises it.
    """
    if len(objectives) < 2:
        return None
    front = pareto_front(rows, objectives)
    try:
        chosen, refusal = choose(front, objectives, max_latency_ms), None
    except ParetoChoiceError as exc:
        chosen, refusal = None, str(exc)
    return ParetoFront(tuple(objectives), tuple(front), max_latency_ms, chosen, refusal, len(rows))


def export_order(rows: Sequence[TrialRow], objectives: Sequence[Objective],
                 max_latency_ms: float | None) -> list[TrialRow]:
    """The rows in the order the export considers them: unchanged for one objective; for two, the
    front member :func:`choose` picks first.

    Raises:
        ParetoChoiceError: a two-objective study whose front has no member to export.
    """
    if len(objectives) < 2:
        return list(rows)
    chosen = choose(pareto_front(rows, objectives), objectives, max_latency_ms)
    if not chosen.checkpoint_path:  # else the export would quietly take the next row
        raise ParetoChoiceError(f"trial #{chosen.number}, the Pareto front's choice ({RULE}), saved no checkpoint; "
                                f"nothing was exported; fix: check the run storage")
    return [chosen, *(r for r in rows if r is not chosen)]
