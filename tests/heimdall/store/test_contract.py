"""One contract for every BlobStore: a local directory and a real S3 server (SeaweedFS)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from heimdall.errors import ConfigError, NotFoundError, ServiceUnavailableError
from heimdall.store import BlobStore, LocalStore, S3Settings, open_store
from heimdall.store.s3 import S3Store
from tuning.ops.services import free_ports

MEGABYTE_OF_EVERY_BYTE = bytes(range(256)) * 4096


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest) -> BlobStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_is_a_blob_store(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)


def test_round_trip_of_binary_megabyte(store: BlobStore) -> None:
    store.put("shards/a.bin", MEGABYTE_OF_EVERY_BYTE)
    assert store.get("shards/a.bin") == MEGABYTE_OF_EVERY_BYTE
    assert store.size("shards/a.bin") == len(MEGABYTE_OF_EVERY_BYTE)


def test_empty_object(store: BlobStore) -> None:
    store.put("empty", b"")
    assert store.exists("empty") and store.get("empty") == b"" and store.size("empty") == 0


def test_put_file_round_trip(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"\x00onnx" * 1000)
    store.put_file("models/m.onnx", source)
    assert store.get("models/m.onnx") == source.read_bytes()


def test_put_file_of_missing_path_raises_file_not_found(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file("models/none.onnx", tmp_path / "none.onnx")
    assert not store.exists("models/none.onnx")


def test_overwrite_replaces_whole_object(store: BlobStore) -> None:
    store.put("k", b"long old contents")
    store.put("k", b"new")
    assert store.get("k") == b"new"
    assert store.size("k") == 3


def test_exists_size_delete(store: BlobStore) -> None:
    assert not store.exists("a/b.npz")
    store.put("a/b.npz", b"12345")
    assert store.exists("a/b.npz")
    assert store.size("a/b.npz") == 5
    store.delete("a/b.npz")
    assert not store.exists("a/b.npz")
    store.delete("a/b.npz")  # deleting a missing key is fine


def test_list_is_sorted_filtered_by_prefix_and_has_no_folders(store: BlobStore) -> None:
    for key in ["ds/train/s-2", "ds/train/s-10", "ds/train/s-1", "ds/val/s-1", "dsx", "other/z"]:
        store.put(key, b"x")
    assert store.list("ds/train/") == ["ds/train/s-1", "ds/train/s-10", "ds/train/s-2"]
    assert store.list("ds") == ["ds/train/s-1", "ds/train/s-10", "ds/train/s-2", "ds/val/s-1", "dsx"]
    assert store.list("ds/tr") == ["ds/train/s-1", "ds/train/s-10", "ds/train/s-2"]
    assert store.list() == sorted(store.list())
    assert len(store.list()) == 6 and not any(k.endswith("/") for k in store.list())
    assert store.list("nothing/") == []


def test_missing_key_raises_not_found_naming_key_and_store(store: BlobStore) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get("no/such/key.npz")
    assert "no/such/key.npz" in str(info.value)
    assert store.describe() in str(info.value)
    with pytest.raises(NotFoundError, match="no/such/key.npz"):
        store.size("no/such/key.npz")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a", "dir/", "a\\b"])
def test_bad_keys_are_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ConfigError, match="key"):
        store.put(key, b"x")
    with pytest.raises(ConfigError):
        store.get(key)


def test_bad_list_prefix_is_rejected(store: BlobStore) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        store.list("../")


def test_pyarrow_filesystem_reads_a_written_object(store: BlobStore) -> None:
    store.put("arrow/obj.bin", MEGABYTE_OF_EVERY_BYTE[:1000])
    fs, base = store.pyarrow_filesystem()
    with fs.open_input_file(f"{base}/arrow/obj.bin") as f:
        assert f.read() == MEGABYTE_OF_EVERY_BYTE[:1000]


def test_describe_names_the_location_without_secrets(store: BlobStore) -> None:
    text = store.describe()
    if isinstance(store, S3Store):
        assert text.startswith(f"s3://{store.bucket}/{store.prefix} at http://127.0.0.1:")
        assert store.settings.secret_key not in text and store.settings.secret_key not in repr(store)
    else:
        assert text == f"file://{store.root}"


# --------------------------------------------------------------------------- backend specific


def test_local_store_leaves_no_partial_object_when_a_write_fails(local_store: LocalStore) -> None:
    local_store.put("k", b"old")

    class Broken:
        def __bytes__(self) -> bytes:
            raise RuntimeError("interrupted")

    with pytest.raises(TypeError):
        local_store.put("k", Broken())  # type: ignore[arg-type]
    assert local_store.get("k") == b"old"
    assert local_store.list() == ["k"]
    assert os.listdir(local_store.root / ".partial") == []


def test_local_store_rejects_a_key_that_is_also_a_folder(local_store: LocalStore) -> None:
    local_store.put("a/b", b"x")
    with pytest.raises(Exception, match="clashes"):
        local_store.put("a", b"y")


@pytest.mark.s3
def test_s3_wrong_secret_is_refused_with_a_clear_error(s3_settings: S3Settings) -> None:
    wrong = S3Settings(s3_settings.endpoint, s3_settings.access_key, "not-the-secret-" + "x" * 25)
    store = S3Store(wrong, "heimdall-test", "wrong-secret")
    with pytest.raises(ConfigError, match="refused") as info:
        store.put("k", b"x")
    message = str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert wrong.secret_key not in message and s3_settings.secret_key not in message
    with pytest.raises(ConfigError, match="refused"):
        store.get("k")


@pytest.mark.s3
def test_s3_unknown_access_key_is_refused(s3_settings: S3Settings) -> None:
    wrong = S3Settings(s3_settings.endpoint, "NOSUCHKEY123", s3_settings.secret_key)
    with pytest.raises(ConfigError, match="refused"):
        S3Store(wrong, "heimdall-test").list()


@pytest.mark.s3
def test_s3_unreachable_endpoint_fails_fast_with_the_fix() -> None:
    (closed_port,) = free_ports(1)
    store = S3Store(S3Settings(f"http://127.0.0.1:{closed_port}", "key", "secret"), "heimdall-test")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as info:
        store.get("k")
    assert time.monotonic() - started < 5.0
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert "tuning.services up" in str(info.value)


@pytest.mark.s3
def test_s3_store_reads_as_empty_before_its_bucket_exists(s3_settings: S3Settings) -> None:
    store = S3Store(s3_settings, "heimdall-never-written")
    assert store.list() == [] and not store.exists("k")
    with pytest.raises(NotFoundError, match="'k'"):
        store.get("k")


@pytest.mark.s3
def test_s3_prefixes_isolate_stores_in_one_bucket(s3_store: S3Store) -> None:
    sibling = S3Store(s3_store.settings, s3_store.bucket, s3_store.prefix + "-sibling")
    s3_store.put("k", b"mine")
    assert sibling.list() == [] and not sibling.exists("k")


# --------------------------------------------------------------------------- settings and open_store


def test_s3_settings_repr_redacts_the_secret() -> None:
    settings = S3Settings("http://127.0.0.1:9000", "AKIAEXAMPLE", "very-secret-value")
    assert "very-secret-value" not in repr(settings) and "very-secret-value" not in str(settings)
    assert "AKIAEXAMPLE" not in repr(settings)
    assert settings.host == "127.0.0.1:9000" and settings.url == "http://127.0.0.1:9000"


def test_s3_settings_from_env_lists_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as info:
        S3Settings.from_env({})
    assert len(info.value.problems) == 3
    for var in ("HEIMDALL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert var in str(info.value)


def test_s3_settings_from_env_reads_endpoint_and_keys() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "https://s3.example.org", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}
    settings = S3Settings.from_env(env)
    assert settings.secure and settings.host == "s3.example.org" and settings.region == "us-east-1"


def test_s3_settings_report_all_problems_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        S3Settings("ftp://host/path", "", "", region="")
    assert len(info.value.problems) == 5


def test_s3_store_rejects_bad_bucket_and_prefix() -> None:
    settings = S3Settings("http://127.0.0.1:9000", "a", "s")
    with pytest.raises(ConfigError) as info:
        S3Store(settings, "No_Such", prefix="a/../b")
    assert len(info.value.problems) == 2


def test_open_store_accepts_paths_file_and_s3_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(f"file://{tmp_path}/x")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "x"
    s3 = open_store("s3://heimdall-raw-iq/v1/train", S3Settings("http://127.0.0.1:9000", "a", "s"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("heimdall-raw-iq", "v1/train")


@pytest.mark.parametrize("url", ["", "http://host/x", "file://relative/x", "gs://bucket"])
def test_open_store_rejects_other_forms_naming_the_accepted_ones(url: str) -> None:
    with pytest.raises(ConfigError, match="s3://bucket"):
        open_store(url)


def test_open_store_s3_without_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HEIMDALL_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        open_store("s3://bucket-x")


def test_root_exists_only_reads(store: BlobStore, s3_settings_or_none: S3Settings | None, tmp_path: Path) -> None:
    """A store whose directory or bucket is absent says so and stays absent; a write creates it."""
    if isinstance(store, S3Store):
        assert s3_settings_or_none is not None
        absent: BlobStore = S3Store(s3_settings_or_none, f"heimdall-absent-{os.getpid()}-{time.time_ns() % 10**6}")
    else:
        absent = LocalStore(tmp_path / "absent")
    assert absent.root_exists() is False
    assert absent.list() == [] and not absent.exists("k")
    assert absent.root_exists() is False, "a read created the bucket or directory"
    absent.put("k", b"1")
    assert absent.root_exists() is True
    absent.delete("k")


@pytest.fixture
def s3_settings_or_none(request: pytest.FixtureRequest) -> S3Settings | None:
    return request.getfixturevalue("s3_settings") if "s3" in request.node.callspec.id else None
