"""``python -m tuning.run --dry-run``: check what a study needs, create nothing, say what was not checked.

Every probe here only reads: a SQLite file that does not exist is not
opened (opening would create it), a bucket is asked whether it exists, never
made, and Optuna's and MLflow's databases are inspected, never migrated. A
probe answers with one :class:`Finding`: ``ok``, ``create`` (the run will
create it: a first study on a fresh machine), or ``unchecked`` (what a dry
run cannot know, e.g. a remote Ray cluster's resources). Problems from every
probe are raised together, before anything is printed as checked.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from heimdall.catalog import DatasetInfo
from heimdall.errors import HeimdallError, NotFoundError, collect_problems
from heimdall.store import BlobStore, open_store

__all__ = ["Finding", "Preflight"]


@dataclass(frozen=True)
class Finding:
    """What one probe found.

    Attributes:
        what: the thing probed, e.g. ``"optuna"``.
        state: ``"ok"``, ``"create"`` (absent; the run creates it) or ``"unchecked"``.
        detail: one line for the plan.
    """

    what: str
    state: str
    detail: str


class Preflight:
    """Collects findings and problems of the read-only probes of one dry run."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.problems: list[str] = []

    def probe(self, what: str, fn: Callable[[], tuple[str, str]]) -> None:
        """Run ``fn`` (returning ``(state, detail)``); a HeimdallError becomes a problem."""
        try:
            state, detail = fn()
        except HeimdallError as exc:
            self.problems.append(f"{what}: {exc}")
            return
        self.findings.append(Finding(what, state, detail))

    def raise_problems(self) -> None:
        """Raise every problem at once (ConfigError), or return."""
        collect_problems("dry run", self.problems)

    def summary(self) -> str:
        """The closing lines: what was checked, what the run will create, what was not checked."""
        by = {s: [f.what for f in self.findings if f.state == s] for s in ("ok", "create", "unchecked")}
        lines = [f"dry run: settings and search space valid; found and checked: {', '.join(by['ok']) or 'nothing yet'}; "
                 f"created nothing"]
        if by["create"]:
            lines.append(f"         the run will create: {', '.join(by['create'])}")
        if by["unchecked"]:
            lines.append(f"         not checked: {', '.join(by['unchecked'])}")
        return "\n".join(lines)


# -- probes: each returns (state, detail) or raises a HeimdallError ------------------------------------


def store_root(store: BlobStore) -> tuple[str, str]:
    """Whether the store's directory or bucket exists (read-only)."""
    if store.root_exists():
        return "ok", store.describe()
    return "create", f"{store.describe()} (absent: created by the first write)"


def dataset_shards(store: BlobStore, info: DatasetInfo | None, shards: list[Any], dataset: str) -> tuple[str, str]:
    """Every shard a complete dataset registers is in the store, with its registered size.

    Raises:
        NotFoundError: shards are missing or have another size, naming them and the fix.
    """
    if info is None:
        return "create", f"{dataset!r} absent: the run generates it"
    present = {}
    for key in {s.key.rsplit("/", 1)[0] + "/" for s in shards}:
        present.update({k: None for k in store.list(key)})
    missing = [s.key for s in shards if s.key not in present]
    wrong = [s.key for s in shards if s.key in present and store.size(s.key) != s.n_bytes] if not missing else []
    if missing or wrong:
        bad = missing or wrong
        raise NotFoundError(
            f"dataset {dataset!r} registers {len(shards)} shard(s) but {len(bad)} "
            f"{'are missing from' if missing else 'have another size in'} {store.describe()} "
            f"(first: {bad[0]}); fix: `python -m tuning.data verify {dataset}` to see all, then "
            f"`python -m tuning.data delete {dataset}` and let the study regenerate it, or restore the objects")
    state = "ok" if info.status == "complete" else "create"
    return state, f"{len(shards)} shard(s) present in {store.describe()}" + (
        "" if state == "ok" else f"; generation resumes ({info.n_recordings}/{info.planned_recordings})")


def optuna_storage(url: str, name: str, *, resume: bool) -> tuple[str, str]:
    """Reach the Optuna database without creating it or its tables; the study name is free (or present).

    Raises:
        ServiceUnavailableError: the database cannot be reached.
        AlreadyExistsError / NotFoundError: the name is taken (new study) / missing (resume).
    """
    import sqlalchemy

    from tuning.study.tune import check_optuna_url, describe_url

    check_optuna_url(url)
    shown = describe_url(url)
    if urlsplit(url).scheme == "sqlite":
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():
            return _study_absent(shown, name, resume, exists=False)
        url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    if url.startswith("postgresql://"):  # psycopg2 is the driver installed (SQLAlchemy's default is psycopg 3)
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    engine = sqlalchemy.create_engine(url, connect_args=_connect_args(url))
    try:
        with engine.connect() as db:
            if not sqlalchemy.inspect(db).has_table("studies"):
                return _study_absent(shown, name, resume, exists=False)
            found = db.execute(sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :n"), {"n": name}).first()
    except sqlalchemy.exc.SQLAlchemyError as err:
        from heimdall.errors import ServiceUnavailableError

        reason = str(err.orig if getattr(err, "orig", None) else err).strip().splitlines()[0]
        raise ServiceUnavailableError(f"cannot read the Optuna storage {shown}: {reason}; fix: start the database "
                                      f"or point --optuna-storage at a running one") from None
    finally:
        engine.dispose()
    return _study_absent(shown, name, resume, exists=found is not None)


def _connect_args(url: str) -> dict[str, Any]:
    from tuning.study.tune import PG_CONNECT_TIMEOUT_S

    return {"connect_timeout": PG_CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}


def _study_absent(shown: str, name: str, resume: bool, *, exists: bool) -> tuple[str, str]:
    from heimdall.errors import AlreadyExistsError

    if exists and not resume:
        raise AlreadyExistsError(f"a study named {name!r} already exists in {shown}; fix: add --resume to "
                                 f"continue it, or pick another --name")
    if resume and not exists:
        raise NotFoundError(f"no Optuna study {name!r} to resume in {shown}; fix: check --name and "
                            f"--optuna-storage, or start the study without --resume")
    return ("ok", f"{shown}: study {name!r} found") if exists else ("create", f"{shown}: a new study {name!r}")


def run_storage(url: str, name: str, *, resume: bool) -> tuple[str, str]:
    """The run storage's directory or bucket, and whether the study's Tune experiment is there.

    Raises:
        AlreadyExistsError / NotFoundError: the experiment exists (new study) / is missing (resume).
    """
    from ray import tune

    from heimdall.errors import AlreadyExistsError

    store = open_store(url)
    state, detail = store_root(store)
    fs, base = store.pyarrow_filesystem()
    local = url.startswith("s3://") is False
    exists = state == "ok" and tune.Tuner.can_restore(f"{base}/{name}", storage_filesystem=None if local else fs)
    if exists and not resume:
        raise AlreadyExistsError(f"a Tune experiment {name!r} already exists in {url}; fix: add --resume to "
                                 f"continue it, or pick another --name")
    if resume and not exists:
        raise NotFoundError(f"no Tune experiment {name!r} to resume in {url}; fix: check --name and "
                            f"--storage-path, or start the study without --resume")
    return state, detail


def mlflow_tracking(uri: str) -> tuple[str, str]:
    """An MLflow server answers ``/health``; a SQLite file exists or will be created; other URIs unchecked."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        from tuning.release.registry import Registry

        registry = Registry(uri)  # probes /health, writes nothing
        return "ok", registry.describe()
    if parts.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        return ("ok", uri) if path.is_file() else ("create", f"{uri} (absent: created by the first registration)")
    return "unchecked", f"{parts.scheme}:// tracking database (reached at the end of the study)"
