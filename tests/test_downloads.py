"""Downloads by RFC 9110: validators, byte ranges, HEAD, disposition, redirect mode."""

from __future__ import annotations

import io
import itertools
import random
from datetime import timedelta

import pytest
import requests
from PIL import Image
from werkzeug.http import http_date

from image_api.records import new_id
from tests.helpers import FAKE_AWS, ImagesClient, make_image


@pytest.fixture
def image(images):
    """An uploaded image: (its JSON, its bytes, its download path)."""
    data = make_image("PNG", (300, 200), color=None)
    body = images.create(data, filename="pic.png")
    return body, data, f"/api/images/{body['_id']}/download"


def test_download_carries_validators_and_safety_headers(client, image):
    body, data, url = image
    response = client.get(url)
    assert response.status_code == 200 and response.data == data
    assert response.headers["ETag"] == f'"{body["sha256"]}"'
    assert response.headers["Last-Modified"]
    assert response.headers["Cache-Control"] == "no-cache, private"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    )


def test_if_none_match_gives_304_without_a_body(client, image):
    body, _, url = image
    etag = f'"{body["sha256"]}"'
    response = client.get(url, headers={"If-None-Match": etag})
    assert response.status_code == 304 and response.data == b""
    assert response.headers["ETag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get(url, headers={"If-None-Match": f'"x", {etag}'}).status_code == 304


def test_if_modified_since_trusts_the_first_versions_own_date(client, image):
    body, _, url = image
    assert body["version"] == 1
    last_modified = client.get(url).last_modified  # whole seconds, as HTTP dates are
    # No other version can share the first version's Last-Modified.
    assert client.get(url, headers={"If-Modified-Since": http_date(last_modified)}).status_code == (
        304
    )
    later = http_date(last_modified + timedelta(seconds=1))
    assert client.get(url, headers={"If-Modified-Since": later}).status_code == 304
    old = http_date(last_modified - timedelta(seconds=1))
    assert client.get(url, headers={"If-Modified-Since": old}).status_code == 200


def test_head_has_the_headers_and_no_body(client, image):
    _, data, url = image
    get, head = client.get(url), client.head(url)
    assert head.status_code == 200 and head.data == b""
    for name in ("Content-Type", "Content-Length", "ETag", "Content-Disposition", "Accept-Ranges"):
        assert head.headers[name] == get.headers[name]
    assert head.headers["Content-Length"] == str(len(data))


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=100-", 100, None),
        ("bytes=-50", -50, None),
        ("bytes=5-5", 5, 6),
        ("bytes=10-999999999", 10, None),
    ],
)
def test_a_single_range_is_206(client, image, header, start, stop):
    _, data, url = image
    expected = data[start:stop]
    response = client.get(url, headers={"Range": header})
    assert response.status_code == 206
    assert response.data == expected
    first = start if start >= 0 else len(data) + start
    assert response.headers["Content-Range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    )
    assert response.headers["Content-Length"] == str(len(expected))


def test_an_unsatisfiable_range_is_416(client, image):
    _, data, url = image
    response = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"
    assert response.get_json()["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("header", ["bytes=-0", "bytes=-000", "Bytes=-0"])
def test_an_empty_suffix_range_is_416_unless_if_range_fails(client, image, header):
    """The last zero bytes: a valid range nothing satisfies (RFC 9110 14.1.2)."""
    _, data, url = image
    response = client.get(url, headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"
    stale = client.get(url, headers={"Range": header, "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.data == data


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=oops",
        "bytes=-0,-1",
        # Whitespace RFC 9110 has no place for (nginx, in accel mode, parses it otherwise).
        "bytes=\t0-9",
        "bytes = 0-9",
        "bytes=0-9\t",
        "bytes=0 -9",
        "bytes=0-9,",
    ],
)
def test_other_ranges_get_the_whole_image(client, image, header):
    _, data, url = image
    response = client.get(url, headers={"Range": header})
    assert response.status_code == 200 and response.data == data


def test_if_range_honours_the_etag_and_the_first_versions_last_modified(client, image):
    body, data, url = image
    last_modified = client.get(url).last_modified
    ranged = {"Range": "bytes=0-3"}
    for validator in (f'"{body["sha256"]}"', http_date(last_modified)):
        response = client.get(url, headers={**ranged, "If-Range": validator})
        assert response.status_code == 206 and response.data == data[:4], validator
    # Strong comparison only: a weak tag, another date or another tag get the whole image.
    later = http_date(last_modified + timedelta(seconds=1))
    for validator in (f'W/"{body["sha256"]}"', later, '"stale"'):
        response = client.get(url, headers={**ranged, "If-Range": validator})
        assert response.status_code == 200 and response.data == data, validator


def test_head_of_a_range(client, image):
    _, _, url = image
    response = client.head(url, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206 and response.data == b""
    assert response.headers["Content-Length"] == "10"


def test_disposition_inline_and_bad_values(client, image):
    _, _, url = image
    inline = client.get(f"{url}?disposition=inline")
    assert inline.headers["Content-Disposition"] == "inline; filename=pic.png"
    bad = client.get(f"{url}?disposition=run")
    assert bad.status_code == 400 and bad.get_json()["code"] == "bad_request"


def test_a_range_after_replace_with_an_old_if_range_gets_the_new_image(client, images, image):
    body, _, url = image
    new = make_image("JPEG", (20, 20))
    assert images.replace(body["_id"], new, "n.jpg").status_code == 200
    response = client.get(url, headers={"Range": "bytes=0-3", "If-Range": f'"{body["sha256"]}"'})
    assert response.status_code == 200 and response.data == new


# --- S3: streaming and redirect mode over a real HTTP moto server ---------------------------


@pytest.fixture
def s3_app(make_app, tmp_path, moto_server):
    def build(**extra):
        app = make_app(
            {
                "DATA_DIR": str(tmp_path),
                "S3_BUCKET_NAME": f"dl-{new_id()}",
                "S3_ENDPOINT_URL": moto_server,
                **FAKE_AWS,
                **extra,
            }
        )
        app.extensions["image_api"].storage.create()
        return app

    return build


def test_redirect_mode_sends_a_presigned_url_with_the_right_headers(s3_app):
    app = s3_app(DOWNLOAD_MODE="redirect", PRESIGN_TTL="120")
    client = app.test_client()
    data = make_image("PNG", (50, 40))
    image = ImagesClient(client).create(data, filename="photo été.png")
    response = client.get(f"/api/images/{image['_id']}/download?disposition=inline")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert "X-Amz-Expires=120" in location
    fetched = requests.get(location, timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["Content-Type"] == "image/png"
    assert fetched.headers["Content-Disposition"] == response.headers["Content-Disposition"]
    assert "filename*=UTF-8''photo%20%C3%A9t%C3%A9.png" in fetched.headers["Content-Disposition"]
    # No shared cache keeps it: the bucket says what the service says.
    assert fetched.headers["Cache-Control"] == response.headers["Cache-Control"]
    assert fetched.headers["Cache-Control"] == "no-cache, private"
    etag = f'"{image["sha256"]}"'
    assert client.get(response.request.path, headers={"If-None-Match": etag}).status_code == 304
    # Signing is cached briefly per image and disposition: a repeat gets the same URL.
    again = client.get(f"/api/images/{image['_id']}/download?disposition=inline")
    assert again.headers["Location"] == location
    attachment = client.get(f"/api/images/{image['_id']}/download")
    assert attachment.headers["Location"] != location
    assert (
        "attachment"
        in requests.get(attachment.headers["Location"], timeout=10).headers["Content-Disposition"]
    )


def test_redirect_mode_streams_what_the_bucket_would_judge_otherwise(s3_app):
    """A client follows the 302 with the same headers (curl -L does): the bucket would
    judge If-Match and If-Range by its own ETag (an MD5), and a Range the service ignores
    by its own rules. Those are streamed by the service; a range past the end is the
    service's JSON 416, not the bucket's XML."""
    app = s3_app(DOWNLOAD_MODE="redirect")
    client = app.test_client()
    data = make_image("PNG", (50, 40))
    image = ImagesClient(client).create(data)
    url, etag = f"/api/images/{image['_id']}/download", f'"{image["sha256"]}"'

    def followed(headers):
        response = client.get(url, headers=headers)
        if response.status_code != 302:
            return response.status_code, response.data
        fetched = requests.get(response.headers["Location"], headers=headers, timeout=10)
        return fetched.status_code, fetched.content

    assert followed({"If-Match": etag}) == (200, data)
    assert followed({"If-Match": etag, "Range": "bytes=0-9"}) == (206, data[:10])
    assert followed({"Range": "bytes=0-9", "If-Range": etag}) == (206, data[:10])
    assert followed({"Range": "bytes=0-9", "If-Range": '"other"'}) == (200, data)
    assert followed({"Range": "bytes=0-1,4-5"}) == (200, data)
    assert followed({"Range": "bytes=5-2"}) == (200, data)
    # Invalid (ignored, as here), or valid in an obsolete form (moto answers it with a 500).
    for name, value in itertools.product(
        ("If-Modified-Since", "If-Unmodified-Since"),
        ("garbage", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"),
    ):
        expected = 412 if name == "If-Unmodified-Since" and value != "garbage" else 200
        assert client.get(url, headers={name: value}).status_code == expected, (name, value)
    # What the bucket judges as the service does is still redirected.
    for headers, expected in (
        ({}, (200, data)),
        ({"Range": "bytes=3-7"}, (206, data[3:8])),
        ({"Range": "bytes=-4"}, (206, data[-4:])),
        ({"If-None-Match": '"other"'}, (200, data)),
        ({"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}, (200, data)),
    ):
        assert client.get(url, headers=headers).status_code == 302, headers
        assert followed(headers) == expected, headers
    # HEAD is answered here: the presigned URL is signed for GET, which S3 (not moto)
    # checks, so `curl -I -L` got a 403 from the bucket.
    head = client.head(url)
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["ETag"] == etag and head.headers["Content-Type"] == "image/png"
    ranged = client.head(url, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.headers["Content-Length"] == "10"
    # The 302 itself has no body, and no image type.
    redirect = client.get(url)
    assert redirect.status_code == 302 and "Content-Type" not in redirect.headers
    beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.get_json()["code"] == "range_not_satisfiable"
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    assert client.get(url, headers={"If-Match": '"other"'}).status_code == 412


def test_redirect_mode_needs_s3(make_app, tmp_path):
    from image_api.config import ConfigError

    with pytest.raises(ConfigError, match="DOWNLOAD_MODE"):
        make_app({"DATA_DIR": str(tmp_path), "DOWNLOAD_MODE": "redirect"})


def test_s3_failing_before_the_first_byte_is_a_json_503(s3_app, proxy):
    """S3 answered the request, then its body broke off: nothing has been sent yet, so
    the client gets the 503 of any other S3 failure, not a connection closed on it (the
    tests in test_gunicorn cut a download later on)."""
    app = s3_app(S3_ENDPOINT_URL=proxy.url)
    client = app.test_client()
    noise = io.BytesIO()
    Image.frombytes("RGB", (200, 200), random.randbytes(200 * 200 * 3)).save(noise, "PNG")
    image = ImagesClient(client).create(noise.getvalue())
    proxy.cut_answers_after(2000)  # S3's headers, then a little of the body
    response = client.get(f"/api/images/{image['_id']}/download")
    assert response.status_code == 503 and response.get_json()["code"] == "backend_unavailable"
    assert response.headers["Retry-After"]
    proxy.answers_left = None
    assert client.get(f"/api/images/{image['_id']}/download").data == noise.getvalue()


def test_s3_ranges_fetch_only_the_range_and_the_stream_is_closed_early(s3_app, proxy):
    app = s3_app(S3_ENDPOINT_URL=proxy.url)  # counts what S3 sends
    service = app.extensions["image_api"]
    noise = io.BytesIO()
    Image.frombytes("RGB", (400, 300), random.randbytes(400 * 300 * 3)).save(noise, "PNG")
    data = noise.getvalue()
    image = ImagesClient(app.test_client()).create(data)
    before = proxy.answered
    opened = []
    real_open = service.storage.open

    def spy(key, byte_range=None):
        stream = real_open(key, byte_range)
        opened.append((byte_range, stream))
        return stream

    service.storage.open = spy
    client = app.test_client()
    url = f"/api/images/{image['_id']}/download"
    response = client.get(url, headers={"Range": "bytes=10-19"}, buffered=True)
    assert response.status_code == 206 and response.data == data[10:20]
    assert opened[-1][0] == (10, 20)
    # S3's headers and ten bytes, not the 360 KB image.
    assert proxy.answered - before < 4096 < len(data)

    # A client that goes away after the first chunk: the server closes the iterable.
    response = client.get(url, buffered=False)
    first = next(iter(response.response))
    assert data.startswith(first)
    response.close()
    assert opened[-1][1].closed and opened[-1][1]._body._raw_stream.closed  # S3 connection too
