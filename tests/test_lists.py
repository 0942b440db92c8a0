"""Keyset pagination, filters and the Link header of GET /api/images."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import pytest

from tests.helpers import make_image


def upload(images, fmt="PNG"):
    return images.create(make_image(fmt, (8, 8)), filename="x")


def walk(client, url, between_pages=lambda: None):
    """Follow nextCursor to the end, calling `between_pages()` after each page; return every
    image id seen, in order."""
    seen = []
    while url:
        response = client.get(url)
        assert response.status_code == 200
        body = response.get_json()
        seen += [image["_id"] for image in body["images"]]
        between_pages()
        url = None
        if body["nextCursor"]:
            link = re.fullmatch(r'<([^>]+)>; rel="next"', response.headers["Link"])
            url = urlsplit(link.group(1))._replace(scheme="", netloc="").geturl()
            assert f"cursor={body['nextCursor']}" in url
    return seen


def test_walking_pages_while_others_upload_never_skips_or_repeats(client, images):
    existing = [upload(images)["_id"] for _ in range(23)]
    added = []

    def others_upload():
        # Between every two pages, as if from other clients: images newer than any seen.
        added.extend(upload(images)["_id"] for _ in range(2))

    seen = walk(client, "/api/images?limit=4", between_pages=others_upload)
    assert len(added) == 2 * 6  # 23 images in pages of 4
    assert len(seen) == len(set(seen))  # no repeats
    # Newest first: the images that existed are all there, in order, after any newer ones.
    assert [i for i in seen if i in existing] == existing[::-1]
    assert set(seen) <= set(existing) | set(added)
    # Everything added arrived after the first page, so is newer than every cursor.
    assert seen == existing[::-1]


def test_last_page_has_no_cursor_and_no_link(client, images):
    upload(images)
    response = client.get("/api/images?limit=1")
    assert response.get_json()["nextCursor"] is None
    assert "Link" not in response.headers


def test_filters_and_total(client, images):
    pngs = [upload(images, "PNG")["_id"] for _ in range(3)]
    jpeg = upload(images, "JPEG")
    body = client.get("/api/images?contentType=image/png&limit=2").get_json()
    assert body["total"] == 3
    assert walk(client, "/api/images?contentType=image/png&limit=2") == pngs[::-1]
    uploaded = datetime.fromisoformat(jpeg["uploadedAt"])
    after = (uploaded).isoformat().replace("+00:00", "Z")
    body = client.get(f"/api/images?uploadedAfter={after}").get_json()
    assert [i["_id"] for i in body["images"]] == [jpeg["_id"]] and body["total"] == 1
    before = (uploaded).isoformat().replace("+00:00", "Z")
    assert client.get(f"/api/images?uploadedBefore={before}").get_json()["total"] == 3
    just_after = (uploaded + timedelta(milliseconds=1)).isoformat().replace("+00:00", "Z")
    assert client.get(f"/api/images?uploadedAfter={just_after}").get_json()["total"] == 0
    # Without an offset, a date is UTC (the service's clock, not this machine's).
    naive = (uploaded + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert client.get(f"/api/images?uploadedAfter={naive}").get_json()["total"] == 0
    naive = (uploaded - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert client.get(f"/api/images?uploadedAfter={naive}").get_json()["total"] >= 1


@pytest.mark.parametrize(
    "query",
    ["limit=1&limit=2", "cursor=a&cursor=b", "contentType=image/png&contentType=image/gif"],
)
def test_a_list_parameter_given_twice_is_400(client, query):
    """Not read as its first value: the client meant something the list does not do."""
    response = client.get(f"/api/images?{query}")
    assert response.status_code == 400
    assert "more than once" in response.get_json()["message"]


def test_bad_filters_are_400(client):
    for query in ("contentType=text/html", "uploadedAfter=yesterday", "uploadedBefore=2026-13-01"):
        response = client.get(f"/api/images?{query}")
        assert response.status_code == 400, query
        assert response.get_json()["code"] == "bad_request"
