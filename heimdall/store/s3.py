"""A blob store on any S3-compatible server (SeaweedFS, MinIO, AWS), via the ``minio`` SDK.

Settings are passed in (or read from the environment by
:meth:`S3Settings.from_env` when asked, never at import). The SDK is imported
only when a store is built, so ``import heimdall.store`` stays light.

No secret is ever pickled: :class:`S3Settings` and :class:`S3Store` pickle as
where the server is, and the process that unpickles them (a Ray worker)
reads ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` from its own
environment; :meth:`S3Store.pyarrow_filesystem` carries no keys at all. So
what Ray ships to workers or Tune saves with a study holds no credentials.

Failures surface as Heimdall errors naming the endpoint and the fix:
unreachable server → :class:`~heimdall.errors.ServiceUnavailableError` (within
a few seconds: the HTTP client has short timeouts and few retries), refused
credentials → :class:`~heimdall.errors.ConfigError`, missing object →
:class:`~heimdall.errors.NotFoundError`.
"""
from __future__ import annotations

import io
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from heimdall.errors import (
    ConfigError,
    HeimdallError,
    NotFoundError,
    ServiceUnavailableError,
    collect_problems,
)
from heimdall.store.base import missing_object_error, validate_key, validate_prefix

if TYPE_CHECKING:
    import minio
    import pyarrow.fs

__all__ = ["S3Settings", "S3Store"]

# minio's own client waits 5 minutes per attempt and retries 5 times: an
# unreachable endpoint would hang a trial for half an hour. These fail in seconds.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 120.0
RETRIES = 2

ENDPOINT_VARS = ("HEIMDALL_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3")
_START_HINT = "start the local stack with `python -m tuning.services up` and `source .heimdall/services/env.sh`"
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, repr=False)
class S3Settings:
    """Where an S3-compatible server is and how to sign requests to it.

    Attributes:
        endpoint: ``http://host:port`` (or ``host:port``; the scheme must agree with ``secure``).
        access_key: the access key id.
        secret_key: the secret key; never shown by ``repr``.
        secure: use HTTPS.
        region: the signing region; SeaweedFS and MinIO accept the default.
    """

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = False
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        problems = _endpoint_problems(self.endpoint, self.secure)
        if not self.access_key:
            problems.append("access_key must not be empty; set AWS_ACCESS_KEY_ID")
        if not self.secret_key:
            problems.append("secret_key must not be empty; set AWS_SECRET_ACCESS_KEY")
        if not self.region:
            problems.append("region must not be empty; the default 'us-east-1' suits SeaweedFS and MinIO")
        collect_problems("S3Settings", problems)

    def __repr__(self) -> str:
        return (
            f"S3Settings(endpoint={self.endpoint!r}, access_key={_mask(self.access_key)!r}, "
            f"secret_key='<redacted>', secure={self.secure}, region={self.region!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Settings travel to Ray workers and into Tune's saved state: they keep where the server
        # is, and the process that unpickles them reads the keys from its own environment.
        return _settings_from_environment, (self.endpoint, self.secure, self.region)

    def __copy__(self) -> S3Settings:
        return self  # immutable; and a copy must not re-read the keys from the environment

    def __deepcopy__(self, memo: dict[int, Any]) -> S3Settings:
        return self

    @property
    def host(self) -> str:
        """``host:port`` without scheme, as the minio SDK and pyarrow want it."""
        return urlsplit(self.endpoint).netloc if "://" in self.endpoint else self.endpoint.rstrip("/")

    @property
    def url(self) -> str:
        """``scheme://host:port``, safe to log."""
        return f"{'https' if self.secure else 'http'}://{self.host}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the settings from the environment, at call time.

        ``HEIMDALL_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``
        and ``AWS_SECRET_ACCESS_KEY`` are required; ``AWS_REGION`` or
        ``AWS_DEFAULT_REGION`` is optional. ``https://`` endpoints set ``secure``.

        Args:
            environ: the variables to read; ``os.environ`` when omitted.

        Returns:
            The validated settings.

        Raises:
            ConfigError: listing every missing variable (and any invalid value).
        """
        env = os.environ if environ is None else environ
        endpoint = next((env[v] for v in ENDPOINT_VARS if env.get(v)), "")
        missing = [] if endpoint else [" or ".join(ENDPOINT_VARS)]
        missing += [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(v)]
        collect_problems(
            "S3 settings from the environment",
            [f"{var} is not set; export it, or {_START_HINT}" for var in missing],
        )
        return cls(
            endpoint=endpoint,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            secure=endpoint.startswith("https://"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


class S3Store:
    """A :class:`~heimdall.store.BlobStore` in one bucket (under an optional prefix).

    Building the store does no I/O. The bucket is created on the first write
    if it is missing (:meth:`ensure_bucket`); until then reads see an empty store.

    Args:
        settings: the server and credentials.
        bucket: the bucket name (3-63 lowercase letters, digits, '.', '-').
        prefix: a key prefix inside the bucket, e.g. ``"raw-iq/v1"``; '' for the whole bucket.

    Raises:
        ConfigError: the bucket name or prefix is invalid.
    """

    def __init__(self, settings: S3Settings, bucket: str, prefix: str = "") -> None:
        prefix = prefix.strip("/")
        problems = [] if _BUCKET_RE.fullmatch(bucket) and ".." not in bucket else [
            f"bucket name must be 3-63 characters of a-z, 0-9, '.', '-' starting and ending "
            f"with a letter or digit, got {bucket!r}; e.g. 'heimdall-datasets'"
        ]
        if prefix:
            try:
                validate_key(prefix, what="S3 prefix")
            except ConfigError as err:
                problems += err.problems
        collect_problems("S3Store", problems)
        self.settings = settings
        self.bucket = bucket
        self.prefix = prefix
        self._client = _make_client(settings)
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3Store({self.settings!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Not the SDK client, which holds the keys: the settings pickle without them (see S3Settings).
        return S3Store, (self.settings, self.bucket, self.prefix)

    def describe(self) -> str:
        """Return ``s3://bucket/prefix at http://host:port`` (no credentials)."""
        return f"s3://{self.bucket}/{self.prefix} at {self.settings.url}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet.

        Raises:
            ServiceUnavailableError: the server cannot be reached.
            ConfigError: the server refuses the credentials.
        """
        with self._translated("create bucket"):
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except Exception as err:  # another writer may have created it meanwhile
                    if getattr(err, "code", None) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_ready = True

    def root_exists(self) -> bool:
        """Whether the bucket exists (see :class:`BlobStore`); never creates it."""
        with self._translated("check bucket"):
            return bool(self._client.bucket_exists(self.bucket))

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` (see :class:`BlobStore`)."""
        name = self._name(key)
        self._ensure_bucket_once()
        with self._translated("write", key):
            self._client.put_object(self.bucket, name, io.BytesIO(data), len(data))

    def put_file(self, key: str, path: Path | str) -> None:
        """Upload the local file ``path`` under ``key`` (see :class:`BlobStore`)."""
        name = self._name(key)
        with open(path, "rb") as src:
            self._ensure_bucket_once()
            with self._translated("upload", key):
                self._client.put_object(self.bucket, name, src, os.fstat(src.fileno()).st_size)

    def get(self, key: str) -> bytes:
        """Read the object under ``key`` (see :class:`BlobStore`)."""
        name = self._name(key)
        with self._translated("read", key):
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        """Return whether ``key`` holds an object."""
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        """Return the size of the object under ``key`` in bytes."""
        name = self._name(key)
        with self._translated("stat", key):
            return int(self._client.stat_object(self.bucket, name).size)

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; a missing key or bucket is fine."""
        name = self._name(key)
        try:
            with self._translated("delete", key):
                self._client.remove_object(self.bucket, name)
        except NotFoundError:
            pass

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix``, without folder markers."""
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            with self._translated("list", prefix or "(all keys)"):
                names = [o.object_name for o in self._client.list_objects(self.bucket, prefix=full, recursive=True)]
        except NotFoundError:
            return []
        return sorted(n[cut:] for n in names if n and not n.endswith("/"))

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """Return a ``pyarrow.fs.S3FileSystem`` for this server and ``bucket[/prefix]``.

        The filesystem carries no keys: it signs with ``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY`` from the environment of whichever process uses
        it, this one or a Ray worker it is shipped to, so pickled into Tune's
        state (``tuner.pkl``) or a Ray task it holds no secret. The endpoint is
        passed explicitly because pyarrow ignores ``AWS_ENDPOINT_URL_S3``.

        Raises:
            ConfigError: this process's environment does not hold the store's keys.
        """
        import pyarrow.fs  # heavy; only callers that hand data to Ray/pyarrow pay for it

        env_keys = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
        if env_keys != (self.settings.access_key, self.settings.secret_key):
            raise ConfigError("S3 filesystem", [
                f"the keys of {self.describe()} (access key {_mask(self.settings.access_key)}) must also be "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in this process's environment: the pyarrow "
                f"filesystem handed to Ray carries no keys, every process that uses it reads them there; "
                f"fix: export both (local stack: source .heimdall/services/env.sh)"])
        fs = pyarrow.fs.S3FileSystem(
            region=self.settings.region,
            scheme="https" if self.settings.secure else "http",
            endpoint_override=self.settings.host,
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=READ_TIMEOUT_S,
        )
        return fs, f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket_once(self) -> None:
        if not self._bucket_ready:
            self.ensure_bucket()

    @contextmanager
    def _translated(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn SDK and transport exceptions into Heimdall errors naming endpoint and fix."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        try:
            yield
        except S3Error as err:
            raise self._s3_error(err, action, key) from None
        except (ServerError, urllib3.exceptions.HTTPError, ConnectionError) as err:
            raise ServiceUnavailableError(
                f"S3 server {self.settings.url} is unreachable or failing ({action} in {self.describe()}): "
                f"{_short_reason(err)}; {_START_HINT}, or set HEIMDALL_S3_ENDPOINT to a running server"
            ) from None
        except InvalidResponseError as err:
            raise ServiceUnavailableError(
                f"{self.settings.url} does not answer like an S3 server ({action}): HTTP {getattr(err, '_code', '?')}; "
                f"check HEIMDALL_S3_ENDPOINT points at the S3 port"
            ) from None

    def _s3_error(self, err: Exception, action: str, key: str | None) -> HeimdallError:
        code = getattr(err, "code", "") or ""
        if code in _MISSING_CODES and key is not None:
            return missing_object_error(key, self.describe())
        if code in _MISSING_CODES:
            return NotFoundError(
                f"bucket {self.bucket!r} does not exist at {self.settings.url}; write to the store first to create it"
            )
        if code in _AUTH_CODES:
            return ConfigError("S3 credentials", [
                f"the S3 server refused to {action} in {self.describe()} with access key "
                f"{_mask(self.settings.access_key)} ({code}); set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY to an identity the server knows (local stack: source .heimdall/services/env.sh)"
            ])
        message = getattr(err, "message", "") or str(code)
        return HeimdallError(f"S3 {action} in {self.describe()} failed: {code}: {message}")


def _endpoint_problems(endpoint: str, secure: bool) -> list[str]:
    if not endpoint:
        return ["endpoint must not be empty; e.g. 'http://127.0.0.1:8333' (HEIMDALL_S3_ENDPOINT)"]
    if "://" not in endpoint:
        endpoint = f"{'https' if secure else 'http'}://{endpoint}"
    parts = urlsplit(endpoint)
    problems = []
    if parts.scheme not in ("http", "https"):
        problems.append(f"endpoint scheme must be http or https, got {parts.scheme!r} in {endpoint!r}")
    elif (parts.scheme == "https") != secure:
        problems.append(f"endpoint {endpoint!r} disagrees with secure={secure}; make them match")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        problems.append(f"endpoint must be scheme://host[:port] with no path, query or user, got {endpoint!r}")
    return problems


def _settings_from_environment(endpoint: str, secure: bool, region: str) -> S3Settings:
    """Unpickle :class:`S3Settings`: the keys come from this process's environment."""
    where = f"process {os.getpid()} on {socket.gethostname()}"
    collect_problems("S3 settings unpickled here", [
        f"{var} is not set in the environment of {where}, which received an S3 store for {endpoint}: keys "
        f"are never pickled, each process reads them from its own environment; fix: set {var} there (Ray "
        f"nodes: cluster/.env or the Kubernetes Secret, see docs/cluster.md; local Ray: in the driver's shell)"
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(var)])
    return S3Settings(endpoint, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
                      secure=secure, region=region)


def _make_client(settings: S3Settings) -> minio.Minio:
    import certifi
    import minio
    import urllib3

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=RETRIES, connect=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return minio.Minio(
        settings.host,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


def _mask(access_key: str) -> str:
    return access_key[:4] + "…" if len(access_key) > 4 else "…"


def _short_reason(err: Exception) -> str:
    reason = getattr(err, "reason", None) or err
    # urllib3 prefixes the connection: "HTTPConnection(host='h', port=1): Failed to establish ..."
    return re.sub(r"^<?\w*Connection[^>)]*[>)]: ", "", str(reason))
