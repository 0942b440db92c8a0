"""The gallery's page and files: public, our own files only, under a CSP that allows
images from this origin (PUBLIC_URL's, and the bucket in redirect mode) and nothing else."""

from __future__ import annotations

import mongomock
from moto import mock_aws

from tests.conftest import build_app


def test_the_page_and_its_files_are_public_and_locked_down(make_app, tmp_path):
    anonymous = make_app({"DATA_DIR": str(tmp_path)}).test_client(key=None)
    page = anonymous.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "img-src 'self' data: blob:;" in policy and "script-src 'self';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    for name, mimetype in (("gallery.js", "text/javascript"), ("gallery.css", "text/css")):
        asset = anonymous.get(f"/gallery/{name}")
        assert asset.status_code == 200 and asset.mimetype == mimetype
    assert anonymous.get("/gallery/gallery.html").status_code == 404
    assert anonymous.get("/gallery/..%2fdocs.py").status_code == 404
    assert anonymous.get("/api/images").status_code == 401  # the API still needs a key


def test_the_page_says_whether_the_api_asks_for_keys(make_app, tmp_path):
    """So that a first visit asks for a key without a refused request (gallery.js)."""
    pages = {}
    for auth in ("on", "off"):
        app = make_app({"DATA_DIR": str(tmp_path / auth), "AUTH": auth})
        pages[auth] = app.test_client(key=None).get("/")
        assert f'<body data-auth="{auth}">'.encode() in pages[auth].data
    assert pages["on"].headers["ETag"] != pages["off"].headers["ETag"]
    client = make_app({"DATA_DIR": str(tmp_path / "on")}).test_client(key=None)
    again = client.get("/", headers={"If-None-Match": pages["on"].headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    assert client.get("/", headers={"If-Match": '"other"'}).status_code == 412


def test_in_redirect_mode_images_may_come_from_the_bucket(tmp_path, clock, cloud_env):
    with mock_aws(), mongomock.patch(servers=(("mongo.test", 27017),)):
        app = build_app({**cloud_env, "DOWNLOAD_MODE": "redirect"}, clock)
        policy = app.test_client(key=None).get("/").headers["Content-Security-Policy"]
        app.extensions["image_api"].close()
    images = next(part for part in policy.split("; ") if part.startswith("img-src"))
    assert images.startswith("img-src 'self' data: blob: https://")
    assert "amazonaws.com" in images
