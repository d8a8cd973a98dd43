"""A blob store in a local directory: the embedded default, no server needed.

Each key is a file under the root (``root/datasets/x/shard-0.npz``). Writes go
to a temporary file in ``root/.partial/`` and are moved into place with
``os.replace``, so a reader sees either the old object or the new one, and an
interrupted write never leaves a truncated object behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from heimdall.errors import AlreadyExistsError, ConfigError
from heimdall.store.base import missing_object_error, validate_key, validate_prefix

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["LocalStore"]

# Temporary files live here; keys may not start with this segment.
_PARTIAL_DIR = ".partial"
_OBJECT_MODE = 0o644


class LocalStore:
    """A :class:`~heimdall.store.BlobStore` backed by a local directory.

    Args:
        root: the directory holding the objects; created on the first write.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def describe(self) -> str:
        """Return ``file://<root>``, which :func:`heimdall.store.open_store` accepts back."""
        return f"file://{self.root.as_posix()}"

    def root_exists(self) -> bool:
        """Whether the root directory exists (see :class:`BlobStore`)."""
        return self.root.is_dir()

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically (see :class:`BlobStore`)."""
        self._write_atomically(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path | str) -> None:
        """Copy the local file ``path`` under ``key`` atomically (see :class:`BlobStore`)."""
        with open(path, "rb") as src:
            self._write_atomically(key, lambda out: shutil.copyfileobj(src, out, 1 << 20))

    def get(self, key: str) -> bytes:
        """Read the object under ``key`` (see :class:`BlobStore`)."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise missing_object_error(key, self.describe()) from None

    def exists(self, key: str) -> bool:
        """Return whether ``key`` holds an object."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Return the size of the object under ``key`` in bytes."""
        path = self._path(key)
        if not path.is_file():
            raise missing_object_error(key, self.describe())
        return path.stat().st_size

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; a missing key is fine."""
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix``."""
        validate_prefix(prefix)
        start = self.root / prefix.rpartition("/")[0]
        if not start.is_dir():
            return []
        return sorted(key for key in self._walk(start) if key.startswith(prefix))

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """Return ``(LocalFileSystem(), root)``; ``root + "/" + key`` is the object's path."""
        import pyarrow.fs  # heavy; only callers that hand data to Ray/pyarrow pay for it

        return pyarrow.fs.LocalFileSystem(), self.root.as_posix()

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == _PARTIAL_DIR:
            raise ConfigError("blob key", [
                f"keys under {_PARTIAL_DIR!r}/ are reserved for unfinished writes, got {key!r}; "
                f"pick another first segment"
            ])
        return self.root / key

    def _walk(self, start: Path) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != _PARTIAL_DIR]
            for name in filenames:
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def _write_atomically(self, key: str, write: Callable[[IO[bytes]], object]) -> None:
        target = self._path(key)
        partial_dir = self.root / _PARTIAL_DIR
        partial_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=partial_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                # Without fsync a crash right after os.replace can leave an empty file.
                os.fsync(out.fileno())
                os.fchmod(out.fileno(), _OBJECT_MODE)
            self._move_into_place(Path(tmp_name), target, key)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _move_into_place(self, tmp: Path, target: Path, key: str) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            raise AlreadyExistsError(
                f"key {key!r} clashes with an existing key in {self.describe()} ({err.strerror}): "
                f"a local store cannot hold both 'a' and 'a/b'; choose keys where no key is a folder of another"
            ) from None
