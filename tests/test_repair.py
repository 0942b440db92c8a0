"""`flask repair`: drift between blobs and records is found, named, and fixed on request."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import timedelta

import pytest

from image_api.records import new_id, new_key
from image_api.repair import MISSING_BLOB, ORPHAN_BLOB, STALE_PENDING, repair
from image_api.repository import scan_all
from tests import faultproxy
from tests.helpers import FAKE_AWS, ImagesClient, exact_match, make_image, one_s3_attempt

#: Repair with a grace of 0 runs this much later on the service's clock than the uploads,
#: so that the blobs' modification times (the file system's clock) are surely before it.
LATER = timedelta(days=1)


def make_drift(service):
    """One of each kind of drift; returns {kind: key}."""
    orphan = new_key()
    service.storage.put(orphan, io.BytesIO(b"orphan"), "image/png")
    old = service.clock() - timedelta(hours=2)
    template = service.repository.get(upload_record_id(service))
    stale = dataclasses.replace(
        template, id=new_id(), key=new_key(), status="pending", uploaded_at=old, updated_at=old
    )
    service.repository.insert(stale)
    service.storage.put(stale.key, io.BytesIO(b"half-done upload"), "image/png")
    lost = dataclasses.replace(template, id=new_id(), key=new_key())
    service.repository.insert(lost)  # an active record whose blob never arrived
    return {ORPHAN_BLOB: orphan, STALE_PENDING: stale.key, MISSING_BLOB: lost.key}


def upload_record_id(service):
    return next(r.id for r in scan_all(service.repository) if r.status == "active")


def test_a_clean_store_has_no_findings(images, service, clock):
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    images.create()
    report = repair(service, timedelta(0), apply=True)
    assert (report.records, report.blobs, report.findings) == (1, 1, [])


def test_dry_run_names_every_kind_of_drift_and_changes_nothing(images, service, clock):
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    images.create()
    drift = make_drift(service)
    before = (list(scan_all(service.repository)), list(service.storage.list()))
    report = repair(service, timedelta(0))
    assert {f.kind: f.key for f in report.findings} == drift
    assert all(f.action == "reported" for f in report.findings)
    assert (list(scan_all(service.repository)), list(service.storage.list())) == before


def test_apply_fixes_everything_and_a_second_run_finds_nothing(client, images, service, clock):
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    kept = images.create(make_image(color="red"))["_id"]
    drift = make_drift(service)
    report = repair(service, timedelta(0), apply=True)
    assert {f.kind: f.key for f in report.findings} == drift
    assert {f.action for f in report.findings} == {
        "deleted blob",
        "deleted record and blob",
        "deleted record",
    }
    assert exact_match(service)
    assert [r.id for r in scan_all(service.repository)] == [kept]
    assert client.get(f"/api/images/{kept}/download").status_code == 200
    assert repair(service, timedelta(0), apply=True).findings == []


def test_the_grace_period_boundary_is_inclusive(images, service, clock):
    """Stamped at or before `now - grace` is old enough; a millisecond later is not."""
    grace = timedelta(minutes=10)
    template = service.repository.get(images.create()["_id"])
    clock.advance(LATER)
    cutoff = clock.now + timedelta(milliseconds=1) - grace  # repair's reading, minus grace
    at, after = (
        dataclasses.replace(
            template, id=new_id(), key=new_key(), status="pending", uploaded_at=t, updated_at=t
        )
        for t in (cutoff, cutoff + timedelta(milliseconds=1))
    )
    service.repository.insert(at)
    service.repository.insert(after)
    report = repair(service, grace, apply=True)
    assert [(f.kind, f.image_id) for f in report.findings] == [(STALE_PENDING, at.id)]
    assert {r.id for r in scan_all(service.repository)} == {template.id, after.id}


def test_the_grace_period_protects_uploads_in_flight(images, service, clock):
    """A blob not yet recorded and a pending record are left alone within the grace, and
    reported past it. (A blob's time is the storage's clock, not the service's: the
    service's clock is set from it.)"""
    images.create()
    fresh_orphan = new_key()
    service.storage.put(fresh_orphan, io.BytesIO(b"being uploaded"), "image/png")
    written = next(b.modified for b in service.storage.list() if b.key == fresh_orphan)
    clock.now = written + timedelta(minutes=30)
    record = next(iter(scan_all(service.repository)))
    pending = dataclasses.replace(
        record, id=new_id(), key=new_key(), status="pending", uploaded_at=written
    )
    service.repository.insert(pending)
    grace = timedelta(hours=1)
    assert repair(service, grace, apply=True).findings == []
    assert fresh_orphan in {b.key for b in service.storage.list()}
    clock.advance(timedelta(minutes=31))  # both past the grace
    assert {(f.kind, f.key) for f in repair(service, grace).findings} == {
        (ORPHAN_BLOB, fresh_orphan),
        (STALE_PENDING, pending.key),
    }


def test_what_is_not_a_blob_in_the_blob_directory_is_left_alone(make_app, tmp_path):
    """A directory or a symlink named like a blob is not the service's: repair neither
    lists nor deletes it (a directory stopped `repair --apply` with a traceback, and a
    symlink's target was read for its time)."""
    app = make_app({"DATA_DIR": str(tmp_path)})
    ImagesClient(app.test_client()).create()
    shard = tmp_path / "blobs" / "ab"
    shard.mkdir(parents=True, exist_ok=True)
    (shard / ("ab" + "d" * 30)).mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    (shard / ("ab" + "e" * 30)).symlink_to(outside)
    result = app.test_cli_runner().invoke(args=["repair", "--grace", "0", "--apply"])
    assert result.exit_code == 0, result.output
    assert "Checked 1 records, 0 variants and 1 blobs" in result.output
    assert (shard / ("ab" + "d" * 30)).is_dir() and outside.read_bytes() == b"not ours"


def test_a_record_whose_blob_reappears_is_left_alone(client, images, service, clock):
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    image_id = images.create()["_id"]

    class HidesBlobs:
        """A listing that missed a blob (written after it ran)."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def list(self):
            return iter(())

    service.storage = HidesBlobs(service.storage)
    report = repair(service, timedelta(0), apply=True)
    service.storage = service.storage.inner
    assert report.findings == []
    assert client.get(f"/api/images/{image_id}").status_code == 200


def test_an_image_deleted_while_repair_lists_is_no_missing_blob(client, images, service, clock):
    """Records are listed in batches ahead of the blobs: an image a client deleted in
    between is a record in the listing whose blob is gone. A dry run reported it as a
    record whose blob is missing, the alarm for lost data (7 of 8 runs under load)."""
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    kept, deleted = images.create()["_id"], images.create()["_id"]

    class DeletedMeanwhile:
        """The blob listing starts after a client's delete."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def list(self):
            assert client.delete(f"/api/images/{deleted}").status_code == 200
            yield from self.inner.list()

    service.storage = DeletedMeanwhile(service.storage)
    try:
        report = repair(service, timedelta(0))
    finally:
        service.storage = service.storage.inner
    assert report.records == 2 and report.findings == []
    assert client.get(f"/api/images/{kept}").status_code == 200


@pytest.mark.parametrize("grace", ["nan", "inf", "1e308", "99999999999999999999", "-1"])
def test_a_grace_no_duration_can_hold_is_a_usage_error(runner, grace):
    """They were a ValueError or OverflowError traceback (and with --json, no JSON)."""
    result = runner.invoke(args=["repair", "--grace", grace, "--json"])
    assert result.exit_code == 2 and "Invalid value for '--grace'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_reports_in_text_and_json(images, runner, service, clock):
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    images.create()
    drift = make_drift(service)
    text = runner.invoke(args=["repair", "--grace", "0"])
    assert text.exit_code == 0, text.output
    assert "dry run" in text.output
    for kind, key in drift.items():
        assert f"{kind}: key {key}" in text.output

    result = runner.invoke(args=["repair", "--grace", "0", "--apply", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["applied"] is True
    assert {f["kind"]: f["key"] for f in report["findings"]} == drift
    assert exact_match(service)
    again = runner.invoke(args=["repair", "--grace", "0", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["findings"] == []


def test_apply_stops_when_the_stores_look_mixed_up(images, runner, service, clock):
    """Settings naming another bucket, DATA_DIR or database make most records lack their
    blob (or most blobs lack their record): --apply would delete them all. It stops and
    changes nothing, unless --force; a dry run still reports."""
    clock.advance(LATER)  # what repair sees is older than any grace of 0
    ids = [images.create(make_image(color=(i, 0, 0)))["_id"] for i in range(5)]  # a small store
    blobs = {}
    for blob in service.storage.list():
        with service.storage.open(blob.key) as stream:
            blobs[blob.key] = stream.read()
    for key in blobs:
        service.storage.delete(key)  # another bucket: none of these blobs is in it
    refused = runner.invoke(args=["repair", "--grace", "0", "--apply"])
    assert refused.exit_code == 1
    assert "5 of 5 records have no blob" in refused.output and "--force" in refused.output
    assert len(list(scan_all(service.repository))) == 5  # nothing was changed
    dry = runner.invoke(args=["repair", "--grace", "0", "--json"])
    assert len(json.loads(dry.output)["findings"]) == 5

    for key, data in blobs.items():  # the right bucket again, and the wrong database
        service.storage.put(key, io.BytesIO(data), "image/png")
    for image_id in ids:
        service.repository.delete(image_id)
    refused = runner.invoke(args=["repair", "--grace", "0", "--apply"])
    assert refused.exit_code == 1 and "5 of 5 blobs belong to no record" in refused.output
    # With --json, the refusal is JSON as the report would have been.
    as_json = runner.invoke(args=["repair", "--grace", "0", "--apply", "--json"])
    assert as_json.exit_code == 1
    assert "5 of 5 blobs belong to no record" in json.loads(as_json.stdout)["error"]
    assert len(list(service.storage.list())) == 5

    forced = runner.invoke(args=["repair", "--grace", "0", "--apply", "--force"])
    assert forced.exit_code == 0, forced.output
    assert list(service.storage.list()) == []


def test_apply_fixes_a_few_missing_blobs_among_many(images, service, clock):
    """Below the bar (at most half, or a single one), drift is repaired as before."""
    clock.advance(LATER)
    for i in range(3):
        images.create(make_image(color=(0, i, 0)))
    lost = next(iter(service.storage.list())).key
    service.storage.delete(lost)
    report = repair(service, timedelta(0), apply=True)
    assert [(f.kind, f.key, f.action) for f in report.findings] == [
        (MISSING_BLOB, lost, "deleted record")
    ]
    assert exact_match(service)


# --- network faults between the service and S3, then repair --------------------------------


@pytest.fixture
def proxied_app(make_app, tmp_path, proxy):
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "S3_BUCKET_NAME": f"faults-{new_id()}",
            "S3_ENDPOINT_URL": proxy.url,
            "BACKEND_CONNECT_TIMEOUT": "0.5",
            "BACKEND_READ_TIMEOUT": "0.5",
            **FAKE_AWS,
        }
    )
    app.extensions["image_api"].storage.create()
    return app


@pytest.mark.parametrize(
    "fault", [faultproxy.REFUSE, faultproxy.STALL, faultproxy.RESET_AFTER_REQUEST]
)
@pytest.mark.parametrize("operation", ["upload", "replace", "delete"])
def test_s3_faults_give_503_and_repair_restores_an_exact_match(
    proxied_app, proxy, fault, operation, clock
):
    clock.advance(LATER)
    client, service = proxied_app.test_client(), proxied_app.extensions["image_api"]
    images = ImagesClient(client)
    original = make_image(color="red")
    image_id = images.create(original)["_id"]

    proxy.mode = fault
    with one_s3_attempt():  # one timeout to wait on; the calls around it may retry
        if operation == "upload":
            response = images.upload(filename="b.png")
        elif operation == "replace":
            response = images.replace(image_id)
        else:
            response = client.delete(f"/api/images/{image_id}")
    proxy.mode = faultproxy.PASS

    if operation == "delete":
        # The record goes first, so the image is gone for clients; the blob S3 could not
        # delete is an orphan for repair.
        assert response.status_code == 200
        assert client.get(f"/api/images/{image_id}").status_code == 404
    else:
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["code"] == "backend_unavailable"
        assert client.get(f"/api/images/{image_id}/download").data == original
    assert client.get("/api/images").get_json()["total"] == (0 if operation == "delete" else 1)

    repair(service, timedelta(0), apply=True)
    assert exact_match(service)
