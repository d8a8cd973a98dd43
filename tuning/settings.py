"""Every setting of every command, declared once: flag, then environment, then default.

A setting is a frozen-dataclass field whose ``metadata`` (:func:`setting`) holds
its flag help and environment variable; its default is the field's (or, inside
the data directory, a function of it). Parsers are generated from the fields
(:func:`add_args`: argparse defaults are None, so a given flag is told from a
default) and :func:`resolve` builds the dataclass once. This is the only module
that reads ``os.environ`` for settings (S3 keys are read by the store, at use).
:func:`settings_table` writes the table that ``--help`` and the README show.

A study's tree (:class:`RunSettings`, :func:`run_settings`): the data
(:class:`DataSettings`), the study's services and files (:class:`StudyLocations`),
the registry (:class:`RegistrySettings`) and :class:`tuning.study.tune.StudyConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from heimdall.catalog import Catalog, open_catalog
from heimdall.errors import ConfigError
from heimdall.store import BlobStore, open_store
from heimdall.store.s3 import ENDPOINT_VARS
from heimdall.upstream.ingest import HeimdallImportConfig

if TYPE_CHECKING:
    from tuning.release.registry import Registry
    from tuning.study.tune import StudyConfig

__all__ = [
    "DataSettings",
    "RegistrySettings",
    "RunSettings",
    "StudyLocations",
    "add_args",
    "add_data_args",
    "add_registry_args",
    "data_settings",
    "flag_fields",
    "flag_help",
    "flag_name",
    "given_values",
    "location_flags",
    "parse_duration",
    "positive_float",
    "positive_int",
    "registry_settings",
    "resolve",
    "resolve_data_dir",
    "run_settings",
    "setting",
    "settings_table",
]

DEFAULT_DATA_DIR = ".heimdall"
#: The models bucket when an S3 endpoint is configured (``python -m tuning.services up`` creates it).
MODELS_BUCKET = "heimdall-models"
#: The shard bucket when an S3 endpoint is configured (the S3 store creates it on its first write).
DATASETS_BUCKET = "heimdall-datasets"
#: Upstream Heimdall's raw-IQ bucket: read by ``tuning.data import --from-heimdall``, never written,
#: because upstream's daily lifecycle job deletes the objects there that its database does not reference.
RAW_IQ_BUCKET = HeimdallImportConfig.raw_iq_bucket


def setting(help: str, *, flag: str | None = None, env: str | None = None, type: Callable[[str], Any] | None = None,
            choices: Iterable[str] | None = None, shown: str | Callable[[Any], str] | None = None,
            derive: Callable[[Path, Mapping[str, str]], Any] | None = None, action: str | None = None,
            nullable: bool = False) -> dict[str, Any]:
    """The ``metadata`` of a settings field that is a command-line flag.

    Args:
        help: the flag's help; ``{default}`` in it is replaced by the shown default (else
            ``[ENV, default]`` or nothing is appended, see :func:`flag_help`).
        flag: the flag (``--`` + the field name with dashes when omitted).
        env: the environment variable read when the flag is absent.
        type: argparse's converter (also applied to the variable's value).
        choices: argparse's choices.
        shown: how the default reads in help and in :func:`settings_table`: a text, or a
            function of the default value (``str`` of the default when omitted).
        derive: for a default inside the data directory: ``(data_dir, environ) -> value``.
        action: argparse's action (``store_true`` for a switch).
        nullable: the flag can give None (``--time-budget none``): absent, it is left out of the
            parsed arguments (``argparse.SUPPRESS``) instead of being None.
    """
    return {"help": help, "flag": flag, "env": env, "type": type, "choices": None if choices is None else tuple(choices),
            "shown": shown, "derive": derive, "action": action, "nullable": nullable}


def flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` that are flags (those declared with :func:`setting`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field[Any]) -> str:
    """``--catalog`` for the field ``catalog_url`` declared with ``flag="--catalog"``."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def dest(f: dataclasses.Field[Any]) -> str:
    """The attribute of the parsed arguments that holds the field's flag."""
    return flag_name(f)[2:].replace("-", "_")


def shown_default(f: dataclasses.Field[Any]) -> str:
    """The field's default as help and :func:`settings_table` write it."""
    shown = f.metadata["shown"]
    if isinstance(shown, str):
        return shown
    default = None if f.default is dataclasses.MISSING else f.default
    return shown(default) if shown else str(default)


def flag_help(f: dataclasses.Field[Any]) -> str:
    """The help of the field's flag: its text with the default (and variable) filled in."""
    text, env = f.metadata["help"], f.metadata["env"]
    if "{default}" in text:
        return text.replace("{default}", shown_default(f))
    if env:
        return f"{text} [{env}, {shown_default(f)}]"
    return text


def add_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add a flag for every :func:`setting` field of ``cls``. A flag that is not given parses as
    None (False for a switch, absent when None is a value), so :func:`resolve` can tell it from the
    default, which only the dataclass holds."""
    for f in flag_fields(cls):
        m = f.metadata
        if m["action"]:
            parser.add_argument(flag_name(f), dest=dest(f), action=m["action"], help=flag_help(f))
        else:
            parser.add_argument(flag_name(f), dest=dest(f), type=m["type"], choices=m["choices"],
                                default=argparse.SUPPRESS if m["nullable"] else None, help=flag_help(f))


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given in ``args``, by field name."""
    given = vars(args)
    return {f.name: given[dest(f)] for f in flag_fields(cls)
            if dest(f) in given and (given[dest(f)] is not None or f.metadata["nullable"])}


def resolve(cls: type, args: argparse.Namespace | Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None, within: Path | None = None, **values: Any) -> Any:
    """Build ``cls`` from its flags (``args``), then their variables (``environ``, read now), then
    the defaults; ``values`` fill the fields that are no flags. Path settings are made absolute;
    the data directory ``within`` (or the class's own ``data_dir`` setting, resolved first) holds
    the derived defaults.

    Raises:
        the dataclass's own errors (e.g. ``ConfigError`` of an invalid value).
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = dict(values)
    for f in flag_fields(cls):
        m = f.metadata
        value = given.get(dest(f))
        if value is None and m["nullable"] and dest(f) in given:
            kwargs[f.name] = None  # given as "none"
            continue
        if value is None and m["env"] and env.get(m["env"]):
            value = m["type"](env[m["env"]]) if m["type"] else env[m["env"]]
        if value is None and m["derive"]:
            value = m["derive"](within, env)
        if value is None:
            continue  # the dataclass's default
        kwargs[f.name] = value.resolve() if isinstance(value, Path) else value
        if f.name == "data_dir":  # the data directory holds the other locations' defaults
            within = kwargs[f.name]
    return cls(**kwargs)


def parse_duration(text: str) -> float | None:
    """``"90"``/``"90s"`` seconds, ``"30m"`` minutes, ``"2h"`` hours; ``"none"`` for no limit.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse turns it into a usage error).
    """
    if text.strip().lower() in ("none", "off"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0 like 90s, 30m or 2h, or 'none' for no limit, "
                                         f"got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# -- the settings ---------------------------------------------------------------------------------


def _data_store(data_dir: Path, env: Mapping[str, str]) -> str:
    """The shard bucket when an S3 endpoint is configured, else a folder of the data directory."""
    return f"s3://{DATASETS_BUCKET}" if any(env.get(v) for v in ENDPOINT_VARS) else str(data_dir / "store")


@dataclass(frozen=True)
class DataSettings:
    """Where the catalogue and the blob store live (URLs carry no secrets)."""

    data_dir: Path = field(metadata=setting(
        "local data directory", env="HEIMDALL_DATA_DIR", type=Path, shown=f"./{DEFAULT_DATA_DIR}",
        derive=lambda _, __: Path(DEFAULT_DATA_DIR)))
    catalog_url: str = field(metadata=setting(
        "catalogue URL: sqlite:///path.db or postgresql://...", flag="--catalog", env="HEIMDALL_CATALOG",
        shown="sqlite:///{data-dir}/catalog.db", derive=lambda d, _: f"sqlite:///{d / 'catalog.db'}"))
    store_url: str = field(metadata=setting(
        "blob store: a directory or s3://bucket[/prefix]", flag="--store", env="HEIMDALL_STORE",
        shown=f"s3://{DATASETS_BUCKET} when an S3 endpoint is set; {{data-dir}}/store", derive=_data_store))

    def __post_init__(self) -> None:
        parts = urlsplit(self.store_url)
        if parts.scheme == "s3" and parts.netloc == RAW_IQ_BUCKET:
            raise ConfigError("data settings", [
                f"the store {self.store_url!r} is in upstream Heimdall's bucket {RAW_IQ_BUCKET!r}, whose daily "
                f"lifecycle job deletes every object its database does not reference, shards included; "
                f"fix: --store / HEIMDALL_STORE s3://{DATASETS_BUCKET} (the default when an S3 endpoint is set)"
            ])

    def open_catalog(self, *, read_only: bool = False) -> Catalog:
        """Connect to the catalogue.

        Args:
            read_only: for commands that only read (list, describe, verify, a dry run):
                nothing is created, neither a file nor a schema nor tables; a missing
                catalogue is a :class:`~heimdall.catalog.CatalogMissingError` (a ``NotFoundError``)
                naming how to create one.

        Raises:
            ServiceUnavailableError: the catalogue cannot be reached.
            CatalogMissingError: ``read_only`` and there is no SQLite file at the URL (an absent
                PostgreSQL schema is raised by the first read or ``check()``).
        """
        return open_catalog(self.catalog_url, read_only=read_only)

    def open_store(self) -> BlobStore:
        """Open the blob store (S3 keys come from the environment)."""
        return open_store(self.store_url)


def _models_store(data_dir: Path, env: Mapping[str, str]) -> str:
    """The bucket when an S3 endpoint is configured, else a folder of the data directory."""
    return f"s3://{MODELS_BUCKET}" if any(env.get(v) for v in ENDPOINT_VARS) else str(data_dir / "models")


@dataclass(frozen=True)
class RegistrySettings:
    """Where releases and the registry live (URLs carry no secrets).

    Attributes:
        data_dir: the local data directory (SQLite MLflow and local models store default there).
        mlflow_uri: the MLflow tracking (and registry) URI.
        models_store: the models store URL (:func:`heimdall.store.open_store`).
    """

    data_dir: Path
    mlflow_uri: str = field(metadata=setting(
        "MLflow tracking URI of the registry", env="MLFLOW_TRACKING_URI", shown="sqlite:///{data-dir}/mlflow.db",
        derive=lambda d, _: f"sqlite:///{d / 'mlflow.db'}"))
    models_store: str = field(metadata=setting(
        "where releases are published: a directory or s3://heimdall-models", env="HEIMDALL_MODELS_STORE",
        shown=f"s3://{MODELS_BUCKET} when an S3 endpoint is set; {{data-dir}}/models", derive=_models_store))

    @classmethod
    def resolve(cls, data_dir: Path, mlflow_uri: str | None = None, models_store: str | None = None,
                environ: Mapping[str, str] | None = None) -> RegistrySettings:
        """Flags first, then the environment (read now), then the defaults in ``data_dir``."""
        data_dir = Path(data_dir).resolve()
        return resolve(cls, {"mlflow_uri": mlflow_uri, "models_store": models_store}, environ, within=data_dir,
                       data_dir=data_dir)

    def registry(self) -> Registry:
        """Connect to MLflow (raises ServiceUnavailableError within seconds when down)."""
        from tuning.release.registry import Registry

        return Registry(self.mlflow_uri, artifact_root=self.data_dir.resolve() / "mlruns")

    def check(self) -> Registry:
        """Reach the models store and MLflow now; returns the connected registry.

        Raises:
            ServiceUnavailableError: either is down.
        """
        open_store(self.models_store).list("localization-v")
        return self.registry()


@dataclass(frozen=True)
class StudyLocations:
    """Where a study's bookkeeping and files live, and the Ray it runs on (URLs carry no secrets)."""

    optuna_url: str = field(metadata=setting(
        "Optuna study database: postgresql://... or sqlite:///...", flag="--optuna-storage",
        env="HEIMDALL_OPTUNA_STORAGE", shown="sqlite:///{data-dir}/optuna.db",
        derive=lambda d, _: f"sqlite:///{d / 'optuna.db'}"))
    storage_url: str = field(metadata=setting(
        "Tune state and checkpoints: a directory or s3://bucket/prefix", flag="--storage-path",
        env="HEIMDALL_STORAGE_PATH", shown="{data-dir}/runs", derive=lambda d, _: str(d / "runs")))
    output_root: Path = field(metadata=setting(
        "summary and plots go to OUTPUT_DIR/NAME", flag="--output-dir", env="HEIMDALL_OUTPUT_DIR", type=Path,
        shown="{data-dir}/studies", derive=lambda d, _: d / "studies"))
    ray_address: str | None = field(default=None, metadata=setting(
        "join this Ray cluster instead of starting one", env="RAY_ADDRESS", shown="a new local Ray"))


@dataclass(frozen=True)
class RunSettings:
    """Everything ``python -m tuning.run`` needs to know, resolved once (:func:`run_settings`)."""

    data: DataSettings
    places: StudyLocations
    registry: RegistrySettings
    study: StudyConfig


#: The classes whose settings are connections (a resume command repeats their flags), in table order.
LOCATIONS: tuple[type, ...] = (DataSettings, StudyLocations, RegistrySettings)


def location_flags(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The connection flags given in ``args``, as (flag, value)."""
    return [(flag_name(f), getattr(args, dest(f))) for cls in LOCATIONS for f in flag_fields(cls)
            if getattr(args, dest(f), None) is not None]


def settings_table(classes: Iterable[type] = (DataSettings, StudyLocations, RegistrySettings)) -> str:
    """The flag / environment variable / default table of ``classes`` (Markdown), plus the S3 variables."""
    rows = [("flag", "environment", "default"), ("---", "---", "---")]
    for cls in classes:
        for f in flag_fields(cls):
            rows.append((f"`{flag_name(f)}`", f"`{f.metadata['env']}`" if f.metadata["env"] else "—",
                         shown_default(f)))
    rows.append(("—", ", ".join(f"`{v}`" for v in ("HEIMDALL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY")),
                 "needed for an `s3://` location; keys are read from the environment only, never printed"))
    return "\n".join(f"| {' | '.join(r)} |" for r in rows)


# -- per command ----------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, ``--catalog`` and ``--store`` to ``parser``."""
    add_args(parser.add_argument_group("data location (flags override environment variables)"), DataSettings)


def add_registry_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--mlflow-uri`` and ``--models-store``."""
    add_args(parser.add_argument_group("registry (flags override environment variables)"), RegistrySettings)


def resolve_data_dir(flag: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The local data directory: ``flag``, else ``HEIMDALL_DATA_DIR``, else ``./.heimdall`` (absolute)."""
    return resolve(DataSettings, {"data_dir": Path(flag) if flag else None}, environ).data_dir


def data_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DataSettings:
    """The data locations of ``args`` (flags, then environment, then defaults)."""
    return resolve(DataSettings, args, environ)


def registry_settings(args: argparse.Namespace, data_dir: Path,
                      environ: Mapping[str, str] | None = None) -> RegistrySettings:
    """The registry locations of ``args`` (flags, then environment, then defaults in ``data_dir``)."""
    return RegistrySettings.resolve(data_dir, getattr(args, "mlflow_uri", None), getattr(args, "models_store", None),
                                    environ)


def run_settings(args: argparse.Namespace, saved_study: Callable[[StudyLocations, str | None], StudyConfig],
                 environ: Mapping[str, str] | None = None) -> tuple[RunSettings, list[str]]:
    """The settings of ``python -m tuning.run``, resolved once: flags, then environment, then defaults.

    The study comes from its flags over :class:`~tuning.study.tune.StudyConfig`'s defaults
    (``--smoke-test``'s in between), or for ``--resume`` from ``saved_study(places, --name)``:
    flags cannot change a saved study.

    Returns:
        The settings, and the study flags a resume ignores.

    Raises:
        ConfigError: invalid settings (every problem listed).
        NotFoundError: ``--resume`` without a study to resume.
    """
    from tuning.study.tune import SMOKE_TEST, StudyConfig

    data = data_settings(args, environ)
    places = resolve(StudyLocations, args, environ, within=data.data_dir)
    registry = registry_settings(args, data.data_dir, environ)
    given = given_values(StudyConfig, args)
    ignored: list[str] = []
    if args.resume:
        study = saved_study(places, given.get("name"))
        ignored = sorted(k for k, v in given.items() if k != "name" and getattr(study, k) != v)
    else:
        values = {**(SMOKE_TEST if args.smoke_test else {}), **given}
        if "name" not in values:
            space = Path(str(values.get("space", _default(StudyConfig, "space")))).stem
            objective = str(values.get("objective", _default(StudyConfig, "objective"))).replace(",", "-")
            values["name"] = f"{space}-{objective}-{'smoke-' if args.smoke_test else ''}{datetime.now():%Y%m%d-%H%M%S}"
        study = StudyConfig(**values)
    return RunSettings(data=data, places=places, registry=registry, study=study), ignored


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
