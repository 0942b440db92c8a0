"""Keyset pagination, filters and the Link header of GET /api/images."""

from __future__ import annotations

import io
import re
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from tests.helpers import make_image


def upload(client, fmt="PNG"):
    data = make_image(fmt, (8, 8))
    response = client.post("/api/images/upload", data={"image": (io.BytesIO(data), "x")})
    assert response.status_code == 201
    return response.get_json()["image"]


def walk(client, url):
    """Follow nextCursor to the end; return every image id seen, in order."""
    seen = []
    while url:
        response = client.get(url)
        assert response.status_code == 200
        body = response.get_json()
        seen += [image["_id"] for image in body["images"]]
        url = None
        if body["nextCursor"]:
            link = re.fullmatch(r'<([^>]+)>; rel="next"', response.headers["Link"])
            url = urlsplit(link.group(1))._replace(scheme="", netloc="").geturl()
            assert f"cursor={body['nextCursor']}" in url
    return seen


def test_walking_pages_while_others_upload_never_skips_or_repeats(app, client):
    existing = [upload(client)["_id"] for _ in range(23)]
    stop, added = threading.Event(), []

    def keep_uploading():
        other = app.test_client()
        while not stop.is_set():
            added.append(upload(other)["_id"])

    uploader = threading.Thread(target=keep_uploading)
    uploader.start()
    try:
        seen = walk(client, "/api/images?limit=4")
    finally:
        stop.set()
        uploader.join()
    assert added, "the uploader never ran"
    assert len(seen) == len(set(seen))  # no repeats
    # Newest first: the images that existed are all there, in order, after any newer ones.
    assert [i for i in seen if i in existing] == existing[::-1]
    assert set(seen) <= set(existing) | set(added)


def test_last_page_has_no_cursor_and_no_link(client):
    upload(client)
    response = client.get("/api/images?limit=1")
    assert response.get_json()["nextCursor"] is None
    assert "Link" not in response.headers


def test_filters_and_total(client):
    pngs = [upload(client, "PNG")["_id"] for _ in range(3)]
    jpeg = upload(client, "JPEG")
    body = client.get("/api/images?contentType=image/png&limit=2").get_json()
    assert body["total"] == 3
    assert walk(client, "/api/images?contentType=image/png&limit=2") == pngs[::-1]
    uploaded = datetime.fromisoformat(jpeg["uploadedAt"])
    after = (uploaded).isoformat().replace("+00:00", "Z")
    body = client.get(f"/api/images?uploadedAfter={after}").get_json()
    assert [i["_id"] for i in body["images"]] == [jpeg["_id"]] and body["total"] == 1
    before = (uploaded).isoformat().replace("+00:00", "Z")
    assert client.get(f"/api/images?uploadedBefore={before}").get_json()["total"] == 3
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert client.get(f"/api/images?uploadedAfter={future}").get_json()["total"] == 0


def test_bad_filters_are_400(client):
    for query in ("contentType=text/html", "uploadedAfter=yesterday", "uploadedBefore=2026-13-01"):
        response = client.get(f"/api/images?{query}")
        assert response.status_code == 400, query
        assert response.get_json()["code"] == "bad_request"
