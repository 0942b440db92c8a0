"""Readers during a replace get the old bytes or the new ones, never an error: a replaced
blob outlives its record for a while (retired), and is deleted once no reader can want it."""

from __future__ import annotations

import io
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import requests

from image_api.errors import NotFound
from image_api.records import new_id, new_key, utc_now
from image_api.repair import ORPHAN_BLOB, RETIRED_BLOB, repair
from tests.helpers import FAKE_AWS, ImagesClient, make_image


class ReplacedBeforeOpen:
    """The storage, except that just before a download opens its blob (after it read the
    record), another request replaces the image."""

    def __init__(self, inner, replace):
        self.inner, self.replace, self.done = inner, replace, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open(self, key, byte_range=None):
        if not self.done:
            self.done = True
            self.replace()
        return self.inner.open(key, byte_range)


@pytest.mark.parametrize(
    ("headers", "status", "part"),
    [({}, 200, slice(None)), ({"Range": "bytes=5-24"}, 206, slice(5, 25))],
    ids=["full", "ranged"],
)
def test_a_download_racing_a_replace_gets_the_old_bytes(client, service, headers, status, part):
    old, new = make_image(color="red"), make_image(color="blue", size=(90, 90))
    image = ImagesClient(client).create(old)
    real = service.storage

    def replace_now():
        service.storage = real
        ImagesClient(client).replaced(image["_id"], new)
        service.storage = racing

    racing = ReplacedBeforeOpen(real, replace_now)
    service.storage = racing
    response = client.get(f"/api/images/{image['_id']}/download", headers=headers)
    service.storage = real
    assert racing.done
    assert response.status_code == status, response.get_data(as_text=True)[:200]
    assert response.data == old[part]
    assert response.headers["ETag"] == f'"{image["sha256"]}"'  # headers and bytes agree
    assert client.get(f"/api/images/{image['_id']}/download").data == new


def test_a_retired_blob_is_deleted_once_its_time_has_come(client, service, clock):
    # On the wall clock, as the blobs' times are, so that repair's grace of 0 covers them.
    clock.now = utc_now()
    old_data = make_image(color="red")
    image = ImagesClient(client).create(old_data)
    old_key = service.repository.get(image["_id"]).key
    ImagesClient(client).replaced(image["_id"], make_image(color="blue"))
    assert old_key in {blob.key for blob in service.storage.list()}
    assert service.repository.retired_until(old_key) == pytest.approx(
        clock.now + service.retention, abs=timedelta(seconds=1)
    )
    # Not yet due: neither a later write nor repair touches it, and it is no orphan.
    clock.advance(service.retention / 2)
    other = ImagesClient(client).create(make_image(color="green"))
    ImagesClient(client).replaced(other["_id"], make_image(color="gray"))
    findings = repair(service, timedelta(0), apply=True).findings
    assert old_key not in {finding.key for finding in findings}
    assert old_key in {blob.key for blob in service.storage.list()}
    # Due: the next replace sweeps it.
    clock.advance(service.retention)
    ImagesClient(client).replaced(other["_id"], make_image(color="white"))
    keys = {blob.key for blob in service.storage.list()}
    assert old_key not in keys
    assert service.repository.retired_until(old_key) is None
    current = {service.repository.get(i).key for i in (image["_id"], other["_id"])}
    # The other image's last replace retired its own previous blob, not yet due.
    assert current <= keys and len(keys) == 3


def test_repair_keeps_retired_blobs_until_due_then_deletes_them(client, service, clock):
    image = ImagesClient(client).create(make_image(color="red"))
    old_key = service.repository.get(image["_id"]).key
    ImagesClient(client).replaced(image["_id"], make_image(color="blue"))
    clock.advance(timedelta(seconds=1))
    report = repair(service, timedelta(0), apply=True)
    assert report.findings == []
    assert old_key in {blob.key for blob in service.storage.list()}
    clock.advance(service.retention)
    report = repair(service, timedelta(0), apply=True)
    assert [(f.kind, f.key, f.action) for f in report.findings] == [
        (RETIRED_BLOB, old_key, "deleted blob")
    ]
    assert [blob.key for blob in service.storage.list()] == [
        service.repository.get(image["_id"]).key
    ]
    assert repair(service, timedelta(0), apply=True).findings == []


def test_an_unnoted_blob_is_still_an_orphan(client, service, clock):
    ImagesClient(client).create(make_image())
    orphan = new_key()
    service.storage.put(orphan, io.BytesIO(b"x"), "image/png")
    clock.advance(timedelta(days=1))
    report = repair(service, timedelta(0))
    assert [(f.kind, f.key) for f in report.findings] == [(ORPHAN_BLOB, orphan)]


def test_a_presigned_url_outlives_a_replace(make_app, tmp_path, moto_server, clock):
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "S3_BUCKET_NAME": f"retire-{new_id()}",
            "S3_ENDPOINT_URL": moto_server,
            "DOWNLOAD_MODE": "redirect",
            "PRESIGN_TTL": "120",
            **FAKE_AWS,
        }
    )
    service = app.extensions["image_api"]
    service.storage.create()
    client = app.test_client()
    old = make_image(color="red")
    image = ImagesClient(client).create(old)
    handed_out = client.get(f"/api/images/{image['_id']}/download").headers["Location"]
    ImagesClient(client).replaced(image["_id"], make_image(color="blue"))
    assert service.retention >= timedelta(seconds=120)
    assert requests.get(handed_out, timeout=10).content == old
    clock.advance(service.retention)
    assert service.sweep_retired() == 1
    old_key = urlsplit(handed_out).path.rsplit("/", 1)[-1]
    with pytest.raises(NotFound):
        service.storage.open(old_key)
    # S3 answers 403, not 404, for a missing key to a client that may not list the bucket.
    gone = requests.get(handed_out, timeout=10)
    assert gone.status_code in (403, 404) and gone.content != old


# --- the contract, on every repository backend ----------------------------------------------


def test_retired_notes_are_kept_listed_when_due_and_forgotten(repository):
    from tests.test_repository import T0

    keys = [new_key() for _ in range(3)]
    for i, key in enumerate(keys):
        repository.retire(key, T0 + timedelta(seconds=i))
    assert repository.retired_until(keys[1]) == T0 + timedelta(seconds=1)
    assert repository.retired_until(new_key()) is None
    assert repository.due_retired(T0 - timedelta(milliseconds=1), 10) == []
    assert repository.due_retired(T0 + timedelta(seconds=1), 10) == keys[:2]  # inclusive
    assert repository.due_retired(T0 + timedelta(days=1), 2) == keys[:2]  # oldest first
    repository.forget_retired(keys[0])
    repository.forget_retired(keys[0])  # forgetting twice is fine
    assert repository.due_retired(T0 + timedelta(days=1), 10) == keys[1:]
    repository.retire(keys[1], T0 + timedelta(days=2))  # noted again: the later time wins
    assert repository.due_retired(T0 + timedelta(days=1), 10) == [keys[2]]
