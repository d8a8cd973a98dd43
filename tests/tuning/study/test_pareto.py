"""Accuracy vs latency: objective parsing, the latency measurement, the Pareto front and its export rule,
and one real two-objective study (local Ray, tiny dataset) that exports a model on its front."""
from __future__ import annotations

import argparse
import json
import math
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from heimdall.errors import ConfigError
from heimdall.models import build_model
from heimdall.module import LocalizationModule
from tuning.run import build_parser, main
from tuning.study.pareto import ParetoChoiceError, choose, export_order, pareto_front, study_front
from tuning.study.report import TrialRow
from tuning.study.trial import LATENCY_METRIC, MODEL_PARAMS_METRIC, OBJECTIVES, objective_arg, parse_objectives
from tuning.study.tune import StudyConfig
from tuning.study.worker import LATENCY_THREADS, latency_session, measure_latency_ms

TWO = parse_objectives("nll,latency_ms")


def row(number: int, nll: float | None, latency: float | None, checkpoint: str | None = "ckpt") -> TrialRow:
    metrics = {k: v for k, v in (("val/nll_km", nll), (LATENCY_METRIC, latency)) if v is not None}
    metrics[MODEL_PARAMS_METRIC] = 1000.0 * number
    return TrialRow(number=number, trial_id=f"t{number}", status="complete", epochs=1, best_epoch=1, value=nll,
                    metrics=metrics, checkpoint_path=checkpoint and f"{checkpoint}-{number}")


# -- objective parsing ---------------------------------------------------------------------------


def test_one_or_two_objectives_parse_and_the_first_drives_the_study() -> None:
    assert parse_objectives("nll") == (OBJECTIVES["nll"],)
    assert [o.metric for o in parse_objectives(" nll , latency_ms ")] == ["val/nll_km", LATENCY_METRIC]
    config = StudyConfig(name="s", objective="calibrated,latency_ms", max_latency_ms=2.5)
    assert config.objective_spec is OBJECTIVES["calibrated"] and len(config.objectives) == 2
    assert StudyConfig(name="s").objectives == (OBJECTIVES["nll"],)  # single objective stays the default
    assert objective_arg("nll, latency_ms") == "nll,latency_ms"


@pytest.mark.parametrize(("text", "expected"), [
    ("nll,speed", "objective 'speed' in 'nll,speed' is unknown; fix: use one of nll, median, calibrated, latency_ms"),
    ("nll,median,latency_ms", "at most 2 objectives"),
    ("nll,nll", "names 'nll' twice"),
    ("latency_ms,nll", "puts 'latency_ms' first"),
])
def test_each_bad_objective_is_one_clear_error(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_objectives(text)
    assert len(err.value.problems) == 1 and expected in err.value.problems[0]
    assert "fix:" in err.value.problems[0]
    with pytest.raises(argparse.ArgumentTypeError, match="fix:"):
        objective_arg(text)
    with pytest.raises(ConfigError) as err:
        StudyConfig(name="s", objective=text)
    assert len(err.value.problems) == 1


def test_cli_refuses_a_bad_objective_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--objective", "nll,nll"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m tuning.run: error: argument --objective") and "twice" in err[-1]


def test_a_latency_bound_needs_the_latency_objective_and_a_positive_value() -> None:
    with pytest.raises(ConfigError, match="does not have; fix: --objective nll,latency_ms"):
        StudyConfig(name="s", max_latency_ms=1.0)
    with pytest.raises(ConfigError, match="max_latency_ms must be > 0"):
        StudyConfig(name="s", objective="nll,latency_ms", max_latency_ms=-1.0)
    saved = StudyConfig(name="s", objective="nll,latency_ms", max_latency_ms=1.5).to_dict()
    assert StudyConfig.from_dict(json.loads(json.dumps(saved))).max_latency_ms == 1.5  # --resume keeps it


# -- the front and the rule ----------------------------------------------------------------------


def test_front_keeps_only_undominated_trials_best_first() -> None:
    rows = [row(0, 5.0, 1.0), row(1, 4.0, 2.0), row(2, 6.0, 1.5), row(3, 3.0, 4.0), row(4, 5.0, 3.0)]
    front = pareto_front(rows, TWO)
    assert [r.number for r in front] == [3, 1, 0]  # 2 and 4 are dominated by 0
    assert choose(front, TWO, None).number == 3  # no bound: the best NLL
    assert choose(front, TWO, 2.0).number == 1  # the best NLL within 2 ms
    assert choose(front, TWO, 1.0).number == 0  # the bound is inclusive


def test_ties_are_all_on_the_front_and_broken_by_latency_then_number() -> None:
    rows = [row(5, 4.0, 2.0), row(2, 4.0, 2.0), row(7, 4.0, 1.0), row(1, 9.0, 0.5)]
    front = pareto_front(rows, TWO)
    assert [r.number for r in front] == [7, 1]  # 7 dominates the equal-NLL, slower 5 and 2
    twins = pareto_front([row(5, 4.0, 2.0), row(2, 4.0, 2.0)], TWO)
    assert [r.number for r in twins] == [2, 5]  # equal values: neither dominates
    assert choose(twins, TWO, None).number == 2


def test_rows_missing_an_objective_are_left_out_and_an_empty_front_is_one_error() -> None:
    rows = [row(0, None, 1.0), row(1, 4.0, None)]
    assert pareto_front(rows, TWO) == []
    with pytest.raises(ParetoChoiceError, match="the Pareto front is empty") as err:
        export_order(rows, TWO, None)
    assert str(err.value).count("fix:") == 1


def test_no_member_within_the_bound_is_one_error_naming_the_fastest() -> None:
    rows = [row(0, 5.0, 1.25), row(1, 4.0, 2.0)]
    with pytest.raises(ParetoChoiceError) as err:
        export_order(rows, TWO, 0.5)
    message = str(err.value)
    assert "--max-latency-ms 0.5" in message and "trial #0, takes 1.25 ms" in message
    assert message.endswith("fix: raise --max-latency-ms to at least 1.25, drop it, or search smaller models")
    front = study_front(rows, TWO, 0.5)
    assert front is not None and front.chosen is None and front.to_dict()["refusal"] == message
    assert "export: none" in front.text()


def test_export_order_puts_the_choice_first_and_leaves_one_objective_alone() -> None:
    rows = [row(3, 3.0, 4.0), row(1, 4.0, 2.0), row(0, 5.0, 1.0)]
    assert [r.number for r in export_order(rows, TWO, 2.5)] == [1, 3, 0]
    assert export_order(rows, TWO[:1], 2.5) == rows
    assert study_front(rows, TWO[:1], None) is None
    with pytest.raises(ParetoChoiceError, match="saved no checkpoint"):
        export_order([row(0, 5.0, 1.0, checkpoint=None)], TWO, None)


def test_front_table_and_summary_entry() -> None:
    front = study_front([row(3, 3.0, 4.0), row(1, 4.0, 2.0), row(2, 6.0, 5.0)], TWO, 3.0)
    assert front is not None
    lines = front.text().splitlines()
    assert lines[0].startswith("Pareto front: 2 of 3 trial(s)")
    assert lines[1].split() == ["trial", "nll", "latency_ms", "params"]
    assert lines[2].split() == ["#3", "3", "4", "3.0k"]
    assert lines[3].split() == ["#1", "4", "2", "1.0k", "<-", "exported"]
    saved = front.to_dict()
    assert [m["number"] for m in saved["front"]] == [3, 1] and saved["chosen"]["number"] == 1
    assert saved["front"][1]["values"] == {"val/nll_km": 4.0, LATENCY_METRIC: 2.0}


# -- the latency measurement -----------------------------------------------------------------------


def test_latency_is_a_finite_positive_median_on_one_onnxruntime_thread(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = LocalizationModule(build_model("resnet"))
    ms = [measure_latency_ms(module, runs=20, warmup=2) for _ in range(2)]
    assert all(math.isfinite(m) and 0.0 < m < 1000.0 for m in ms), ms
    from tuning.release.onnx import build_metadata, export_onnx

    options = latency_session(export_onnx(module, tmp_path / "m.onnx", build_metadata(module))).get_session_options()
    assert LATENCY_THREADS == 1
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        measure_latency_ms(module, runs=0)


# -- a real two-objective study ----------------------------------------------------------------------


@pytest.mark.ray
def test_two_objective_study_yields_a_pareto_front_and_exports_a_model_on_it(
    ray_session: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"pareto-{uuid.uuid4().hex[:8]}"
    code = main(["--smoke-test", "--recordings", "64", "--dataset", "tiny", "--name", name,
                 "--objective", "nll,latency_ms", "--max-latency-ms", "1000", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, out + err

    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    for trial in summary["trials"]:  # every trial measured its model once and reported it
        assert trial["metrics"][LATENCY_METRIC] > 0 and trial["metrics"][MODEL_PARAMS_METRIC] > 0
    pareto = summary["pareto"]
    assert pareto["objectives"] == ["val/nll_km", LATENCY_METRIC] and pareto["max_latency_ms"] == 1000
    assert 1 <= len(pareto["front"]) <= 2 and pareto["refusal"] is None
    chosen = pareto["chosen"]["trial_id"]
    assert chosen in {m["trial_id"] for m in pareto["front"]}
    assert "Pareto front:" in out and "<- exported" in out

    # The export took the front's choice.
    assert summary["export"]["status"] == "registered" and summary["export"]["trial_id"] == chosen
    card = json.loads((tmp_path / "studies" / name / "export" / "model_card.json").read_text())
    assert card["study"]["best_trial_id"] == chosen

    # Optuna ran a two-objective study (its default database is in the data directory): both values
    # per finished trial, no intermediate values.
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.directions) == 2
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished and all(len(t.values) == 2 and not t.intermediate_values for t in finished)


def test_a_two_objective_study_plots_its_first_objective(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=4)
    from tuning.study.report import save_plots

    plots = save_plots(study, tmp_path)
    assert all(Path(p).stat().st_size > 0 for p in plots.values()), plots


@pytest.mark.ray
@pytest.mark.slow
def test_a_bound_no_front_member_meets_is_one_error_and_nothing_is_published(
    ray_session: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"pareto-bound-{uuid.uuid4().hex[:8]}"
    code = main(["--smoke-test", "--recordings", "64", "--dataset", "tiny", "--name", name,
                 "--objective", "nll,latency_ms", "--max-latency-ms", "0.000001", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no trial on the Pareto front has latency_ms <= --max-latency-ms 1e-06" in errors[0]
    assert errors[0].endswith("drop it, or search smaller models")
    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    assert summary["pareto"]["chosen"] is None and summary["pareto"]["refusal"] in errors[0]
    assert "export" not in summary and not (tmp_path / "studies" / name / "export").exists()
    assert not any((tmp_path / "models").rglob("*.onnx")), "a model was published"
