"""Each setting is declared once: a dataclass field whose metadata makes its flag.

The parsers of ``tuning.run``, ``tuning.data``, ``tuning.train`` and
``tuning.register`` are read back: every flag of a settings group maps to
exactly one field and every flag field to exactly one flag, argparse holds no
default of its own, and a setting resolves flag, then environment, then default.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

import tuning.data.cli
import tuning.register
import tuning.run
import tuning.train
from tuning import settings as st
from tuning.study.tune import StudyConfig

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = (st.DataSettings, st.StudyLocations, st.RegistrySettings, StudyConfig, tuning.run.RunMode)


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every optional flag of ``parser`` and its sub-commands (help excluded)."""
    found = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for child in sub.choices.values():
            found += _actions(child)
    return found


def _field_flags(*classes: type) -> dict[str, str]:
    """flag -> ``Class.field`` of every flag field."""
    flags = [(st.flag_name(f), f"{cls.__name__}.{f.name}") for cls in classes for f in st.flag_fields(cls)]
    counts = Counter(flag for flag, _ in flags)
    assert not [f for f, n in counts.items() if n > 1], f"a flag declared by two fields: {counts}"
    return dict(flags)


def test_every_run_flag_is_exactly_one_field_and_every_field_one_flag() -> None:
    fields = _field_flags(*SETTINGS)
    parsed = Counter(flag for a in _actions(tuning.run.build_parser()) for flag in a.option_strings)
    assert [f for f, n in parsed.items() if n > 1] == [], "a flag added twice"
    assert set(parsed) == set(fields), (f"flags without a field: {sorted(set(parsed) - set(fields))}; "
                                        f"fields without a flag: {sorted(set(fields) - set(parsed))}")


@pytest.mark.parametrize(("parser", "classes"), [
    (tuning.data.cli.build_parser, (st.DataSettings,)),
    (tuning.train.build_parser, (st.DataSettings,)),
    (tuning.register.build_parser, (st.DataSettings, st.RegistrySettings)),
], ids=["data", "train", "register"])
def test_the_shared_location_flags_come_from_the_same_fields(parser, classes) -> None:
    fields = _field_flags(*classes)
    actions = _actions(parser())
    for flag, field in fields.items():
        helps = {a.help for a in actions if flag in a.option_strings}
        assert helps, f"{flag} ({field}) missing"
        owner = next(f for cls in classes for f in st.flag_fields(cls) if st.flag_name(f) == flag)
        assert helps == {st.flag_help(owner)}, f"{flag}: help not generated from {field}"


def test_defaults_live_only_in_the_dataclasses() -> None:
    for action in _actions(tuning.run.build_parser()):
        if isinstance(action, argparse._StoreTrueAction):
            assert action.default is False
        else:
            assert action.default in (None, argparse.SUPPRESS), f"{action.option_strings} defaults to {action.default!r}"
    for cls in SETTINGS:
        for f in st.flag_fields(cls):  # a flag field has a default, or a rule for it, or is the study name
            has_default = f.default is not dataclasses.MISSING or f.metadata["derive"] is not None
            assert has_default or (cls, f.name) == (StudyConfig, "name"), f"{cls.__name__}.{f.name} has no default"


def test_help_quotes_the_dataclass_defaults() -> None:
    text = tuning.run.build_parser().format_help()
    for fragment in ("number of trials [8]", "stop the study after this long: 90s, 30m, 2h or none [22m]",
                     "CPUs per Train worker [1]", "[HEIMDALL_OPTUNA_STORAGE, sqlite:///{data-dir}/optuna.db]",
                     "| `--models-store` | `HEIMDALL_MODELS_STORE` |"):
        assert fragment in re.sub(r"\s+", " ", text) or fragment in text, fragment


def test_the_readme_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert st.settings_table() in readme, "README's settings table differs: paste tuning.settings.settings_table()"


# -- resolution order -----------------------------------------------------------------------------------


def _run_args(*argv: str) -> argparse.Namespace:
    return tuning.run.build_parser().parse_args(list(argv))


def test_flag_beats_environment_beats_default(tmp_path: Path) -> None:
    env = {"HEIMDALL_DATA_DIR": str(tmp_path / "env-data"), "HEIMDALL_CATALOG": "sqlite:///env.db",
           "HEIMDALL_OPTUNA_STORAGE": "postgresql://u@env:5432/o", "MLFLOW_TRACKING_URI": "http://env:5000"}
    flags = ["--data-dir", str(tmp_path / "flag-data"), "--catalog", "sqlite:///flag.db",
             "--optuna-storage", "postgresql://u@flag:5432/o", "--mlflow-uri", "http://flag:5000"]
    s, _ = st.run_settings(_run_args(*flags), saved_study=None, environ=env)
    assert (s.data.data_dir, s.data.catalog_url) == (tmp_path / "flag-data", "sqlite:///flag.db")
    assert (s.places.optuna_url, s.registry.mlflow_uri) == ("postgresql://u@flag:5432/o", "http://flag:5000")
    s, _ = st.run_settings(_run_args(), saved_study=None, environ=env)
    assert (s.data.data_dir, s.data.catalog_url) == (tmp_path / "env-data", "sqlite:///env.db")
    assert (s.places.optuna_url, s.registry.mlflow_uri) == ("postgresql://u@env:5432/o", "http://env:5000")
    s, _ = st.run_settings(_run_args(), saved_study=None, environ={})
    data = Path(".heimdall").resolve()
    assert (s.data.data_dir, s.data.catalog_url) == (data, f"sqlite:///{data / 'catalog.db'}")
    assert s.places.optuna_url == f"sqlite:///{data / 'optuna.db'}"
    assert s.registry.mlflow_uri == f"sqlite:///{data / 'mlflow.db'}"
    assert s.places.output_root == data / "studies" and s.places.ray_address is None
    assert s.registry.models_store == str(data / "models")
    s, _ = st.run_settings(_run_args(), saved_study=None, environ={"HEIMDALL_S3_ENDPOINT": "http://s3:8333"})
    assert s.registry.models_store == f"s3://{st.MODELS_BUCKET}"
    assert s.data.store_url == f"s3://{st.DATASETS_BUCKET}" == "s3://heimdall-datasets"


@pytest.mark.parametrize("given", [{"store": "s3://heimdall-raw-iq"}, {"store": "s3://heimdall-raw-iq/shards/v1"}, {}])
def test_shards_are_refused_in_upstreams_raw_iq_bucket(given: dict[str, str]) -> None:
    env = {"HEIMDALL_STORE": "s3://heimdall-raw-iq/x"} if not given else {}
    with pytest.raises(st.ConfigError, match="upstream Heimdall's bucket 'heimdall-raw-iq', whose daily lifecycle "
                                             "job deletes .*fix: --store / HEIMDALL_STORE s3://heimdall-datasets"):
        st.resolve(st.DataSettings, given, env)
    assert st.resolve(st.DataSettings, {"store": "s3://heimdall-raw-iq-copy"}, {}).store_url == "s3://heimdall-raw-iq-copy"


def test_study_flags_beat_the_smoke_test_which_beats_the_defaults() -> None:
    s, _ = st.run_settings(_run_args(), saved_study=None, environ={})
    assert (s.study.trials, s.study.time_budget_s, s.study.space) == (8, 22 * 60.0, "resnet")
    assert re.fullmatch(r"resnet-nll-\d{8}-\d{6}", s.study.name)
    s, _ = st.run_settings(_run_args("--smoke-test", "--trials", "3", "--time-budget", "2m"), saved_study=None, environ={})
    assert (s.study.trials, s.study.time_budget_s, s.study.dataset) == (3, 120.0, "smoke")
    s, _ = st.run_settings(_run_args("--time-budget", "none", "--name", "n"), saved_study=None, environ={})
    assert (s.study.time_budget_s, s.study.name) == (None, "n")


def test_a_resume_keeps_the_saved_study_and_names_the_flags_it_ignores() -> None:
    saved = StudyConfig(name="old", trials=5)
    s, ignored = st.run_settings(_run_args("--resume", "--trials", "9", "--seed", "0"),
                                 saved_study=lambda places, name: saved, environ={})
    assert s.study is saved and ignored == ["trials"]
