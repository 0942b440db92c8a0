"""The HTTP API, end to end through Flask, on both backend pairs."""

from __future__ import annotations

import hashlib
import io
import re
from urllib.parse import urlsplit

import pytest
from werkzeug.datastructures import FileStorage

from image_api.media import CONTENT_TYPES
from image_api.repository import scan_all
from tests.helpers import make_image, samples

HEX24 = re.compile(r"^[0-9a-f]{24}$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


def upload(client, data: bytes, filename="photo.png", field="image", content_type=None):
    file = FileStorage(io.BytesIO(data), filename=filename, content_type=content_type)
    return client.post("/api/images/upload", data={field: file})


def replace(client, image_id, data: bytes, filename="new.png"):
    return client.put(f"/api/images/{image_id}", data={"image": (io.BytesIO(data), filename)})


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


def stored_state(service):
    """(record ids, blob keys): what the backends hold."""
    records = sorted(r.id for r in scan_all(service.repository))
    blobs = sorted(b.key for b in service.storage.list())
    return records, blobs


# --- upload ------------------------------------------------------------------------------


def test_upload_returns_201_with_the_image_and_a_location(client):
    data = make_image("PNG", (40, 30))
    response = upload(client, data, filename="cat.png", content_type="text/plain")
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
    assert image["imageUrl"] == f"http://localhost/api/images/{image['_id']}/download"
    assert response.headers["Location"] == f"http://localhost/api/images/{image['_id']}"
    assert client.get(response.headers["Location"]).get_json() == image


def test_image_url_follows_the_proxy_when_trusted(app, client):
    from werkzeug.middleware.proxy_fix import ProxyFix

    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    response = client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(make_image()), "a.png")},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com"},
    )
    assert response.get_json()["image"]["imageUrl"].startswith("https://img.example.com/api/")


@pytest.mark.parametrize("path", samples("valid"), ids=lambda p: p.name)
def test_every_valid_sample_round_trips_or_is_refused_as_unsupported(client, path):
    data = path.read_bytes()
    response = upload(client, data, filename=path.name)
    if path.suffix in (".tif", ".bmp"):
        assert_error(response, 415, "unsupported_media_type")
        return
    assert response.status_code == 201, response.get_json()
    image = response.get_json()["image"]
    assert image["contentType"] == CONTENT_TYPES[image["contentType"].split("/")[1].upper()]
    listed = client.get("/api/images").get_json()["images"]
    assert [i["_id"] for i in listed] == [image["_id"]]
    download = client.get(f"/api/images/{image['_id']}/download")
    assert download.status_code == 200
    assert download.data == data
    assert download.headers["Content-Type"] == image["contentType"]


@pytest.mark.parametrize("path", samples("hostile"), ids=lambda p: p.name)
def test_hostile_samples_are_refused_and_leave_nothing(client, service, path):
    response = upload(client, path.read_bytes(), filename=path.name)
    assert 400 <= response.status_code < 500
    assert response.is_json and response.get_json()["code"]
    assert stored_state(service) == ([], [])


@pytest.mark.parametrize("path", samples("tricky"), ids=lambda p: p.name)
def test_tricky_samples_never_cause_a_500(client, service, path):
    response = upload(client, path.read_bytes(), filename=path.name)
    assert response.status_code in (201, 415, 422), response.get_json()
    records, blobs = stored_state(service)
    assert len(records) == len(blobs) == (1 if response.status_code == 201 else 0)


def test_upload_without_the_image_field_is_400(client):
    assert_error(client.post("/api/images/upload"), 400, "missing_file")
    response = upload(client, make_image(), field="file")
    assert_error(response, 400, "missing_file")
    assert "'file'" in response.get_json()["message"]
    assert_error(client.post("/api/images/upload", json={"image": "x"}), 400, "missing_file")


def test_upload_of_an_empty_file_is_400(client):
    assert_error(upload(client, b"", filename=""), 400, "empty_file")


def test_upload_over_the_byte_limit_is_413(make_app, tmp_path):
    data = make_image("PNG", (64, 64))
    app = make_app({"DATA_DIR": str(tmp_path), "MAX_UPLOAD_BYTES": str(len(data) - 1)})
    client = app.test_client()
    assert_error(upload(client, data), 413, "file_too_large")
    # A request far bigger than the limit is refused from its Content-Length alone.
    assert_error(upload(client, data * 200), 413, "file_too_large")


def test_upload_of_a_non_image_is_415(client, service):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    assert_error(
        upload(client, svg, "x.svg", content_type="image/svg+xml"), 415, "unsupported_media_type"
    )
    assert_error(upload(client, make_image("TIFF"), "x.png"), 415, "unsupported_media_type")
    assert stored_state(service) == ([], [])


def test_upload_of_a_corrupt_image_is_422(client, service):
    data = make_image("JPEG", (200, 200), color="red")
    assert_error(upload(client, data[: len(data) // 3], "x.jpg"), 422, "invalid_image")
    assert stored_state(service) == ([], [])


def test_upload_over_the_pixel_limit_is_422(make_app, tmp_path):
    client = make_app({"DATA_DIR": str(tmp_path), "MAX_IMAGE_PIXELS": "100"}).test_client()
    assert_error(upload(client, make_image("PNG", (11, 10))), 422, "image_too_large")


def test_filename_is_sanitised_and_only_metadata(client, service):
    response = upload(client, make_image(), filename="../../etc/pass\x07wd.png")
    image = response.get_json()["image"]
    assert image["filename"] == "passwd.png"
    [record] = scan_all(service.repository)
    assert "passwd" not in record.key


# --- list --------------------------------------------------------------------------------


def test_list_is_newest_first_with_a_total(client):
    assert client.get("/api/images").get_json() == {
        "message": "Images fetched successfully",
        "total": 0,
        "images": [],
        "nextCursor": None,
    }
    ids = [upload(client, make_image()).get_json()["image"]["_id"] for _ in range(3)]
    body = client.get("/api/images").get_json()
    assert body["total"] == 3
    assert [i["_id"] for i in body["images"]] == ids[::-1]


def test_list_pages_with_limit_and_cursor(client):
    ids = [upload(client, make_image()).get_json()["image"]["_id"] for _ in range(5)]
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


def test_replace_swaps_the_file_and_bumps_the_version(client, service):
    created = upload(client, make_image("PNG", (10, 10)), "old.png").get_json()["image"]
    new_data = make_image("JPEG", (20, 30))
    response = replace(client, created["_id"], new_data, "new.jpg")
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
    assert image["updatedAt"] >= created["updatedAt"]
    assert client.get(f"/api/images/{created['_id']}/download").data == new_data
    assert stored_state(service)[1] == [service.repository.get(created["_id"]).key]


def test_replace_errors_keep_the_old_image(client, service):
    data = make_image()
    image_id = upload(client, data).get_json()["image"]["_id"]
    before = stored_state(service)
    assert_error(client.put(f"/api/images/{image_id}"), 400, "missing_file")
    assert_error(replace(client, image_id, b"GIF89a broken"), 422, "invalid_image")
    assert_error(replace(client, image_id, b"not an image"), 415, "unsupported_media_type")
    assert stored_state(service) == before
    assert client.get(f"/api/images/{image_id}/download").data == data


def test_replace_of_a_missing_image_is_404_before_checking_the_file(client):
    response = client.put("/api/images/0123456789abcdef01234567", data={})
    assert_error(response, 404, "not_found")


def test_delete_removes_record_and_blob(client, service):
    image_id = upload(client, make_image()).get_json()["image"]["_id"]
    response = client.delete(f"/api/images/{image_id}")
    assert response.status_code == 200
    assert response.get_json() == {"message": "Image deleted successfully"}
    assert stored_state(service) == ([], [])
    assert_error(client.get(f"/api/images/{image_id}"), 404, "not_found")
    assert_error(client.delete(f"/api/images/{image_id}"), 404, "not_found")


def test_download_headers(client):
    data = make_image("GIF")
    image = upload(client, data, filename="cat.gif").get_json()["image"]
    response = client.get(f"/api/images/{image['_id']}/download")
    assert response.status_code == 200
    assert response.data == data
    assert response.headers["Content-Type"] == "image/gif"
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Disposition"] == "attachment; filename=cat.gif"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["ETag"] == f'"{image["sha256"]}"'


def test_download_of_a_non_ascii_name_uses_rfc_6266(client):
    image = upload(client, make_image(), filename="chat noir é.png").get_json()["image"]
    response = client.get(urlsplit(image["imageUrl"]).path)
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment; ")
    assert 'filename="chat noir e.png"' in disposition
    assert "filename*=UTF-8''chat%20noir%20%C3%A9.png" in disposition


def test_download_of_a_missing_blob_is_404(client, service):
    image_id = upload(client, make_image()).get_json()["image"]["_id"]
    service.storage.delete(service.repository.get(image_id).key)
    assert_error(client.get(f"/api/images/{image_id}/download"), 404, "not_found")


# --- errors are JSON -----------------------------------------------------------------------


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.patch("/api/images/0123456789abcdef01234567")
    assert_error(response, 405, "method_not_allowed")
    assert "PUT" in response.headers["Allow"]


def test_malformed_multipart_is_a_json_400(client):
    response = client.post(
        "/api/images/upload",
        data=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nno end',
        content_type="multipart/form-data; boundary=xyz",
    )
    assert response.status_code in (400, 422)
    assert response.is_json


def test_health_probes(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready"


def test_failed_uploads_leave_no_temporary_file(client, monkeypatch, tmp_path):
    import tempfile

    from werkzeug.test import encode_multipart

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big_junk = b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024)  # spooled to disk: > 500 KB
    for data, status in (
        (big_junk, 422),
        (b"x" * 1024 * 1024, 415),
        (make_image("BMP", (800, 800)), 415),
    ):
        # Encoded here, in memory: the test client would spool a large body itself.
        boundary, body = encode_multipart({"image": FileStorage(io.BytesIO(data), "x.png")})
        response = client.post(
            "/api/images/upload",
            data=body,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        assert response.status_code == status
    assert list(spool.iterdir()) == []
