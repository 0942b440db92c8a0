"""The storage contract, run against every blob backend."""

from __future__ import annotations

import io
import os
import secrets

import boto3
import pytest
from moto import mock_aws

from image_api.errors import NotFound
from image_api.records import new_key
from image_api.storage.filesystem import FilesystemStorage
from image_api.storage.s3 import S3Storage
from tests.helpers import FAKE_AWS


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


def test_put_overwrites_atomically(storage):
    key = new_key()
    storage.put(key, io.BytesIO(b"first"), "image/png")
    storage.put(key, io.BytesIO(b"second"), "image/png")
    with storage.open(key) as stream:
        assert stream.read() == b"second"


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "", "a" * 31, "g" * 32])
def test_keys_not_made_by_the_service_are_refused(storage, key):
    with pytest.raises(ValueError):
        storage.put(key, io.BytesIO(b"x"), "image/png")
    with pytest.raises(ValueError):
        storage.open(key)


def test_ping_answers(storage):
    storage.ping()


def test_filesystem_put_leaves_no_temporary_file_when_the_stream_fails(tmp_path):
    store = FilesystemStorage(tmp_path / "blobs")

    class Broken(io.BytesIO):
        def read(self, *args):
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put(new_key(), Broken(), "image/png")
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
