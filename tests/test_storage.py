"""The storage contract, run against every blob backend."""

from __future__ import annotations

import io
import itertools
import os
import secrets
import threading

import boto3
import pytest
from moto import mock_aws

from image_api.errors import BackendUnavailable, NotFound
from image_api.records import new_key
from image_api.storage.filesystem import FilesystemStorage
from image_api.storage.s3 import S3Storage
from tests.helpers import FAKE_AWS, shared_directory, unprivileged


def s3_client(endpoint_url=None):
    return boto3.session.Session().client(
        "s3",
        region_name=FAKE_AWS["AWS_REGION"],
        endpoint_url=endpoint_url,
        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(params=["filesystem", "s3-mock", "s3-server", "s3-real"])
def storage(request, tmp_path):
    bucket = f"test-{secrets.token_hex(6)}"
    if request.param == "filesystem":
        store = FilesystemStorage(tmp_path / "blobs")
    elif request.param == "s3-mock":
        with mock_aws():
            store = S3Storage(s3_client(), bucket)
            store.create()
            store.create()  # idempotent
            yield store
        return
    elif request.param == "s3-server":
        store = S3Storage(s3_client(request.getfixturevalue("moto_server")), bucket)
    else:
        endpoint = os.environ.get("TEST_S3_ENDPOINT_URL")
        if not endpoint:
            pytest.skip("TEST_S3_ENDPOINT_URL is not set")
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=os.environ.get("TEST_S3_REGION", "us-east-1"),
            aws_access_key_id=os.environ.get("TEST_S3_ACCESS_KEY_ID"),
            aws_secret_access_key=os.environ.get("TEST_S3_SECRET_ACCESS_KEY"),
        )
        store = S3Storage(client, bucket)
    store.create()
    store.create()  # idempotent
    yield store
    for blob in store.list():
        store.delete(blob.key)


def test_put_then_open_returns_the_same_bytes(storage):
    key, data = new_key(), secrets.token_bytes(100_000)
    storage.put(key, io.BytesIO(data), "image/png")
    with storage.open(key) as stream:
        assert stream.read() == data


def test_large_blob_round_trips_through_multipart(storage):
    # Above the 8 MiB multipart threshold of the S3 backend.
    key, data = new_key(), secrets.token_bytes(9 * 1024 * 1024 + 17)
    storage.put(key, io.BytesIO(data), "image/jpeg")
    with storage.open(key) as stream:
        assert stream.read() == data
    assert [(b.key, b.size) for b in storage.list()] == [(key, len(data))]


def test_open_missing_key_is_not_found(storage):
    with pytest.raises(NotFound):
        storage.open(new_key())


def test_delete_removes_and_deleting_again_is_success(storage):
    key = new_key()
    storage.put(key, io.BytesIO(b"bytes"), "image/gif")
    storage.delete(key)
    with pytest.raises(NotFound):
        storage.open(key)
    storage.delete(key)
    storage.delete(new_key())


def test_list_names_every_blob_with_its_size(storage):
    blobs = {new_key(): secrets.token_bytes(n) for n in (1, 10, 1000)}
    for key, data in blobs.items():
        storage.put(key, io.BytesIO(data), "image/png")
    listed = {b.key: b.size for b in storage.list()}
    assert listed == {key: len(data) for key, data in blobs.items()}
    assert all(b.modified.tzinfo is not None for b in storage.list())


#: Every backend reads an upload in chunks of at most this (the filesystem's write chunk,
#: s3transfer's read size), so a put that has read this much is part-way through its write.
HALFWAY = 1024 * 1024
#: A generous bound on waiting for another thread, so that a bug fails rather than hangs.
WAIT = 30


class HeldStream(io.BytesIO):
    """Bytes to `put` that stop after the first `HALFWAY` bytes until `resume` is set:
    `held` says the backend's write was caught half done; `paused` is set then (or when
    the put ends without that happening)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.held, self.paused, self.resume = False, threading.Event(), threading.Event()

    def read(self, size=-1):
        if not self.resume.is_set():
            if self.tell() >= HALFWAY:
                self.held = True
                self.paused.set()
                self.resume.wait(WAIT)
            elif size is None or size < 0 or self.tell() + size > HALFWAY:
                size = HALFWAY - self.tell()  # a short read, as a socket would give
        return super().read(size)


def contents(storage, key, byte_range=None) -> bytes:
    with storage.open(key, byte_range) as stream:
        return stream.read()


def test_put_overwrites_atomically(storage):
    """While an overwrite is half written, readers get the previous bytes whole (never a
    part, nothing, or NotFound) and the listing its size; then the new bytes whole."""
    key = new_key()
    # Sizes differ so that a listing shows which version it saw.
    versions = [secrets.token_bytes(HALFWAY * 2 + n) for n in (0, 1000, 2000)]
    names = {data: f"version {i}" for i, data in enumerate(versions)}

    def which(data: bytes) -> str:
        return names.get(data, f"{len(data)} other bytes")

    storage.put(key, io.BytesIO(versions[0]), "image/png")
    for previous, data in itertools.pairwise(versions):
        stream, failures = HeldStream(data), []

        def write(stream=stream, failures=failures):
            try:
                storage.put(key, stream, "image/png")
            except BaseException as error:  # noqa: BLE001 - reported by the test thread
                failures.append(error)
            finally:
                stream.paused.set()

        writer = threading.Thread(target=write)
        writer.start()
        try:
            assert stream.paused.wait(WAIT) and stream.held, "the put was never caught halfway"
            for _ in range(3):
                assert which(contents(storage, key)) == which(previous)
            assert (
                contents(storage, key, (HALFWAY - 10, HALFWAY + 10))
                == previous[HALFWAY - 10 : HALFWAY + 10]
            )
            assert [(b.key, b.size) for b in storage.list()] == [(key, len(previous))]
        finally:
            stream.resume.set()
            writer.join(WAIT)
        assert not writer.is_alive() and failures == []
        assert which(contents(storage, key)) == which(data)
        assert [(b.key, b.size) for b in storage.list()] == [(key, len(data))]


def test_a_failed_overwrite_leaves_the_previous_bytes(storage):
    key, old = new_key(), secrets.token_bytes(HALFWAY * 2)
    storage.put(key, io.BytesIO(old), "image/png")

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= HALFWAY:
                raise RuntimeError("client went away")
            return super().read(min(size, HALFWAY) if size and size > 0 else HALFWAY)

    with pytest.raises(RuntimeError):
        storage.put(key, Broken(secrets.token_bytes(HALFWAY * 3)), "image/png")
    assert contents(storage, key) == old
    assert [(b.key, b.size) for b in storage.list()] == [(key, len(old))]


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "", "a" * 31, "g" * 32])
def test_keys_not_made_by_the_service_are_refused(storage, key):
    with pytest.raises(ValueError):
        storage.put(key, io.BytesIO(b"x"), "image/png")
    with pytest.raises(ValueError):
        storage.open(key)


def test_ping_answers_when_the_store_does(storage):
    assert storage.ping() is None


def test_ping_raises_backend_unavailable_when_the_store_cannot_answer(storage, tmp_path):
    if isinstance(storage, FilesystemStorage):
        not_a_directory = tmp_path / "a-file"
        not_a_directory.write_bytes(b"")
        broken = FilesystemStorage(not_a_directory)
    else:
        broken = S3Storage(storage.clients, f"missing-{secrets.token_hex(6)}")
    with pytest.raises(BackendUnavailable):
        broken.ping()
    assert storage.ping() is None  # the working store next to it is unaffected


def test_filesystem_ping_asks_for_writes_unless_told_not_to():
    """A blob directory the service's user may read but not write: not ready, unless the
    service is READ_ONLY (`writes=False`); one it cannot read is never ready."""
    with shared_directory() as directory:
        blobs = directory / "blobs"
        store = FilesystemStorage(blobs)
        store.create()
        store.put(new_key(), io.BytesIO(b"x"), "image/png")
        blobs.chmod(0o755)
        with unprivileged():
            store.ping(writes=False)
            with pytest.raises(BackendUnavailable, match="write to"):
                store.ping()
        blobs.chmod(0o700)
        with unprivileged(), pytest.raises(BackendUnavailable, match="read"):
            store.ping(writes=False)


def test_a_blob_directory_moved_away_is_unavailable_not_made_again(tmp_path):
    """DATA_DIR moved while the service ran: /readyz said ready and uploads went on, the
    blobs into a new, empty directory at the old path (mode 0755) and the records into the
    moved database. A write or a probe now fails there; `init` alone makes the directory."""
    store = FilesystemStorage(tmp_path / "data" / "blobs")
    store.create()
    store.put(new_key(), io.BytesIO(b"x"), "image/png")
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(BackendUnavailable):
        store.put(new_key(), io.BytesIO(b"y"), "image/png")
    with pytest.raises(BackendUnavailable):
        store.ping()
    assert not (tmp_path / "data").exists()


def test_filesystem_put_leaves_no_temporary_file_when_the_stream_fails(tmp_path):
    store = FilesystemStorage(tmp_path / "blobs")
    store.create()

    class Broken(io.BytesIO):
        def read(self, *args):
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put(new_key(), Broken(), "image/png")
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_a_bucket_name_s3_refuses_is_a_setting_to_fix(moto_server):
    """It was "S3 is unavailable; retry later"."""
    from image_api.config import ConfigError

    with pytest.raises(ConfigError, match="S3_BUCKET_NAME 'b1' is not a name"):
        S3Storage(s3_client(moto_server), "b1").create()
