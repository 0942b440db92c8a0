"""What crashes and time leave behind is collected: temporary files and unfinished multipart
uploads (by repair), expired idempotency keys (on the write path and by repair), and
MongoDB's indexes exist without an operator step."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import boto3
import mongomock
import pytest

from image_api.records import new_id, new_key, utc_now
from image_api.repair import PARTIAL_WRITE, repair
from image_api.repository.mongodb import MongoRepository
from image_api.repository.sqlite import SqliteRepository
from image_api.storage.filesystem import FilesystemStorage
from tests.helpers import FAKE_AWS, make_image


def test_repair_removes_temporary_files_a_killed_write_left(make_app, tmp_path, clock):
    app = make_app({"DATA_DIR": str(tmp_path)})
    service = app.extensions["image_api"]
    client = app.test_client()
    assert (
        client.post(
            "/api/images/upload", data={"image": (io.BytesIO(make_image()), "a.png")}
        ).status_code
        == 201
    )
    shard = tmp_path / "blobs" / "ab"
    shard.mkdir(parents=True, exist_ok=True)
    (shard / ".tmp-k1ll3d").write_bytes(b"half a blob")
    # The file's time is the file system's clock: the service's is set from it.
    clock.now = datetime.fromtimestamp((shard / ".tmp-k1ll3d").stat().st_mtime, UTC)
    clock.advance(timedelta(minutes=59))
    report = repair(service, timedelta(hours=1))
    assert report.findings == []  # younger than the grace: a write may be in progress
    clock.advance(timedelta(minutes=2))
    report = repair(service, timedelta(hours=1))
    assert [(f.kind, f.key) for f in report.findings] == [(PARTIAL_WRITE, "ab/.tmp-k1ll3d")]
    assert (shard / ".tmp-k1ll3d").exists()  # a dry run changes nothing
    report = repair(service, timedelta(hours=1), apply=True)
    assert [f.action for f in report.findings] == ["deleted"]
    assert not (shard / ".tmp-k1ll3d").exists()
    assert repair(service, timedelta(hours=1), apply=True).findings == []


@pytest.mark.parametrize("ref", ["../x", "ab/../../etc", "ab/.tmp-x/../../y", "ab/blob"])
def test_partial_refs_that_are_not_temporary_files_are_refused(tmp_path, ref):
    with pytest.raises(ValueError):
        FilesystemStorage(tmp_path).delete_partial(ref)


def test_repair_aborts_unfinished_multipart_uploads(make_app, tmp_path, moto_server, clock):
    bucket = f"partial-{new_id()}"
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "S3_BUCKET_NAME": bucket,
            "S3_ENDPOINT_URL": moto_server,
            **FAKE_AWS,
        }
    )
    service = app.extensions["image_api"]
    service.storage.create()
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_server,
        region_name=FAKE_AWS["AWS_REGION"],
        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
    )
    key = new_key()
    upload = s3.create_multipart_upload(Bucket=bucket, Key=f"images/{key}")
    s3.upload_part(
        Bucket=bucket,
        Key=f"images/{key}",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"part",
    )
    clock.advance(timedelta(days=1))
    report = repair(service, timedelta(hours=1), apply=True)
    assert [(f.kind, f.key, f.action) for f in report.findings] == [
        (PARTIAL_WRITE, f"{key}/{upload['UploadId']}", "deleted")
    ]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    service.storage.delete_partial(f"{key}/{upload['UploadId']}")  # gone already: fine


def test_expired_idempotency_keys_are_purged(repository):
    # Expiry times ahead of the wall clock, so MongoDB's TTL monitor leaves them alone.
    now = utc_now() + timedelta(days=3)
    for i in range(5):
        repository.claim(f"old-{i}", "fp", None, now - timedelta(days=3), now - timedelta(days=2))
    repository.claim("live", "fp", None, now, now + timedelta(days=1))
    assert repository.purge_expired_keys(now, 3) == 3
    assert repository.purge_expired_keys(now, 10) == 2
    assert repository.purge_expired_keys(now, 10) == 0
    assert repository.claim("live", "other", None, now, now + timedelta(days=1)).fingerprint == "fp"


def test_each_new_idempotency_key_pays_for_expired_ones(make_app, tmp_path, clock):
    app = make_app({"DATA_DIR": str(tmp_path), "IDEMPOTENCY_TTL": "60"})
    client = app.test_client()

    def post(key):
        return client.post(
            "/api/images/upload",
            data={"image": (io.BytesIO(make_image()), "a.png")},
            headers={"Idempotency-Key": key},
        )

    for i in range(5):
        assert post(f"k{i}").status_code == 201
    keys = SqliteRepository(tmp_path / "images.sqlite3")
    count = "SELECT count(*) FROM idempotency_keys"
    assert keys._execute(count).fetchone()[0] == 5
    clock.advance(timedelta(minutes=2))
    assert post("later").status_code == 201
    assert keys._execute(count).fetchone()[0] == 1
    keys.close()


def test_mongodb_indexes_exist_without_an_init_step():
    database = mongomock.MongoClient(tz_aware=True)["fresh"]
    repo = MongoRepository(database)
    with pytest.raises(Exception):  # noqa: B017 - any: the record does not exist
        repo.get(new_id())
    indexes = database["idempotency_keys"].index_information()
    assert indexes["keys_expire"]["expireAfterSeconds"] == 0
    assert {"images_newest_first", "images_by_type", "images_by_key"} <= set(
        database["images"].index_information()
    )
