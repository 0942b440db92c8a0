"""Regression tests for what an attack on the running service found: crafted queries,
bodies and names, conditional requests at the edges, and races between writers."""

from __future__ import annotations

import base64
import io
import threading
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from werkzeug.http import http_date, parse_date, parse_options_header

from image_api.repository import scan_all
from tests.helpers import ImagesClient, assert_error, make_image, unsigned


def upload(client, data=None, filename="a.png"):
    response = client.post(
        "/api/images/upload", data={"image": (io.BytesIO(data or make_image()), filename)}
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()["image"]


# --- list queries ----------------------------------------------------------------------------

CALENDAR_EDGES = [
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59.999999-00:01",
    "0001-01-01T00:00:00+00:01",
]


@pytest.mark.parametrize("moment", CALENDAR_EDGES)
@pytest.mark.parametrize("name", ["uploadedAfter", "uploadedBefore"])
def test_dates_that_cannot_be_told_in_utc_are_400(client, name, moment):
    response = client.get("/api/images", query_string={name: moment})
    assert_error(response, 400, "bad_request")
    assert name in response.get_json()["message"]


@pytest.mark.parametrize(
    "moment", ["9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00", "2026-01-01"]
)
def test_dates_at_the_edges_that_are_valid_still_work(client, moment):
    upload(client)
    assert client.get("/api/images", query_string={"uploadedBefore": moment}).status_code == 200
    assert client.get("/api/images", query_string={"uploadedAfter": moment}).status_code == 200


@pytest.mark.parametrize("moment", CALENDAR_EDGES)
def test_cursors_naming_dates_that_overflow_are_400(client, moment):
    token = base64.urlsafe_b64encode(f"{moment}|{'a' * 24}".encode()).decode().rstrip("=")
    assert_error(client.get(f"/api/images?cursor={token}"), 400, "bad_request")


@pytest.mark.parametrize(
    "name", ["_external", "_scheme", "_anchor", "_method", "endpoint", "values", "cursor2"]
)
def test_link_is_built_from_the_parameters_the_service_understood(client, name):
    for _ in range(3):
        upload(client)
    response = client.get(
        "/api/images",
        query_string={"limit": "1", "contentType": "image/png", name: "https://evil.example"},
    )
    assert response.status_code == 200, response.get_json()
    link = response.headers["Link"]
    assert "evil" not in link and name not in link
    url = link[1 : link.index(">")]
    assert urlsplit(url).netloc == "localhost"
    query = parse_qs(urlsplit(url).query)
    assert set(query) == {"limit", "cursor", "contentType"}
    assert query["cursor"] == [response.get_json()["nextCursor"]]
    # Following the Link gives the next page.
    following = client.get(url).get_json()
    assert following["images"][0]["_id"] != response.get_json()["images"][0]["_id"]


def test_link_keeps_the_date_filters_as_loaded(client):
    for _ in range(3):
        upload(client)
    response = client.get("/api/images?limit=1&uploadedAfter=2000-01-01T01:00:00%2B01:00")
    query = parse_qs(urlsplit(response.headers["Link"][1:-13]).query)
    assert query["uploadedAfter"] == ["2000-01-01T00:00:00+00:00"]


# --- multipart bodies ------------------------------------------------------------------------


def post_raw(client, body: bytes, boundary=b"xyz"):
    return client.post(
        "/api/images/upload",
        data=body,
        content_type=f"multipart/form-data; boundary={boundary.decode()}",
    )


def part(headers: bytes, content: bytes) -> bytes:
    return b"--xyz\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"


def test_a_filename_that_is_not_utf8_is_a_clear_400_not_a_missing_file(client, service):
    disposition = b'Content-Disposition: form-data; name="image"; filename="caf\xe9.png"'
    response = post_raw(client, part(disposition, make_image()) + b"--xyz--\r\n")
    assert_error(response, 400, "bad_request")
    assert "UTF-8" in response.get_json()["message"]
    assert list(scan_all(service.repository)) == []


def test_a_utf8_filename_in_raw_bytes_is_kept(client):
    disposition = 'Content-Disposition: form-data; name="image"; filename="café.png"'.encode()
    response = post_raw(client, part(disposition, make_image()) + b"--xyz--\r\n")
    assert response.status_code == 201 and response.get_json()["image"]["filename"] == "café.png"


def test_too_many_parts_is_413_form_too_large(client):
    fields = b"".join(
        part(b'Content-Disposition: form-data; name="f%d"' % i, b"v") for i in range(1100)
    )
    image = part(b'Content-Disposition: form-data; name="image"; filename="a.png"', make_image())
    assert_error(post_raw(client, fields + image + b"--xyz--\r\n"), 413, "form_too_large")


def test_an_oversized_text_field_is_413_form_too_large(client):
    field = part(b'Content-Disposition: form-data; name="note"', b"a" * 600_000)
    assert_error(post_raw(client, field + b"--xyz--\r\n"), 413, "form_too_large")


@pytest.mark.parametrize(
    "body",
    [
        b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nno end',
        b"--xyz\r\nno headers at all",
        b"--abc\r\nwrong boundary\r\n--abc--\r\n",
    ],
    ids=["unterminated", "no-headers", "wrong-boundary"],
)
def test_malformed_multipart_is_400(client, body):
    response = post_raw(client, body)
    assert response.status_code == 400 and response.is_json, response.get_data(as_text=True)


# --- filenames in Content-Disposition --------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored", "fallback"),
    [
        ("．．／．．／etc／cron.d／x", "x.png", "x.png"),  # noqa: RUF001 - the look-alikes are the test
        ("..\\..\\boot.ini", "boot.ini.png", "boot.ini.png"),
        ("﹤script﹥.png", "<script>.png", "_script_.png"),
        ("😀.png", "😀.png", "image.png"),
        ("😀", "😀.png", "image.png"),
        (".htaccess", "image.htaccess.png", "image.htaccess.png"),
        ("...", "image.png", "image.png"),
        ("chat noir é.png", "chat noir é.png", "chat noir e.png"),
    ],
)
def test_download_names_are_one_safe_component_never_empty_or_a_dotfile(
    client, sent, stored, fallback
):
    image = upload(client, filename=sent)
    assert image["filename"] == stored
    disposition = client.get(f"/api/images/{image['_id']}/download").headers["Content-Disposition"]
    kind, options = parse_options_header(disposition)
    assert kind == "attachment"
    # Werkzeug decodes filename* when both are given: check the raw fallback too.
    assert f'filename="{fallback}"' in disposition or f"filename={fallback}" in disposition
    assert options["filename"] == stored
    for name in (stored, fallback):
        assert "/" not in name and "\\" not in name and not name.startswith(".")


def test_doubled_slashes_are_a_json_404_not_a_redirect(client):
    image = upload(client)
    for path in (f"//api/images//{image['_id']}", f"/api//images/{image['_id']}/download"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert_error(response, 404, "not_found")
        assert "Location" not in response.headers


# --- conditional downloads -------------------------------------------------------------------


def test_a_replace_within_the_same_second_is_never_mistaken_for_the_old_version(client, clock):
    clock.now = clock.now.replace(microsecond=100_000)
    old, new = make_image(color="red"), make_image(color="blue", size=(80, 60))
    image = upload(client, old)
    url = f"/api/images/{image['_id']}/download"
    last_modified = client.get(url).headers["Last-Modified"]
    replaced = client.put(f"/api/images/{image['_id']}", data={"image": (io.BytesIO(new), "b.png")})
    assert replaced.status_code == 200
    assert client.get(url).headers["Last-Modified"] == last_modified  # the same second
    # A cache holding the old version revalidates by date: it must get the new one.
    fresh = client.get(url, headers={"If-Modified-Since": last_modified})
    assert fresh.status_code == 200 and fresh.data == new
    # A download resumed by date must not splice the new bytes onto the old ones.
    resumed = client.get(url, headers={"Range": "bytes=10-", "If-Range": last_modified})
    assert resumed.status_code == 200 and resumed.data == new


def on_a_whole_second(clock, write) -> dict:
    """`write()` (an upload or a replace, returning the image's JSON) with the clock set so
    that it stamps the image on a whole second: a first `write()` shows how far into it
    the stamp is read (the test clock moves 1 ms a reading)."""
    before = clock.now
    into = datetime.fromisoformat(write()["updatedAt"]) - before
    clock.now = clock.now.replace(microsecond=0) + timedelta(seconds=5) - into
    image = write()
    assert datetime.fromisoformat(image["updatedAt"]).microsecond == 0
    return image


def test_a_date_validator_on_a_whole_second_is_honoured(client, clock):
    data = make_image()
    image = on_a_whole_second(clock, lambda: upload(client, data))
    url = f"/api/images/{image['_id']}/download"
    last_modified = client.get(url).headers["Last-Modified"]
    assert client.get(url, headers={"If-Modified-Since": last_modified}).status_code == 304
    resumed = client.get(url, headers={"Range": "bytes=10-", "If-Range": last_modified})
    assert resumed.status_code == 206 and resumed.data == data[10:]


def test_download_with_a_stale_if_match_is_412(client):
    image = upload(client)
    url = f"/api/images/{image['_id']}/download"
    assert_error(client.get(url, headers={"If-Match": '"stale"'}), 412, "precondition_failed")
    assert client.get(url, headers={"If-Match": f'"{image["sha256"]}"'}).status_code == 200
    assert client.get(url, headers={"If-Match": "*"}).status_code == 200


@pytest.mark.parametrize("suffix", [1, 100, 10**6, 10**30])
def test_a_suffix_range_longer_than_the_image_is_the_whole_image(client, suffix):
    data = make_image()
    image = upload(client, data)
    response = client.get(
        f"/api/images/{image['_id']}/download", headers={"Range": f"bytes=-{suffix}"}
    )
    assert response.status_code == 206
    expected = data[-suffix:]
    assert response.data == expected
    start = len(data) - len(expected)
    assert response.headers["Content-Range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"


def test_a_range_that_starts_past_the_end_is_416(client):
    data = make_image()
    image = upload(client, data)
    response = client.get(
        f"/api/images/{image['_id']}/download", headers={"Range": f"bytes={len(data)}-"}
    )
    assert_error(response, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"


# --- DELETE racing a replace -----------------------------------------------------------------


class ReplaceInBetween:
    """The repository, except that right after a delete has read the record, a replace
    lands (a new version) before the delete is applied."""

    def __init__(self, inner, replace):
        self.inner, self.replace, self.raced = inner, replace, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete(self, image_id, expected_version=None, **kwargs):
        if not self.raced and expected_version is not None:
            self.raced = True
            self.replace()
        return self.inner.delete(image_id, expected_version=expected_version, **kwargs)


def test_delete_without_if_match_deletes_the_version_a_racing_replace_made(client, service):
    image = upload(client)
    real = service.repository

    def replace():
        service.repository = real  # the replace itself runs unhindered
        response = client.put(
            f"/api/images/{image['_id']}",
            data={"image": (io.BytesIO(make_image(color="blue")), "b.png")},
        )
        assert response.status_code == 200
        service.repository = racing

    racing = ReplaceInBetween(real, replace)
    service.repository = racing
    response = client.delete(f"/api/images/{image['_id']}")
    service.repository = real
    assert response.status_code == 200, response.get_json()
    assert racing.raced
    assert client.get(f"/api/images/{image['_id']}").status_code == 404
    assert list(scan_all(service.repository)) == []
    # What is left is the first version's blob, which the replace retired (kept a while for
    # readers that read the record before it).
    [left] = service.storage.list()
    assert service.repository.retired_until(left.key) is not None


def test_delete_with_if_match_that_a_racing_replace_made_stale_is_412(client, service):
    image = upload(client)
    real = service.repository

    def replace():
        service.repository = real
        client.put(
            f"/api/images/{image['_id']}",
            data={"image": (io.BytesIO(make_image(color="blue")), "b.png")},
        )
        service.repository = racing

    racing = ReplaceInBetween(real, replace)
    service.repository = racing
    response = client.delete(
        f"/api/images/{image['_id']}", headers={"If-Match": f'"{image["sha256"]}"'}
    )
    service.repository = real
    assert_error(response, 412, "precondition_failed")
    assert client.get(f"/api/images/{image['_id']}").get_json()["version"] == 2


def test_concurrent_deletes_never_answer_409_while_replaces_race_them(client, service):
    """Deletes retry past a replace that moved the version (a 404 once the other delete
    won); a replace answers 200, or 404 once the image is gone (a 409 only after losing
    five races in a row to other writers: see test_faults)."""
    image = upload(client)
    statuses, start = [], threading.Barrier(6)

    def delete():
        start.wait()
        statuses.append(client.application.test_client().delete(f"/api/images/{image['_id']}"))

    def replace(i):
        start.wait()
        statuses.append(
            client.application.test_client().put(
                f"/api/images/{image['_id']}",
                data={"image": (io.BytesIO(make_image(color=(i, 0, 0))), "b.png")},
            )
        )

    threads = [threading.Thread(target=delete) for _ in range(2)]
    threads += [threading.Thread(target=replace, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted((r.request.method, r.status_code) for r in statuses)
    deletes = [status for method, status in codes if method == "DELETE"]
    replaces = [status for method, status in codes if method == "PUT"]
    assert sorted(deletes) == [200, 404], codes  # one deleted it, the other found it gone
    assert set(replaces) <= {200, 404, 409}, codes
    assert client.get(f"/api/images/{image['_id']}").status_code == 404
    assert list(scan_all(service.repository)) == []


# --- animations: every frame is decoded ------------------------------------------------------


def animated(fmt: str, frames: int = 3, size=(64, 48)) -> bytes:
    from PIL import Image

    images = [Image.effect_noise(size, 30 + 20 * i).convert("RGB") for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, fmt, save_all=True, append_images=images[1:], duration=100, loop=0)
    return out.getvalue()


def inspect(data: bytes, **limits):
    from image_api import media
    from image_api.config import DEFAULT_FORMATS

    return media.inspect(
        io.BytesIO(data),
        accepted_formats=DEFAULT_FORMATS,
        max_bytes=25 * 1024 * 1024,
        max_pixels=limits.pop("max_pixels", 50_000_000),
        **limits,
    )


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_a_whole_animation_is_accepted(fmt):
    info = inspect(animated(fmt))
    assert (info.format, info.width, info.height) == (fmt, 64, 48)


def test_a_gif_truncated_in_its_third_frame_is_refused():
    from image_api.errors import InvalidImage

    data = animated("GIF")
    third = data.rindex(b"\x2c")  # the last image descriptor
    with pytest.raises(InvalidImage):
        inspect(data[: third + 40])


def test_an_apng_with_a_corrupt_last_frame_is_refused():
    from image_api.errors import InvalidImage

    data = bytearray(animated("PNG"))
    last = data.rindex(b"fdAT")
    data[last + 12 : last + 40] = bytes(28)  # the last frame's compressed pixels
    with pytest.raises(InvalidImage):
        inspect(bytes(data))


def test_frames_times_pixels_is_bounded_before_decoding():
    from image_api.errors import TooManyPixels

    data = animated("GIF", frames=3, size=(100, 100))
    assert inspect(data, max_animation_pixels=30_000).width == 100
    with pytest.raises(TooManyPixels, match="3 frames of 100x100"):
        inspect(data, max_animation_pixels=29_999)


# --- the decode budget -----------------------------------------------------------------------


def test_a_decode_that_does_not_fit_waits_for_room_then_proceeds():
    from image_api.errors import DecoderBusy
    from image_api.media import DecodeBudget

    budget = DecodeBudget(capacity=100, wait=30)
    holding, release, results = threading.Event(), threading.Event(), []

    def hold():
        with budget.reserve(80):
            holding.set()
            release.wait()

    def decode():
        with budget.reserve(50):
            results.append(budget.in_use)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    impatient = DecodeBudget(capacity=100, wait=0)
    with impatient.reserve(80), pytest.raises(DecoderBusy):
        impatient.reserve(50).__enter__()
    waiter = threading.Thread(target=decode)
    waiter.start()
    release.set()
    holder.join()
    waiter.join()
    assert results == [50] and budget.in_use == 0
    with budget.reserve(10**12):  # larger than the whole budget: runs alone
        assert budget.in_use == 100


def test_uploads_past_the_decode_budget_get_503_with_retry_after(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "DECODE_WAIT": "0.05"})
    service, client = app.extensions["image_api"], app.test_client()
    with service.decode_budget.reserve(service.decode_budget.capacity):
        response = client.post(
            "/api/images/upload", data={"image": (io.BytesIO(make_image()), "a.png")}
        )
        assert_error(response, 503, "decoder_busy")
        assert int(response.headers["Retry-After"]) > 0
        assert list(scan_all(service.repository)) == []
    assert (
        client.post(
            "/api/images/upload", data={"image": (io.BytesIO(make_image()), "a.png")}
        ).status_code
        == 201
    )


def test_the_readme_lists_every_error_code():
    from image_api import errors
    from tests.helpers import ROOT

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {cls.code for cls in subclasses(errors.ApiError)}
    codes |= set(errors._HTTP_CODES.values()) | {"http_error", "internal_error"}
    table = (ROOT / "README.md").read_text().split("Every error is JSON")[1].split("##")[0]
    missing = sorted(code for code in codes if f"`{code}`" not in table)
    assert missing == []


# --- the Host header -------------------------------------------------------------------------


def test_public_url_decides_every_link(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "PUBLIC_URL": "https://img.example.com:8443/p"})
    client = app.test_client()
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil2.example"}
    for _ in range(2):
        created = client.post(
            "/api/images/upload",
            data={"image": (io.BytesIO(make_image()), "a.png")},
            headers=headers,
        )
    assert created.status_code == 201
    image = created.get_json()["image"]
    base = "https://img.example.com:8443/p/api/images"
    assert unsigned(image["imageUrl"]) == f"{base}/{image['_id']}/download"
    assert created.headers["Location"] == f"{base}/{image['_id']}"
    listing = client.get("/api/images?limit=1", headers=headers)
    assert listing.headers["Link"].startswith(f"<{base}?")
    # Requests still reach the routes under their own path.
    assert client.get(f"/api/images/{image['_id']}").status_code == 200


def test_allowed_hosts_refuse_other_hosts_with_a_json_400(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "ALLOWED_HOSTS": "img.example.com,localhost:5000"})
    client = app.test_client()
    for host in ("img.example.com", "img.example.com:8080", "localhost:5000", "IMG.example.com"):
        assert client.get("/api/images", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "localhost", "localhost:5001", "img.example.com.evil"):
        response = client.get("/api/images", headers={"Host": host})
        assert_error(response, 400, "bad_request")
        assert "evil" not in response.headers.get("Location", "")


def test_a_request_without_a_host_is_400(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path)})
    environ = {"HTTP_HOST": ""}
    response = app.test_client().get("/api/images", environ_overrides=environ)
    assert_error(response, 400, "bad_request")


# --- what a second attack found --------------------------------------------------------------


def test_a_later_version_on_a_whole_second_after_the_change_is_trusted_by_date(client, clock):
    """A replace stamped exactly on a whole second: its own Last-Modified proves a copy
    current (304), as does any later date; a date before it does not."""
    url = f"/api/images/{upload(client)['_id']}"

    def replace() -> dict:
        replaced = client.put(url, data={"image": (io.BytesIO(make_image()), "b.png")})
        return replaced.get_json()["image"]

    image = on_a_whole_second(clock, replace)
    assert image["version"] == 3
    stamped = datetime.fromisoformat(image["updatedAt"])
    download = f"{url}/download"
    last_modified = client.get(download).last_modified
    assert last_modified == stamped
    for date, status in (
        (last_modified, 304),
        (last_modified + timedelta(seconds=1), 304),
        (last_modified - timedelta(seconds=1), 200),
    ):
        response = client.get(download, headers={"If-Modified-Since": http_date(date)})
        assert response.status_code == status, date


def test_if_unmodified_since_on_a_download(client):
    image = upload(client)
    url = f"/api/images/{image['_id']}/download"
    last_modified = client.get(url).last_modified
    stale = http_date(last_modified - timedelta(days=1))
    assert_error(
        client.get(url, headers={"If-Unmodified-Since": stale}), 412, "precondition_failed"
    )
    assert (
        client.get(url, headers={"If-Unmodified-Since": http_date(last_modified)}).status_code
        == 200
    )
    # If-Match, when sent, decides alone.
    both = {"If-Match": f'"{image["sha256"]}"', "If-Unmodified-Since": stale}
    assert client.get(url, headers=both).status_code == 200


def test_if_none_match_on_writes(client, service):
    image = upload(client)
    new = {"image": (io.BytesIO(make_image(color="blue")), "b.png")}
    response = client.put(f"/api/images/{image['_id']}", data=new, headers={"If-None-Match": "*"})
    assert_error(response, 412, "precondition_failed")
    etag = f'"{image["sha256"]}"'
    assert_error(
        client.delete(f"/api/images/{image['_id']}", headers={"If-None-Match": etag}),
        412,
        "precondition_failed",
    )
    assert client.get(f"/api/images/{image['_id']}").get_json()["version"] == 1
    new = {"image": (io.BytesIO(make_image(color="blue")), "b.png")}
    response = client.put(
        f"/api/images/{image['_id']}", data=new, headers={"If-None-Match": '"other"'}
    )
    assert response.status_code == 200


def test_metadata_answers_if_none_match_with_304(client):
    image = upload(client)
    etag = client.get(f"/api/images/{image['_id']}").headers["ETag"]
    response = client.get(f"/api/images/{image['_id']}", headers={"If-None-Match": etag})
    assert response.status_code == 304 and response.data == b""
    assert response.headers["ETag"] == etag
    other = client.get(f"/api/images/{image['_id']}", headers={"If-None-Match": '"x"'})
    assert other.status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.com/x",
        "a b",
        "a@evil.com",
        'evil.com"><script>',
        "evil.com:99999999",
        "-x",
        # Werkzeug built links with no host at all from these ports ("http:///api/...").
        "a.com:0",
        "a.com:0080",
        "a.com:65536",
        "[::1]:0",
    ],
)
def test_a_malformed_host_is_400_and_stores_nothing(client, service, host):
    response = client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(make_image()), "a.png")},
        headers={"Host": host},
    )
    assert_error(response, 400, "bad_request")
    assert list(scan_all(service.repository)) == []


@pytest.mark.parametrize(
    "host", ["localhost", "img.example.com:8080", "127.0.0.1:5000", "[::1]:5000"]
)
def test_well_formed_hosts_are_served(client, host):
    assert client.get("/api/images", headers={"Host": host}).status_code == 200


def test_probes_answer_without_a_host(make_app, tmp_path):
    client = make_app({"DATA_DIR": str(tmp_path)}).test_client()
    for path in ("/healthz", "/readyz"):
        assert client.get(path, environ_overrides={"HTTP_HOST": ""}).status_code == 200


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("x.html", "x.html.png"),
        ("x.svg", "x.svg.png"),
        ("x.png\x00.exe", "x.png.exe.png"),
        ("\u202egnp.exe", "gnp.exe.png"),
        ("CON.png", "_CON.png"),
        ("nul", "_nul.png"),
        ("photo.PNG", "photo.PNG"),
        ("photo", "photo.png"),
    ],
)
def test_a_download_name_always_ends_in_the_real_types_extension(client, sent, stored):
    assert upload(client, filename=sent)["filename"] == stored


@pytest.mark.parametrize("limit", ["5_0", "+5", " 1", "٣", "1.0", "0x10", "1e2"])
def test_limit_is_ascii_digits_only(client, limit):
    assert_error(client.get("/api/images", query_string={"limit": limit}), 400, "bad_request")


def test_rfc_3339_lower_case_dates_are_accepted(client):
    upload(client)
    response = client.get("/api/images?uploadedAfter=2020-01-01t00:00:00z")
    assert response.status_code == 200 and response.get_json()["total"] == 1


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_compressed_request_bodies_are_415(client, service, encoding):
    response = client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(make_image()), "a.png")},
        headers={"Content-Encoding": encoding},
    )
    assert_error(response, 415, "unsupported_media_type")
    assert list(scan_all(service.repository)) == []


# --- found by schemathesis (tests/test_fuzz.py) ----------------------------------------------


@pytest.mark.parametrize(
    "value", ["0", "", "abc", '"unterminated', "W/abc", '"a" "b"', ",", " , ,"]
)
def test_a_malformed_entity_tag_list_is_400_not_a_failed_precondition(client, value):
    """Werkzeug read these as tags that match nothing: a 412 ("changed by someone else")
    for a typo, or a needless 200. Every operation that reads the headers says 400."""
    image = ImagesClient(client).create()
    url = f"/api/images/{image['_id']}"
    requests = [
        lambda: client.get(url, headers={"If-None-Match": value}),
        lambda: client.get(url + "/download", headers={"If-Match": value}),
        lambda: client.get(url + "/download", headers={"If-None-Match": value}),
        lambda: client.put(
            url, data={"image": (io.BytesIO(make_image()), "b.png")}, headers={"If-Match": value}
        ),
        lambda: client.delete(url, headers={"If-None-Match": value}),
        lambda: client.delete(url, headers={"If-Match": value}),
    ]
    for request in requests:
        response = request()
        assert_error(response, 400, "bad_request")
        assert "entity tags" in response.get_json()["message"]
    assert client.get(url).get_json()["version"] == 1  # nothing was changed


@pytest.mark.parametrize("value", ["*", ' "x" ', '"x", W/"y"', 'W/"x"', '""'])
def test_well_formed_entity_tag_lists_are_evaluated(client, value):
    image = ImagesClient(client).create()
    response = client.get(f"/api/images/{image['_id']}", headers={"If-None-Match": value})
    assert response.status_code == (304 if value == "*" else 200)


@pytest.mark.parametrize("template", ["{tag},", ", {tag}", '"x",, {tag}', '"x" , ,{tag} ,,'])
def test_empty_elements_of_an_entity_tag_list_are_ignored(client, template):
    """RFC 9110 5.6.1: a recipient accepts and ignores empty list elements. They were a 400;
    the tag beside them is what counts, in a read's If-None-Match and a write's If-Match."""
    images = ImagesClient(client)
    image_id = images.create()["_id"]
    url = f"/api/images/{image_id}"
    current = template.format(tag=client.get(url).headers["ETag"])
    assert client.get(url, headers={"If-None-Match": current}).status_code == 304
    stale = template.format(tag='"stale"')
    assert images.replace(image_id, headers={"If-Match": stale}).status_code == 412
    assert images.replace(image_id, headers={"If-Match": current}).status_code == 200


def test_the_upload_path_answers_405_for_other_methods_and_allows_only_post(client):
    """`upload` is not an image id: PUT and DELETE of it are 405, not a 404 for an image
    called "upload", and OPTIONS does not advertise the image routes' methods."""
    for method in ("put", "delete", "patch"):
        response = getattr(client, method)("/api/images/upload")
        assert_error(response, 405, "method_not_allowed")
        assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert set(client.options("/api/images/upload").headers["Allow"].split(", ")) == {
        "POST",
        "OPTIONS",
    }
    assert_error(client.get("/api/images/upload"), 405, "method_not_allowed")


def test_options_answers_allow_and_an_empty_body_of_no_type(client):
    """OPTIONS on a route is its methods in `Allow` and nothing else: not an empty page
    said to be text/html."""
    image = ImagesClient(client).create()
    for path, methods in (
        ("/api/images", {"GET", "HEAD", "OPTIONS"}),
        (f"/api/images/{image['_id']}", {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}),
        (f"/api/images/{image['_id']}/download", {"GET", "HEAD", "OPTIONS"}),
        ("/healthz", {"GET", "HEAD", "OPTIONS"}),
    ):
        response = client.options(path)
        assert response.status_code == 200, path
        assert set(response.headers["Allow"].split(", ")) == methods, path
        assert "Content-Type" not in response.headers and response.data == b"", path
        assert response.headers["Content-Length"] == "0"


def test_a_malformed_image_id_is_a_404_from_routing(client):
    for image_id in ("ABCDEF0123456789abcdef01", "0" * 23, "0" * 25, "upload2"):
        assert_error(client.get(f"/api/images/{image_id}"), 404, "not_found")
        assert_error(client.delete(f"/api/images/{image_id}"), 404, "not_found")


def test_dates_longer_than_the_documented_64_characters_are_400(client):
    long_date = "2026-11-25T21:00:00." + "1" * 45 + "Z"
    assert len(long_date) > 64
    assert_error(client.get(f"/api/images?uploadedAfter={long_date}"), 400, "bad_request")


# --- found by an outside attack on the described API --------------------------------------


def test_the_docs_files_answer_conditions_in_json_and_offer_no_ranges(client):
    page = client.get("/api/docs")
    tag = page.headers["ETag"]
    assert client.get("/api/docs", headers={"If-None-Match": tag}).status_code == 304
    failed = client.get("/api/docs/swagger-ui-bundle.js", headers={"If-Match": '"other"'})
    assert_error(failed, 412, "precondition_failed")
    ranged = client.get("/api/docs/docs.js", headers={"Range": "bytes=0-5", "If-Match": '"x"'})
    assert_error(ranged, 412, "precondition_failed")
    whole = client.get("/api/docs/docs.js", headers={"Range": "bytes=0-5"})
    assert whole.status_code == 200 and "Accept-Ranges" not in whole.headers
    # The page itself lives at /api/docs only: elsewhere its relative links would break.
    assert_error(client.get("/api/docs/docs.html"), 404, "not_found")


@pytest.mark.parametrize(
    "mangled",
    [
        "{date} junk",
        "{date}, Mon, 01 Jan 2001 00:00:00 GMT",
        "{date_no_zone} EST",
        "{date_no_zone} +0000",
        "{wrong_weekday}",
        "{no_weekday}",
    ],
)
def test_a_date_that_is_not_an_http_date_is_ignored(client, mangled):
    """RFC 9110: a recipient ignores an If-Modified-Since, If-Unmodified-Since or If-Range
    date that is not an HTTP-date; the email module's parser took all of these."""
    image = ImagesClient(client).create()
    url = f"/api/images/{image['_id']}/download"
    current = client.get(url).headers["Last-Modified"]  # "Wed, 25 Nov 2026 21:31:43 GMT"
    later = http_date(parse_date(current) + timedelta(days=1))
    earlier = http_date(parse_date(current) - timedelta(days=1))
    for date, status_if_honoured, header in [
        (later, 304, "If-Modified-Since"),
        (earlier, 412, "If-Unmodified-Since"),
    ]:
        value = mangled.format(
            date=date,
            date_no_zone=date.removesuffix(" GMT"),
            wrong_weekday=("Mon" if not date.startswith("Mon") else "Tue") + date[3:],
            no_weekday=date[5:],
        )
        response = client.get(url, headers={header: value})
        assert response.status_code == 200, (header, value)
        assert client.get(url, headers={header: date}).status_code == status_if_honoured
    value = mangled.format(
        date=current,
        date_no_zone=current.removesuffix(" GMT"),
        wrong_weekday=("Mon" if not current.startswith("Mon") else "Tue") + current[3:],
        no_weekday=current[5:],
    )
    ranged = client.get(url, headers={"Range": "bytes=0-3", "If-Range": value})
    assert ranged.status_code == 200  # not a validator: the whole image


def test_the_three_http_date_forms_are_all_read():
    from image_api.api.conditions import parse_http_date

    expected = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT")
    assert expected is not None
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == expected
    assert parse_http_date("Sun, 31 Feb 1994 08:49:37 GMT") is None


def test_an_empty_content_encoding_is_not_identity(client):
    response = client.post(
        "/api/images/upload",
        data={"image": (io.BytesIO(make_image()), "a.png")},
        headers={"Content-Encoding": ""},
    )
    assert_error(response, 415, "unsupported_media_type")
