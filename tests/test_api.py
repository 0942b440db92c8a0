"""The HTTP API, end to end through Flask, on both backend pairs."""

from __future__ import annotations

import hashlib
import io
import itertools
import re
from datetime import datetime
from urllib.parse import urlsplit

import pytest
from werkzeug.datastructures import FileStorage

from image_api.records import valid_key
from image_api.repository import scan_all
from tests.helpers import (
    GPS_IFD,
    HOSTILE_OUTCOMES,
    MEDIA_TYPES,
    TRICKY_REFUSED_OUTCOMES,
    ImagesClient,
    assert_error,
    assert_replaced,
    decoded_frames,
    exif_of,
    make_image,
    sample_format,
    samples,
    unsigned,
)

HEX24 = re.compile(r"^[0-9a-f]{24}$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


def stored_state(service):
    """(record ids, blob keys): what the backends hold."""
    records = sorted(r.id for r in scan_all(service.repository))
    blobs = sorted(b.key for b in service.storage.list())
    return records, blobs


# --- upload ------------------------------------------------------------------------------


def test_image_ids_tell_nothing_about_each_other(images):
    """Random, not ObjectIds: no shared timestamp or machine part, no counter to step."""
    ids = [images.create()["_id"] for _ in range(8)]
    assert all(HEX24.match(image_id) for image_id in ids)
    assert len({image_id[:8] for image_id in ids}) == len(ids)  # an ObjectId's timestamp
    assert len({image_id[8:18] for image_id in ids}) == len(ids)  # its process part
    numbers = sorted(int(image_id, 16) for image_id in ids)
    assert all(b - a > 2**32 for a, b in itertools.pairwise(numbers))


def test_upload_returns_201_with_the_image_and_a_location(client, images):
    data = make_image("PNG", (40, 30))
    response = images.upload(data, filename="cat.png", content_type="text/plain")
    assert response.status_code == 201
    body = response.get_json()
    assert body["message"] == "Image uploaded successfully"
    image = body["image"]
    assert HEX24.match(image["_id"])
    assert image["filename"] == "cat.png"
    assert image["contentType"] == "image/png"  # sniffed, not the client's text/plain
    assert (image["size"], image["width"], image["height"]) == (len(data), 40, 30)
    assert image["sha256"] == hashlib.sha256(data).hexdigest()
    assert image["version"] == 1
    assert ISO_UTC.match(image["uploadedAt"]) and image["uploadedAt"] == image["updatedAt"]
    assert unsigned(image["imageUrl"]) == f"http://localhost/api/images/{image['_id']}/download"
    assert response.headers["Location"] == f"http://localhost/api/images/{image['_id']}"
    assert client.get(response.headers["Location"]).get_json() == image


def test_image_url_follows_the_proxy_when_trusted(app, images):
    from werkzeug.middleware.proxy_fix import ProxyFix

    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    image = images.create(
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com"}
    )
    assert unsigned(image["imageUrl"]) == (
        f"https://img.example.com/api/images/{image['_id']}/download"
    )


@pytest.mark.parametrize("path", samples("valid"), ids=lambda p: p.name)
def test_every_valid_sample_round_trips_or_is_refused_as_unsupported(client, images, path):
    data = path.read_bytes()
    response = images.upload(data, filename=path.name)
    fmt = sample_format(path)
    if fmt not in MEDIA_TYPES:  # TIFF, BMP: real images outside the allow-list
        assert_error(response, 415, "unsupported_media_type")
        return
    assert response.status_code == 201, response.get_json()
    image = response.get_json()["image"]
    assert image["contentType"] == MEDIA_TYPES[fmt]
    listed = client.get("/api/images").get_json()["images"]
    assert [i["_id"] for i in listed] == [image["_id"]]
    download = client.get(f"/api/images/{image['_id']}/download")
    assert download.status_code == 200
    # The upload without its metadata: the same pixels; size and sha256 of what is stored.
    assert decoded_frames(download.data) == decoded_frames(data)
    assert (image["size"], image["sha256"]) == (
        len(download.data),
        hashlib.sha256(download.data).hexdigest(),
    )
    assert not exif_of(download.data).get_ifd(GPS_IFD)
    assert download.headers["Content-Type"] == image["contentType"]


@pytest.mark.parametrize("path", samples("valid"), ids=lambda p: p.name)
def test_with_strip_metadata_off_uploads_round_trip_byte_for_byte(make_app, tmp_path, path):
    app = make_app({"DATA_DIR": str(tmp_path), "STRIP_METADATA": "false"})
    response = ImagesClient(app.test_client()).upload(path.read_bytes(), filename=path.name)
    if response.status_code == 415:
        return  # outside the allow-list (the test above)
    image = response.get_json()["image"]
    download = app.test_client().get(f"/api/images/{image['_id']}/download")
    assert download.data == path.read_bytes()
    assert image["sha256"] == hashlib.sha256(download.data).hexdigest()


@pytest.mark.parametrize("path", samples("hostile"), ids=lambda p: p.name)
def test_hostile_samples_are_refused_and_leave_nothing(images, service, path):
    response = images.upload(path.read_bytes(), filename=path.name)
    assert_error(response, *HOSTILE_OUTCOMES[path.name])
    assert stored_state(service) == ([], [])


@pytest.mark.parametrize("path", samples("tricky"), ids=lambda p: p.name)
def test_tricky_samples_are_stored_or_refused_by_a_limit(client, images, service, path):
    """Odd EXIF and the like: real images that decode are kept; a frame past the pixel
    limit is refused like any other."""
    data = path.read_bytes()
    response = images.upload(data, filename=path.name)
    if path.name in TRICKY_REFUSED_OUTCOMES:
        assert_error(response, *TRICKY_REFUSED_OUTCOMES[path.name])
        assert stored_state(service) == ([], [])
        return
    assert response.status_code == 201, response.get_json()
    image = response.get_json()["image"]
    assert image["contentType"] == MEDIA_TYPES[sample_format(path)]
    records, blobs = stored_state(service)
    assert records == [image["_id"]] and len(blobs) == 1
    stored = client.get(f"/api/images/{image['_id']}/download").data
    assert decoded_frames(stored) == decoded_frames(data)
    assert not exif_of(stored).get_ifd(GPS_IFD)


def test_upload_without_the_image_field_is_400(client, images):
    assert_error(client.post("/api/images/upload"), 400, "missing_file")
    response = images.upload(field="file")
    assert_error(response, 400, "missing_file")
    assert "'file'" in response.get_json()["message"]
    assert_error(client.post("/api/images/upload", json={"image": "x"}), 400, "missing_file")


def test_two_files_in_the_image_field_are_400_and_store_nothing(client, images, service):
    """One file per request: the second is not dropped silently, on upload or replace."""
    image = images.create(make_image(color="red"))
    two = lambda: {  # noqa: E731
        "image": [(io.BytesIO(make_image(color=c)), f"{c}.png") for c in ("blue", "green")]
    }
    for response in (
        client.post("/api/images/upload", data=two()),
        client.put(f"/api/images/{image['_id']}", data=two()),
    ):
        assert_error(response, 400, "too_many_files")
        assert "got 2" in response.get_json()["message"]
    records, blobs = stored_state(service)
    assert records == [image["_id"]] and len(blobs) == 1
    assert client.get(f"/api/images/{image['_id']}").get_json()["version"] == 1


def test_upload_of_an_empty_file_is_400(images):
    assert_error(images.upload(b"", filename=""), 400, "empty_file")


def test_upload_over_the_byte_limit_is_413(make_app, tmp_path):
    data = make_image("PNG", (64, 64))
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_UPLOAD_BYTES": str(len(data) - 1)})
    images = ImagesClient(app.test_client())
    assert_error(images.upload(data), 413, "file_too_large")
    # A request far bigger than the limit is refused from its Content-Length alone.
    assert_error(images.upload(data * 200), 413, "file_too_large")


def test_a_body_over_the_limit_for_its_other_fields_says_so(make_app, tmp_path):
    """The limit is on the whole body: a file under MAX_UPLOAD_BYTES with a large text
    field beside it is refused, and the message says why, not that the file is too large."""
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_UPLOAD_BYTES": "100000"})
    data = {"image": (io.BytesIO(make_image()), "a.png"), "note": "x" * 200_000}
    response = app.test_client().post("/api/images/upload", data=data)
    assert_error(response, 413, "file_too_large")
    message = response.get_json()["message"]
    assert f"request body is {response.request.content_length} bytes" in message
    assert "100000 for the file (MAX_UPLOAD_BYTES)" in message


def test_upload_of_a_non_image_is_415(images, service):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    assert_error(
        images.upload(svg, "x.svg", content_type="image/svg+xml"), 415, "unsupported_media_type"
    )
    assert_error(images.upload(make_image("TIFF"), "x.png"), 415, "unsupported_media_type")
    assert stored_state(service) == ([], [])


def test_upload_of_a_corrupt_image_is_422(images, service):
    data = make_image("JPEG", (200, 200), color="red")
    assert_error(images.upload(data[: len(data) // 3], "x.jpg"), 422, "invalid_image")
    assert stored_state(service) == ([], [])


def test_upload_over_the_pixel_limit_is_422(make_app, tmp_path):
    client = make_app({"DATA_DIR": str(tmp_path), "MAX_IMAGE_PIXELS": "100"}).test_client()
    images = ImagesClient(client)
    assert_error(images.upload(make_image("PNG", (11, 10))), 422, "image_too_large")
    assert_error(images.upload(make_image("PNG", (10, 11))), 422, "image_too_large")
    assert images.upload(make_image("PNG", (10, 10))).status_code == 201  # at the limit


def test_filename_is_sanitised_and_only_metadata(images, service):
    image = images.create(filename="../../etc/pass\x07wd.png")
    assert image["filename"] == "passwd.png"
    [record] = scan_all(service.repository)
    assert valid_key(record.key)  # a key the server made, nothing of the name in it
    assert [b.key for b in service.storage.list()] == [record.key]


# --- list --------------------------------------------------------------------------------


def test_list_is_newest_first_with_a_total(client, images):
    assert client.get("/api/images").get_json() == {
        "message": "Images fetched successfully",
        "total": 0,
        "images": [],
        "nextCursor": None,
    }
    ids = [images.create()["_id"] for _ in range(3)]
    body = client.get("/api/images").get_json()
    assert body["total"] == 3
    assert [i["_id"] for i in body["images"]] == ids[::-1]


def test_list_pages_with_limit_and_cursor(client, images):
    ids = [images.create()["_id"] for _ in range(5)]
    seen, url = [], "/api/images?limit=2"
    while url:
        body = client.get(url).get_json()
        assert body["total"] == 5 and len(body["images"]) <= 2
        seen += [i["_id"] for i in body["images"]]
        url = body["nextCursor"] and f"/api/images?limit=2&cursor={body['nextCursor']}"
    assert seen == ids[::-1]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=abc", "cursor=%%%", "cursor=Zm9v"]
)
def test_list_with_bad_parameters_is_400(client, query):
    assert_error(client.get(f"/api/images?{query}"), 400, "bad_request")


# --- get, replace, delete, download ---------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "put", "delete"])
@pytest.mark.parametrize("image_id", ["0123456789abcdef01234567", "not-an-id", "1" * 100])
def test_missing_or_malformed_ids_are_404(client, method, image_id):
    assert_error(getattr(client, method)(f"/api/images/{image_id}"), 404, "not_found")
    assert_error(client.get(f"/api/images/{image_id}/download"), 404, "not_found")


def test_replace_swaps_the_file_and_bumps_the_version(client, images, service):
    created = images.create(make_image("PNG", (10, 10)), "old.png")
    old_key = service.repository.get(created["_id"]).key
    new_data = make_image("JPEG", (20, 30))
    response = images.replace(created["_id"], new_data, "new.jpg")
    assert response.status_code == 200
    body = response.get_json()
    assert body["message"] == "Image updated successfully"
    image = body["image"]
    assert image["_id"] == created["_id"] and image["uploadedAt"] == created["uploadedAt"]
    assert (image["version"], image["contentType"], image["filename"]) == (
        2,
        "image/jpeg",
        "new.jpg",
    )
    assert (image["width"], image["height"]) == (20, 30)
    assert datetime.fromisoformat(image["updatedAt"]) > datetime.fromisoformat(created["updatedAt"])
    assert client.get(f"/api/images/{created['_id']}/download").data == new_data
    assert_replaced(service, created["_id"], old_key)


def test_replace_errors_keep_the_old_image(client, images, service):
    data = make_image()
    image_id = images.create(data)["_id"]
    before = stored_state(service)
    assert_error(client.put(f"/api/images/{image_id}"), 400, "missing_file")
    assert_error(images.replace(image_id, b"GIF89a broken"), 422, "invalid_image")
    assert_error(images.replace(image_id, b"not an image"), 415, "unsupported_media_type")
    assert stored_state(service) == before
    assert client.get(f"/api/images/{image_id}/download").data == data
    assert client.get(f"/api/images/{image_id}").get_json()["version"] == 1


def test_replace_of_a_missing_image_is_404_before_checking_the_file(client):
    response = client.put("/api/images/0123456789abcdef01234567", data={})
    assert_error(response, 404, "not_found")


def test_delete_removes_record_and_blob(client, images, service):
    image_id = images.create()["_id"]
    response = client.delete(f"/api/images/{image_id}")
    assert response.status_code == 200
    assert response.get_json() == {"message": "Image deleted successfully"}
    assert stored_state(service) == ([], [])
    assert_error(client.get(f"/api/images/{image_id}"), 404, "not_found")
    assert_error(client.delete(f"/api/images/{image_id}"), 404, "not_found")


def test_download_headers(client, images):
    data = make_image("GIF")
    image = images.create(data, filename="cat.gif")
    response = client.get(f"/api/images/{image['_id']}/download")
    assert response.status_code == 200
    assert response.data == data
    assert response.headers["Content-Type"] == "image/gif"
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Disposition"] == "attachment; filename=cat.gif"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["ETag"] == f'"{image["sha256"]}"'


def test_download_of_a_non_ascii_name_uses_rfc_6266(client, images):
    image = images.create(filename="chat noir é.png")
    response = client.get(urlsplit(image["imageUrl"]).path)
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment; ")
    assert 'filename="chat noir e.png"' in disposition
    assert "filename*=UTF-8''chat%20noir%20%C3%A9.png" in disposition


def test_download_of_a_missing_blob_is_404(client, images, service):
    image_id = images.create()["_id"]
    service.storage.delete(service.repository.get(image_id).key)
    assert_error(client.get(f"/api/images/{image_id}/download"), 404, "not_found")
    # HEAD answers as GET would (it said 200, and accel mode's nginx said 404).
    for headers in ({}, {"Range": "bytes=0-9"}):
        head = client.head(f"/api/images/{image_id}/download", headers=headers)
        assert (head.status_code, head.data) == (404, b"")
        assert head.content_type == "application/json"


# --- errors are JSON -----------------------------------------------------------------------


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.patch("/api/images/0123456789abcdef01234567")
    assert_error(response, 405, "method_not_allowed")
    assert "PUT" in response.headers["Allow"]


def test_malformed_multipart_is_a_json_400(client, service):
    response = client.post(
        "/api/images/upload",
        data=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nno end',
        content_type="multipart/form-data; boundary=xyz",
    )
    assert_error(response, 400, "bad_request")
    assert stored_state(service) == ([], [])


BACKENDS = {
    "embedded": {"repository": "sqlite", "storage": "filesystem"},
    "cloud": {"repository": "mongodb", "storage": "s3"},
}


def test_health_probes(client, request):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    backends = BACKENDS[request.node.callspec.params["app"]]
    assert response.get_json() == {"status": "ready", "backends": backends}


def test_failed_uploads_leave_no_temporary_file(client, monkeypatch, tmp_path):
    import tempfile

    from werkzeug.test import encode_multipart

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    # Uploads past 500 KB are spooled to anonymous files (unlinked at once, so a directory
    # listing cannot see them): watch every one made, and check it is closed afterwards.
    spooled, make_temporary = [], tempfile.TemporaryFile

    def watched(*args, **kwargs):
        spooled.append(make_temporary(*args, **kwargs))
        return spooled[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", watched)
    big_junk = b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024)  # spooled to disk: > 500 KB
    for data, status, code in (
        (big_junk, 422, "invalid_image"),
        (b"x" * 1024 * 1024, 415, "unsupported_media_type"),
        (make_image("BMP", (800, 800)), 415, "unsupported_media_type"),
    ):
        # Encoded here, in memory: the test client would spool a large body itself.
        boundary, body = encode_multipart({"image": FileStorage(io.BytesIO(data), "x.png")})
        spooled.clear()
        response = client.post(
            "/api/images/upload",
            data=body,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        assert_error(response, status, code)
        assert spooled, "the upload was not spooled to a file"
        assert all(file.closed for file in spooled)
    assert list(spool.iterdir()) == []
