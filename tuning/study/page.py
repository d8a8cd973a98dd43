"""The study page: ``{study}/report.html``, one self-contained file to open in a browser.

What it shows, top to bottom: the held-out numbers of the study's best trial
(the exported model) next to the Bayes oracle and the centre baseline; a map of
the receivers and the held-out transmitters coloured by the model's error, with
its 1σ ellipses for a sample of recordings; the error CDF of the three; the
calibration curve (share of truths inside the ellipse of each nominal level);
the learning curve of every trial, pruned and stopped ones included; the
optimisation history; parameter importances; the Pareto front when the study
has two objectives.

Self-contained on purpose: figures are PNG images inside the file (``data:``
URIs), there is no script, font or stylesheet to fetch, and a
Content-Security-Policy forbids the page any request, so it opens the same from
a laptop, an MLflow artefact view or an air-gapped site.

:func:`build_page` is pure: it takes plain arrays and records
(:class:`PageData`), so it is tested without a study. The collectors below it
(:func:`trial_curves`, :func:`optuna_view`, :func:`held_out_view`) turn a
finished study, its Tune results and its export directory into that data.
"""
from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heimdall.geometry import LocalFrame
from heimdall.receivers import STATIONS, Station, network_centroid

__all__ = ["Predictions", "HeldOutView", "TrialCurve", "TrialPoint", "ParetoView", "PageData", "FIGURES",
           "build_page", "write_page", "trial_curves", "optuna_view", "held_out_view", "pareto_view", "summary_facts", "study_page_data", "held_out_or_why",
           "PAGE_FILE"]

PAGE_FILE = "report.html"
#: Figure ids of a complete page, in page order (each an ``<img>`` inside ``<figure id=...>``).
FIGURES: tuple[str, ...] = ("map", "error-cdf", "calibration", "learning-curves", "history", "importances", "pareto")
#: Recordings whose ellipses the map draws (spread over the error range).
ELLIPSE_SAMPLE = 12
#: Nominal levels of the calibration curve (probability inside the ellipse).
LEVELS = np.linspace(0.05, 0.99, 48)
#: Line style of each trial state (Optuna's names; Tune's "stopped" is drawn like PRUNED).
STATE_STYLE: dict[str, dict[str, Any]] = {
    "COMPLETE": {"color": "#1f77b4", "linestyle": "-", "alpha": 0.9},
    "PRUNED": {"color": "#ff7f0e", "linestyle": "--", "alpha": 0.75},
    "FAIL": {"color": "#d62728", "linestyle": ":", "alpha": 0.9},
    "RUNNING": {"color": "#7f7f7f", "linestyle": "-.", "alpha": 0.7},
}
_MODEL_COLOURS = {"oracle": "#2ca02c", "centre": "#7f7f7f"}


# -- the page's data (plain arrays and records) ----------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """One model's Gaussian predictions on the held-out recordings.

    Attributes:
        name: legend label (``"oracle"`` and ``"centre"`` get fixed colours).
        lat, lon: (N,) predicted positions, degrees.
        cov_km2: (N, 2, 2) covariance, km², east/north at each prediction.
    """

    name: str
    lat: np.ndarray
    lon: np.ndarray
    cov_km2: np.ndarray


@dataclass(frozen=True)
class HeldOutView:
    """Held-out truths and the predictions compared on them (all of the same N recordings).

    Attributes:
        truth_lat, truth_lon: (N,) true transmitter positions, degrees.
        model: the study's best trial (the exported model).
        baselines: e.g. the Bayes oracle and the centre baseline (absent ones left out).
        title: where the recordings come from, e.g. ``"dataset default, test split"``.
        note: a line under the figures (e.g. why there is no oracle).
    """

    truth_lat: np.ndarray
    truth_lon: np.ndarray
    model: Predictions
    baselines: Sequence[Predictions] = ()
    title: str = ""
    note: str = ""


@dataclass(frozen=True)
class TrialCurve:
    """One trial's validation objective per epoch.

    Attributes:
        label: e.g. ``"#3"``.
        state: Optuna's state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``).
        epochs, values: the curve (same length).
    """

    label: str
    state: str
    epochs: Sequence[float]
    values: Sequence[float]


@dataclass(frozen=True)
class TrialPoint:
    """One Optuna trial's objective value(s) (None where it has none)."""

    number: int
    state: str
    values: tuple[float, ...] | None


@dataclass(frozen=True)
class ParetoView:
    """A two-objective study's trials and its Pareto front (:mod:`tuning.study.pareto`).

    Attributes:
        objectives: the two objective metrics.
        points: trial number -> its two values (each trial at its best epoch).
        front: numbers of the trials on the front.
        chosen: the number of the trial the export takes, if any.
    """

    objectives: tuple[str, str]
    points: Mapping[int, tuple[float, float]]
    front: Sequence[int]
    chosen: int | None = None


@dataclass(frozen=True)
class PageData:
    """Everything the page shows; a string where a section has no data says why.

    Attributes:
        study: the study's name.
        objectives: objective metric names (one, or two for a multi-objective study).
        directions: ``"minimize"``/``"maximize"`` per objective.
        best: the best trial's number (highlighted), if any.
        curves: every trial's learning curve.
        points: every Optuna trial (history, Pareto front).
        importances: parameter -> importance, or why there are none.
        held_out: the best trial on held-out recordings, or why it is absent.
        pareto: the front, for a two-objective study.
        facts: (label, text) lines of the header table.
        stations: the receivers drawn on the map.
    """

    study: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    best: int | None
    curves: Sequence[TrialCurve]
    points: Sequence[TrialPoint]
    importances: Mapping[str, float] | str
    held_out: HeldOutView | str
    pareto: ParetoView | None = None
    facts: Sequence[tuple[str, str]] = ()
    stations: Sequence[Station] = field(default=STATIONS)


# -- the page ---------------------------------------------------------------------------------------------


def build_page(data: PageData) -> str:
    """The study page as one HTML document (figures inline as PNG, no script, no request).

    Args:
        data: what to show (:class:`PageData`).

    Returns:
        The HTML text.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on servers
    import matplotlib.pyplot as plt

    # Optuna's matplotlib plots switch the global style (ggplot) when they are drawn first.
    with plt.style.context("default"):
        return _document(data.study, "\n".join(_sections(data)))


def _sections(data: PageData) -> list[str]:
    held = data.held_out
    sections = [_facts(data)]
    if isinstance(held, HeldOutView):
        sections += [_held_out_table(held),
                     _figure("map", "Where the best trial errs", _map(held, data.stations),
                             f"Receivers (triangles) and held-out transmitters coloured by the best trial's error; "
                             f"1σ ellipses and predicted positions for {min(ELLIPSE_SAMPLE, len(held.truth_lat))} "
                             f"recordings spread over the error range. {held.title}."),
                     _figure("error-cdf", "Error CDF", _error_cdf(held),
                             "Share of held-out recordings located within a distance, per model."),
                     _figure("calibration", "Calibration", _calibration(held),
                             "Share of truths inside each model's ellipse of a nominal level; the diagonal is "
                             "a perfectly calibrated model.")]
        if held.note:
            sections.append(f"<p class='note'>{html.escape(held.note)}</p>")
    else:
        sections.append(_absent("Held-out accuracy (map, error CDF, calibration)", held))
    sections.append(_figure("learning-curves", "Learning curves", _learning_curves(data),
                            "Validation objective per epoch of every trial; line style by Optuna state "
                            "(pruned and stopped trials dashed, their last epoch marked ×); the best trial thick.")
                    if data.curves else _absent("Learning curves", "no trial reported an epoch"))
    sections.append(_figure("history", "Optimisation history", _history(data),
                            "Objective of each trial in the order Optuna asked for it, and the best so far.")
                    if any(p.values for p in data.points) else
                    _absent("Optimisation history", "no Optuna trial has a value"))
    if isinstance(data.importances, str) or not data.importances:
        sections.append(_absent("Parameter importances", data.importances or "no parameter was varied"))
    else:
        sections.append(_figure("importances", "Parameter importances", _importances(data.importances),
                                f"Optuna's fANOVA importance of each parameter for {data.objectives[0]}."))
    if data.pareto is not None:
        sections.append(_figure("pareto", "Pareto front", _pareto(data),
                                "Every trial with both objectives; the front joined, the exported trial starred."))
    return sections


def write_page(data: PageData, path: str | Path) -> Path:
    """Write :func:`build_page`'s document to ``path`` (UTF-8). Returns the path."""
    path = Path(path)
    path.write_text(build_page(data), encoding="utf-8")
    return path


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:960px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}
th{font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:0}img{max-width:100%;height:auto}figcaption,.note{color:#555;font-size:.9em}
.absent{color:#8a5a00}
"""


def _document(study: str, body: str) -> str:
    title = html.escape(f"Heimdall Tune study {study}")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>\n"
        # Nothing may leave the page: images are data: URIs, the style is inline.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{title}</title>\n"
        f"<style>{_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n{body}\n</body></html>\n")


def _facts(data: PageData) -> str:
    rows = [("objective", ", ".join(f"{o} ({d})" for o, d in zip(data.objectives, data.directions))),
            ("best trial", f"#{data.best}" if data.best is not None else "none"), *data.facts]
    return "<table class='facts'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _absent(title: str, why: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n<p class='absent'>Not shown: {html.escape(why)}</p>"


def _figure(fig_id: str, title: str, png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f"<h2>{html.escape(title)}</h2>\n<figure id='{fig_id}'><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{b64}'>\n<figcaption>{html.escape(caption)}</figcaption></figure>")


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# -- held-out figures -------------------------------------------------------------------------------------


def _frame(held: HeldOutView) -> LocalFrame:
    return LocalFrame(float(np.mean(held.truth_lat)), float(np.mean(held.truth_lon)))


def _errors_km(held: HeldOutView, p: Predictions) -> np.ndarray:
    frame = _frame(held)
    te, tn = frame.to_local(held.truth_lat, held.truth_lon)
    pe, pn = frame.to_local(p.lat, p.lon)
    return np.hypot(pe - te, pn - tn)


def _mahalanobis_sq(held: HeldOutView, p: Predictions) -> np.ndarray:
    # The residual in the prediction's own tangent plane, where its covariance is expressed.
    east = np.empty(len(p.lat))
    north = np.empty(len(p.lat))
    for i, (lat, lon) in enumerate(zip(p.lat, p.lon)):
        east[i], north[i] = LocalFrame(float(lat), float(lon)).to_local(held.truth_lat[i], held.truth_lon[i])
    d = np.stack([east, north], -1)
    return np.einsum("ni,nij,nj->n", d, np.linalg.inv(np.asarray(p.cov_km2, dtype=np.float64)), d)


def _models(held: HeldOutView) -> list[Predictions]:
    return [held.model, *held.baselines]


def _colour(p: Predictions, i: int) -> str:
    return _MODEL_COLOURS.get(p.name, "#1f77b4" if i == 0 else f"C{i + 2}")


def _held_out_table(held: HeldOutView) -> str:
    head = "<tr><th>model</th><th>n</th><th>median km</th><th>p90 km</th><th>in 1σ</th><th>in 2σ</th></tr>"
    rows = []
    for p in _models(held):
        err, m2 = _errors_km(held, p), _mahalanobis_sq(held, p)
        cells = [f"{len(err)}", f"{np.median(err):.1f}", f"{np.quantile(err, 0.9):.1f}",
                 f"{np.mean(m2 <= 1.0):.0%}", f"{np.mean(m2 <= 4.0):.0%}"]
        rows.append(f"<tr><td>{html.escape(p.name)}</td>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>")
    title = html.escape(held.title or "held-out recordings")
    return (f"<h2>Held-out accuracy</h2>\n<p>{title}. A perfectly calibrated model holds 39% of truths in its 1σ "
            f"ellipse and 86% in its 2σ ellipse.</p>\n<table>{head}{''.join(rows)}</table>")


def _ellipse_lat_lon(lat: float, lon: float, cov: np.ndarray, k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 2.0 * np.pi, 73)
    chol = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
    xy = k * chol @ np.stack([np.cos(t), np.sin(t)])
    return LocalFrame(float(lat), float(lon)).to_geographic(xy[0], xy[1])


def _sample(err: np.ndarray, k: int) -> np.ndarray:
    """``k`` recordings at evenly spaced error quantiles (the same ones on every run)."""
    order = np.argsort(err, kind="stable")
    return order[np.unique(np.linspace(0, len(err) - 1, min(k, len(err))).round().astype(int))]


def _map(held: HeldOutView, stations: Sequence[Station]) -> bytes:
    import matplotlib.pyplot as plt

    err = _errors_km(held, held.model)
    fig, ax = plt.subplots(figsize=(9, 7.5))
    sc = ax.scatter(held.truth_lon, held.truth_lat, c=err, cmap="viridis_r", s=14, alpha=0.85, linewidths=0,
                    vmin=0.0, vmax=float(np.quantile(err, 0.95)) or 1.0)
    fig.colorbar(sc, ax=ax, label=f"{held.model.name}: error km (colour capped at p95)", shrink=0.8)
    p = held.model
    for n, i in enumerate(_sample(err, ELLIPSE_SAMPLE)):
        elat, elon = _ellipse_lat_lon(p.lat[i], p.lon[i], p.cov_km2[i])
        ax.plot(elon, elat, color="#d62728", lw=1.1, label="1σ ellipse" if n == 0 else None)
        ax.plot([held.truth_lon[i], p.lon[i]], [held.truth_lat[i], p.lat[i]], color="#d62728", lw=0.6, alpha=0.6)
        ax.plot(p.lon[i], p.lat[i], "+", color="#d62728", ms=7, label="prediction" if n == 0 else None)
        ax.plot(held.truth_lon[i], held.truth_lat[i], "o", mfc="none", mec="k", ms=6,
                label="sampled transmitter" if n == 0 else None)
    ax.plot([s.lon for s in stations], [s.lat for s in stations], "^", color="k", ms=9, label="receiver")
    for s in stations:
        ax.annotate(s.id, (s.lon, s.lat), textcoords="offset points", xytext=(5, 5), fontsize=8)
    lat0 = network_centroid()[0]
    ax.set_aspect(1.0 / math.cos(math.radians(lat0)))  # a degree of longitude is shorter than one of latitude
    ax.set(xlabel="longitude °E", ylabel="latitude °N")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _error_cdf(held: HeldOutView) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, p in enumerate(_models(held)):
        err = np.sort(_errors_km(held, p))
        ax.plot(err, np.arange(1, len(err) + 1) / len(err), color=_colour(p, i), lw=2 if i == 0 else 1.4,
                label=f"{p.name} (median {np.median(err):.1f} km)")
    ax.set(xlabel="error km", ylabel="share of recordings", ylim=(0, 1.01))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def _calibration(held: HeldOutView) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    radius_sq = -2.0 * np.log1p(-LEVELS)  # the ellipse of level p in 2-D: m² <= -2 ln(1 - p)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    for i, p in enumerate(_models(held)):
        m2 = _mahalanobis_sq(held, p)
        ax.plot(LEVELS, (m2[:, None] <= radius_sq[None, :]).mean(0), color=_colour(p, i), lw=2 if i == 0 else 1.4,
                label=p.name)
    ax.set(xlabel="nominal level (probability inside the ellipse)", ylabel="empirical coverage", xlim=(0, 1),
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _png(fig)


# -- study figures -----------------------------------------------------------------------------------------


def _style(state: str) -> dict[str, Any]:
    return STATE_STYLE.get(state, STATE_STYLE["PRUNED"] if state.lower() == "stopped" else STATE_STYLE["RUNNING"])


def _learning_curves(data: PageData) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.8))
    seen: set[str] = set()
    best = f"#{data.best}" if data.best is not None else None
    for c in data.curves:
        style = _style(c.state)
        label = None if c.state in seen else c.state.lower()
        seen.add(c.state)
        lw = 3.0 if c.label == best else 1.3
        ax.plot(c.epochs, c.values, marker="o", ms=3, lw=lw, label=label, **style)
        if c.state != "COMPLETE" and len(c.epochs):
            ax.plot(c.epochs[-1], c.values[-1], "x", ms=8, color=style["color"])
        if c.label == best and len(c.epochs):
            ax.annotate(f"best {c.label}", (c.epochs[-1], c.values[-1]), textcoords="offset points", xytext=(6, 0),
                        fontsize=8)
    ax.set(xlabel="epoch", ylabel=data.objectives[0])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title="trial state")
    return _png(fig)


def _history(data: PageData) -> bytes:
    import matplotlib.pyplot as plt

    n_obj = len(data.objectives)
    fig, axes = plt.subplots(n_obj, 1, figsize=(8, 3.6 * n_obj), squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        pts = [(p.number, p.values[j], p.state) for p in data.points if p.values and math.isfinite(p.values[j])]
        for state in sorted({s for _, _, s in pts}):
            xs = [n for n, _, s in pts if s == state]
            ys = [v for _, v, s in pts if s == state]
            ax.scatter(xs, ys, s=22, color=_style(state)["color"], label=state.lower())
        if n_obj == 1 and pts:
            best = np.minimum.accumulate if data.directions[0] == "minimize" else np.maximum.accumulate
            pts.sort()
            ax.step([n for n, _, _ in pts], best(np.array([v for _, v, _ in pts])), where="post", color="k",
                    lw=1.2, label="best so far")
        ax.set(xlabel="trial number", ylabel=data.objectives[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _importances(importances: Mapping[str, float]) -> bytes:
    import matplotlib.pyplot as plt

    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#1f77b4")
    ax.set(xlabel="importance (share of the objective's variance)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def _pareto(data: PageData) -> bytes:
    import matplotlib.pyplot as plt

    pareto = data.pareto
    assert pareto is not None  # only called with a front
    pts = pareto.points
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([v[0] for v in pts.values()], [v[1] for v in pts.values()], s=20, color="#aaaaaa", label="trial")
    front = sorted((pts[n] for n in pareto.front if n in pts), key=lambda v: v[0])
    ax.plot([v[0] for v in front], [v[1] for v in front], "o-", color="#d62728", label="Pareto front")
    if pareto.chosen in pts:
        v = pts[pareto.chosen]
        ax.plot(v[0], v[1], "*", ms=16, color="#ffbf00", mec="k", label=f"exported #{pareto.chosen}")
    ax.set(xlabel=pareto.objectives[0], ylabel=pareto.objectives[1])
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


# -- collectors: a finished study, its results and its export turned into PageData ------------------------


def trial_curves(results: Sequence[Any], metric: str, states: Mapping[int, str],
                 numbers: Mapping[str, int | None]) -> list[TrialCurve]:
    """Every Tune trial's ``metric`` per epoch.

    Args:
        results: Tune ``Result`` objects (their ``metrics_dataframe``).
        metric: the objective's metric.
        states: Optuna state name by trial number (Tune's own status is used where a trial has none).
        numbers: Optuna number by Tune trial id.
    """
    from tuning.study.trial import EPOCHS_METRIC

    curves = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or metric not in df or EPOCHS_METRIC not in df:
            continue
        df = df[[EPOCHS_METRIC, metric]].dropna()
        trial_id = str((r.metrics or {}).get("trial_id") or Path(r.path).name)
        number = numbers.get(trial_id)
        state = states.get(number, "FAIL" if r.error else "PRUNED") if number is not None else "RUNNING"
        if len(df):
            curves.append(TrialCurve(f"#{number}" if number is not None else trial_id, state,
                                     df[EPOCHS_METRIC].astype(float).tolist(), df[metric].astype(float).tolist()))
    return curves


def optuna_view(study: Any) -> tuple[list[TrialPoint], Mapping[str, float] | str]:
    """The study's trials and its parameter importances (for the first objective), or why there are none.

    Args:
        study: an ``optuna.Study``.
    """
    import optuna

    trials = study.get_trials(deepcopy=False)
    points = [TrialPoint(t.number, t.state.name, tuple(float(v) for v in t.values) if t.values else None)
              for t in trials]
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = {k for t in finished for k in t.params if len({str(u.params.get(k)) for u in finished}) > 1}
    if len(finished) < 2 or not varied:
        return points, (f"importances need at least two complete trials with varied parameters "
                        f"({len(finished)} complete)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental-feature warnings
            return points, dict(optuna.importance.get_param_importances(
                study, target=(lambda t: t.values[0]) if len(study.directions) > 1 else None))
    except (ValueError, RuntimeError) as exc:
        return points, f"Optuna could not compute them: {exc}"


def pareto_view(summary: Mapping[str, Any]) -> ParetoView | None:
    """The front ``summary.json`` holds (its ``pareto`` entry), or None for a single-objective study."""
    pareto = summary.get("pareto")
    if not isinstance(pareto, Mapping) or len(pareto.get("objectives") or ()) < 2:
        return None
    first, second = pareto["objectives"][:2]
    points: dict[int, tuple[float, float]] = {}
    for row in summary.get("trials") or ():
        metrics = row.get("metrics") or {}
        pair = (row.get("value"), metrics.get(second))
        if row.get("number") is not None and all(_finite(v) for v in pair):
            points[int(row["number"])] = (float(pair[0]), float(pair[1]))
    for member in pareto.get("front") or ():
        pair = ((member.get("values") or {}).get(first), (member.get("values") or {}).get(second))
        if member.get("number") is not None and all(_finite(v) for v in pair):
            points[int(member["number"])] = (float(pair[0]), float(pair[1]))
    chosen = (pareto.get("chosen") or {}).get("number")
    return ParetoView((str(first), str(second)), points,
                      [int(m["number"]) for m in pareto.get("front") or () if m.get("number") is not None],
                      int(chosen) if chosen is not None else None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def held_out_view(export_dir: Path, labels: Mapping[str, np.ndarray] | None = None,
                  generator: Mapping[str, Any] | None = None, max_recordings: int = 2000) -> HeldOutView:
    """The exported model's predictions on its test recordings (the export's ``heldout.npz``), with the
    Bayes oracle and the centre baseline on the same recordings when the dataset is synthetic.

    Args:
        export_dir: a gated export directory (:mod:`tuning.release.stage`).
        labels: the dataset's catalogue labels (``catalog.recordings``), for the oracle.
        generator: the synthetic dataset's generator config (None: no oracle, no centre).
        max_recordings: at most this many recordings (the oracle costs ~ms each), the lowest ids.

    Raises:
        DataError: the export directory lacks its model or held-out file.
    """
    from heimdall.geometry import default_frame
    from heimdall.metrics import covariance_from_sigmas
    from tuning.release.onnx import HeldOut, onnx_session, run_onnx
    from tuning.release.stage import HELDOUT_FILE, MODEL_FILE

    held = HeldOut.load(export_dir / HELDOUT_FILE)
    keep = np.sort(np.argsort(held.recording_id, kind="stable")[:max_recordings])
    out = run_onnx(onnx_session(export_dir / MODEL_FILE), held.features[keep], held.mask[keep])
    sigma_km = out["sigma"].astype(np.float64) / 1000.0
    model = Predictions("best trial", out["position"][:, 0].astype(np.float64), out["position"][:, 1].astype(np.float64),
                        covariance_from_sigmas(sigma_km[:, 0], sigma_km[:, 1], out["rho"].astype(np.float64)))
    title = f"dataset {held.dataset or '?'}, {held.split} split, {len(keep)} of {len(held)} recordings"
    if generator is None or labels is None:
        return HeldOutView(held.truth_lat[keep], held.truth_lon[keep], model, (), title,
                           "No oracle or centre baseline: they invert the generator of a synthetic dataset.")
    from heimdall.oracle import BayesOracle, centre_baseline
    from heimdall.scene import GeneratorConfig

    config = GeneratorConfig.from_dict(dict(generator))
    index = {int(r): i for i, r in enumerate(labels["recording_id"])}
    rows = np.array([index[int(r)] for r in held.recording_id[keep]])
    frame = default_frame()
    mean, cov = BayesOracle(config).posterior(labels["rx_power_dbm"][rows], labels["heard"][rows],
                                              labels["frequency_hz"][rows], ellipse="calibrated")
    c_mean, c_cov = centre_baseline(config, len(rows))
    baselines = [Predictions(name, *frame.to_geographic(m[:, 0], m[:, 1]), c)
                 for name, m, c in (("oracle", mean, cov), ("centre", c_mean, c_cov))]
    return HeldOutView(held.truth_lat[keep], held.truth_lon[keep], model, baselines, title)


def study_page_data(study: Any, results: Sequence[Any], summary: Mapping[str, Any],
                    held_out: HeldOutView | str) -> PageData:
    """The page of a finished study.

    Args:
        study: its ``optuna.Study`` (states, values, importances).
        results: its Tune results (learning curves).
        summary: its ``summary.json`` (trials best first, objectives, Pareto front, export outcome).
        held_out: :func:`held_out_view` of its export, or why there is none (:func:`held_out_or_why`).
    """
    points, importances = optuna_view(study)
    pareto = pareto_view(summary)
    objectives = tuple(pareto.objectives) if pareto else (str(summary.get("objective", "objective")),)
    directions = tuple(d.name.lower() for d in study.directions)
    rows = [r for r in summary.get("trials") or () if isinstance(r, Mapping)]
    numbers = {str(r.get("trial_id")): r.get("number") for r in rows}
    best = summary.get("best") or {}
    chosen = pareto.chosen if pareto else best.get("number")
    return PageData(study=study.study_name, objectives=objectives, directions=directions, best=chosen,
                    curves=trial_curves(results, objectives[0], {p.number: p.state for p in points}, numbers),
                    points=points, importances=importances, held_out=held_out, pareto=pareto,
                    facts=summary_facts(summary))


def held_out_or_why(summary: Mapping[str, Any], labels: Any = None,
                    generator: Mapping[str, Any] | None = None) -> HeldOutView | str:
    """:func:`held_out_view` of the export ``summary.json`` records, or a sentence saying why there is none.

    Args:
        summary: the study's summary (its ``export`` entry).
        labels: a callable returning the dataset's catalogue labels (called only when an oracle is drawn).
        generator: the synthetic dataset's generator config (None: no oracle, no centre).
    """
    export = summary.get("export")
    if not isinstance(export, Mapping):
        return ("no model was exported (the study ran with --no-export, or no trial finished an epoch); "
                "these sections score the exported model on its held-out recordings")
    if export.get("status") == "refused":
        return f"the export was refused: {export.get('error')}"
    from tuning.release.stage import HELDOUT_FILE

    export_dir = Path(str(export.get("export_dir", "")))
    if not (export_dir / HELDOUT_FILE).is_file():
        return f"the export directory {export_dir} holds no held-out recordings ({HELDOUT_FILE})"
    return held_out_view(export_dir, labels() if (labels and generator) else None, generator)


def summary_facts(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Header lines from ``summary.json``: trial counts, wall time, export outcome."""
    facts = [("Optuna trials", ", ".join(f"{k.lower()} {v}" for k, v in (summary.get("optuna_trials") or {}).items())),
             ("wall time", f"{float(summary.get('wall_seconds') or 0) / 60:.1f} min")]
    export = summary.get("export")
    if isinstance(export, Mapping):
        pub = export.get("publication") or {}
        facts.append(("export", f"{export.get('status')}" + (f": v{pub['version']} {pub.get('model_key', '')}"
                                                               if pub.get("version") else "")))
    space = (summary.get("study") or {}).get("space")
    if space:
        facts.append(("space", str(space)))
    return [(k, v) for k, v in facts if v]

