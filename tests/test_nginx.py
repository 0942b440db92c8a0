"""Debian's nginx in front of real gunicorn, with deploy/nginx.conf as `flask nginx-config`
renders it: body limits agree, errors stay JSON, links carry the public host and port,
forged forwarding headers are ignored, slow clients do not reach gunicorn, and in accel
mode nginx sends the bytes with the service's headers and validators."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from PIL import Image

from bench.processes import free_port
from image_api.cli import NGINX_SOURCE as SOURCE
from image_api.config import Settings
from image_api.nginx import MULTIPART_OVERHEAD, Frontend, max_body_size, render
from image_api.storage.filesystem import FilesystemStorage
from tests.helpers import FAKE_AWS, ROOT, Nginx, Service, make_image

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (tools/test-packages.sh)"
)

MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def home():
    """A directory nginx's unprivileged workers may pass through (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="image-api-nginx-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_pair(home: Path, name: str, **env) -> tuple[Service, Nginx]:
    service = Service(
        home / name / "data",
        {
            "WEB_CONCURRENCY": "1",
            "PROXY_HOPS": "1",
            "DOWNLOAD_MODE": "accel",
            "BLOB_FILE_MODE": "0640",
            "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            **env,
        },
    )
    (home / name).mkdir()
    (home / name).chmod(0o711)
    if env.get("S3_BUCKET_NAME"):
        service.init()  # the bucket
    service.start()
    front = Nginx(service, home / name / "nginx")
    try:
        front.start()
    except BaseException:
        service.stop()
        raise
    return service, front


@pytest.fixture(scope="module")
def pair(home):
    """gunicorn (accel mode, embedded default) and nginx in front, for the module."""
    service, front = start_pair(home, "fs")
    yield service, front
    front.stop()
    service.stop()
    assert "Traceback" not in service.log.read_text()


@pytest.fixture
def http(pair):
    service, _ = pair
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {service.key}"
    yield session
    session.close()


def png_of_size(size: int) -> bytes:
    """A valid PNG of exactly `size` bytes (a text chunk pads it)."""
    base = make_image("PNG", (8, 8))
    end = base.index(b"IEND") - 4
    padding = size - len(base) - 12 - 4  # chunk length, type and CRC; the "pad\0" key
    assert padding >= 0
    body = b"pad\0" + b"x" * padding
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    data = base[:end] + chunk + base[end:]
    assert len(data) == size
    return data


# --- the config agrees with the service ---------------------------------------------------


def test_nginx_body_limit_is_the_services_own(pair):
    _, front = pair
    conf = (front.prefix / "nginx.conf").read_text()
    settings = Settings(max_upload_bytes=MAX_UPLOAD)
    assert f"client_max_body_size {max_body_size(settings)};" in conf
    assert max_body_size(settings) == MAX_UPLOAD + MULTIPART_OVERHEAD


def test_the_checked_in_config_is_what_the_command_renders_by_default():
    settings = Settings.from_mapping({"DATA_DIR": "/srv/image-api/data"})
    storage = FilesystemStorage(settings.data_dir / "blobs")
    rendered = render(settings, storage, Frontend(listen="8080"), SOURCE)
    assert rendered == (ROOT / "deploy" / "nginx.conf").read_text(), (
        "deploy/nginx.conf is stale: DATA_DIR=/srv/image-api/data flask --app image_api "
        "nginx-config --listen 8080 -o deploy/nginx.conf"
    )


# --- uploads and their limits -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "answered_by"),
    [
        (0, "service"),  # at the limit: stored
        (1, "service"),  # a byte over: the service's 413
        (MULTIPART_OVERHEAD - 400, "service"),
        (MULTIPART_OVERHEAD + 1, "nginx"),  # the body is over nginx's limit too
        (10 * MAX_UPLOAD, "nginx"),
    ],
)
def test_every_size_over_the_limit_is_a_json_413(http, pair, extra, answered_by):
    _, front = pair
    response = http.post(
        f"{front.url}/api/images/upload",
        files={"image": ("big.png", png_of_size(MAX_UPLOAD + extra))},
    )
    if extra == 0:
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 413, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "file_too_large"
    by_nginx = "request body is larger than the service accepts" in response.json()["message"]
    assert by_nginx == (answered_by == "nginx")


def test_chunked_uploads_are_buffered_and_limited(http, pair):
    _, front = pair

    def chunks(data):
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + make_image("PNG", (16, 16))
        + b"\r\n--b--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    response = http.post(f"{front.url}/api/images/upload", data=chunks(body), headers=headers)
    assert response.status_code == 201, response.text
    big = b"x" * (max_body_size(Settings(max_upload_bytes=MAX_UPLOAD)) + 10)
    refused = http.post(f"{front.url}/api/images/upload", data=chunks(big), headers=headers)
    assert (refused.status_code, refused.json()["code"]) == (413, "file_too_large")


# --- links and forwarding headers ---------------------------------------------------------


def test_links_carry_the_public_host_and_port_and_forged_headers_do_nothing(http, pair):
    service, front = pair
    forged = {
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Port": "666",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "203.0.113.9",
    }
    response = http.post(
        f"{front.url}/api/images/upload",
        files={"image": ("a.png", make_image())},
        headers=forged,
    )
    assert response.status_code == 201
    public = f"http://127.0.0.1:{front.port}/"
    assert response.headers["Location"].startswith(public)
    assert response.json()["image"]["imageUrl"].startswith(public)
    listed = http.get(f"{front.url}/api/images?limit=1", headers=forged)
    assert listed.headers["Link"].startswith(f"<{public}")
    # The service saw nginx's view of the client, not the forged address.
    log = service.log.read_text()
    assert "203.0.113.9" not in log


def test_metrics_are_not_served_to_the_public_side(http, pair):
    service, front = pair
    hidden = http.get(f"{front.url}/metrics")  # even with an admin key
    assert (hidden.status_code, hidden.json()["code"]) == (404, "not_found")
    assert service.http.get(f"{service.url}/metrics").status_code == 200  # gunicorn's port


# --- accel downloads ----------------------------------------------------------------------


def accel_checks(http, front, image_id: str, data: bytes, variant: str = "") -> None:
    """Full, ranged, suffix, past the end, If-Range, several ranges, 304, 412 and HEAD,
    byte-exact and with the service's headers."""
    url = f"{front.url}/api/images/{image_id}/download{variant}"
    full = http.get(url)
    assert full.status_code == 200, full.text
    assert full.content == data
    etag = full.headers["ETag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
    assert full.headers["X-Content-Type-Options"] == "nosniff"
    assert full.headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    )
    assert full.headers["Cache-Control"] == "no-cache, private"
    assert full.headers["Content-Disposition"].startswith("attachment")
    assert "Last-Modified" in full.headers
    assert full.headers.get("Accept-Ranges") == "bytes"
    assert "X-Accel-Redirect" not in full.headers and "X-Image-Disposition" not in full.headers
    for name in ("Content-Type", "Content-Disposition", "Cache-Control", "ETag", "Accept-Ranges"):
        assert len(full.raw.headers.getlist(name)) == 1, (name, full.headers)
    # The request's id comes back, as from every other response; another origin gets no
    # CORS header (S3's own, answering an Origin header, included), and nothing of S3's.
    traced = http.get(
        url, headers={"X-Request-ID": "accel-check-1", "Origin": "https://evil.example"}
    )
    assert traced.content == data
    assert traced.raw.headers.getlist("X-Request-ID") == ["accel-check-1"]
    assert not [name for name in traced.headers if name.lower().startswith("access-control-")]
    assert not [name for name in traced.headers if name.lower().startswith("x-amz")]
    part = http.get(url, headers={"Range": "bytes=2-9"})
    assert (part.status_code, part.content) == (206, data[2:10])
    assert part.headers["Content-Range"] == f"bytes 2-9/{len(data)}"
    assert part.headers["ETag"] == etag
    suffix = http.get(url, headers={"Range": "bytes=-5"})
    assert (suffix.status_code, suffix.content) == (206, data[-5:])
    longer = http.get(url, headers={"Range": f"bytes=-{len(data) + 10}"})
    assert (longer.status_code, longer.content) == (206, data)
    beyond = http.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    assert beyond.json()["code"] == "range_not_satisfiable"
    empty = http.get(url, headers={"Range": "bytes=-0"})
    assert empty.status_code == 416 and empty.headers["Content-Range"] == f"bytes */{len(data)}"
    for spaced in ("bytes=\t0-9", "bytes = 0-9", "bytes=0 -9"):  # not RFC 9110's grammar
        ignored = http.get(url, headers={"Range": spaced})
        assert (ignored.status_code, ignored.content) == (200, data), spaced
    matching = http.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert (matching.status_code, matching.content) == (206, data[:4])
    stale = http.get(url, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert (stale.status_code, stale.content) == (200, data)
    dated = http.get(url, headers={"Range": "bytes=0-3", "If-Range": full.headers["Last-Modified"]})
    assert dated.status_code in (200, 206)  # the service's own date rule decides
    assert dated.content == (data[:4] if dated.status_code == 206 else data)
    several = http.get(url, headers={"Range": "bytes=0-1,4-5"})
    assert (several.status_code, several.content) == (200, data)
    backwards = http.get(url, headers={"Range": "bytes=5-2"})
    assert (backwards.status_code, backwards.content) == (200, data)
    assert http.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert http.get(url, headers={"If-Match": '"other"'}).status_code == 412
    # Conditions nginx would judge again on its own (and refuse with its HTML 412 or 416)
    # are answered as the service decided.
    matching = http.get(url, headers={"If-Match": etag, "Range": "bytes=0-3"})
    assert (matching.status_code, matching.content) == (206, data[:4])
    unmodified = http.get(url, headers={"If-Unmodified-Since": full.headers["Last-Modified"]})
    assert (unmodified.status_code, unmodified.content) == (200, data)
    garbage = http.get(url, headers={"If-Unmodified-Since": "garbage"})
    assert (garbage.status_code, garbage.content) == (200, data)
    huge = http.get(url, headers={"Range": "bytes=0-18446744073709551616"})
    assert (huge.status_code, huge.content) == (206, data)
    head = http.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(data)) and head.headers["ETag"] == etag


def test_accel_downloads_behave_as_proxy_mode(http, pair):
    _, front = pair
    data = make_image("PNG", (120, 80), color="purple")
    image = http.post(f"{front.url}/api/images/upload", files={"image": ("p.png", data)}).json()
    accel_checks(http, front, image["image"]["_id"], data)


def test_accel_serves_variants_too(http, pair):
    _, front = pair
    data = make_image("PNG", (120, 80), color="orange")
    image_id = http.post(f"{front.url}/api/images/upload", files={"image": ("o.png", data)}).json()[
        "image"
    ]["_id"]
    variant = "?w=60&format=webp"
    rendered = http.get(f"{front.url}/api/images/{image_id}/download{variant}").content
    assert Image.open(io.BytesIO(rendered)).size == (60, 40)
    accel_checks(http, front, image_id, rendered, variant)
    auto = http.get(
        f"{front.url}/api/images/{image_id}/download?w=60&format=auto",
        headers={"Accept": "image/webp"},
    )
    assert auto.headers["Content-Type"] == "image/webp" and "Accept" in auto.headers["Vary"]


#: The longest filename the service keeps (200 characters), each 4 bytes in UTF-8: its
#: Content-Disposition, and the presigned URL that repeats it, are over 7 KB of headers.
LONGEST_NAME = "\N{GRINNING CAT FACE WITH SMILING EYES}" * 196 + ".png"


def assert_served_under_its_name(http, front, image: dict, data: bytes) -> None:
    for url in (f"{front.url}/api/images/{image['_id']}/download", image["imageUrl"]):
        response = http.get(url)
        assert response.status_code == 200, response.text
        assert response.content == data
        assert quote(LONGEST_NAME) in response.headers["Content-Disposition"]
    variant = http.get(f"{front.url}/api/images/{image['_id']}/download?w=20")
    assert variant.status_code == 200 and Image.open(io.BytesIO(variant.content)).width == 20


def test_the_longest_filename_is_served_through_nginx(http, pair):
    """nginx answered headers over its one-page buffer with 502 (sent as a 503 "retry
    shortly"): every download of such an image failed, for good."""
    _, front = pair
    data = make_image("PNG", (40, 30), color="olive")
    created = http.post(f"{front.url}/api/images/upload", files={"image": (LONGEST_NAME, data)})
    assert created.json()["image"]["filename"] == LONGEST_NAME
    assert_served_under_its_name(http, front, created.json()["image"], data)


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx's workers change user only as root")
def test_blob_files_nginx_may_not_read_fail_loudly(http, pair):
    """The workers run as nobody in the service's group: BLOB_FILE_MODE=0640 lets them read;
    a file of mode 0600 must not be served (and the error is JSON, not nginx's page)."""
    service, front = pair
    data = make_image("PNG", (10, 10), color="red")
    image_id = http.post(f"{front.url}/api/images/upload", files={"image": ("r.png", data)}).json()[
        "image"
    ]["_id"]
    blob = next(
        p for p in (Path(service.env["DATA_DIR"]) / "blobs").glob("*/*") if p.read_bytes() == data
    )
    assert oct(blob.stat().st_mode & 0o777) == "0o640"
    blob.chmod(0o600)
    refused = http.get(f"{front.url}/api/images/{image_id}/download")
    assert refused.status_code == 500
    assert refused.json()["code"] == "internal_error"
    assert "Content-Disposition" not in refused.headers  # `curl -OJ` keeps no JSON as r.png
    blob.chmod(0o640)
    assert http.get(f"{front.url}/api/images/{image_id}/download").content == data


# --- slow clients and a stopped service ---------------------------------------------------


def test_slow_clients_do_not_stop_the_service(pair):
    """50 connections each of slow headers, a slow body and a download never read: with
    nginx in front none of them holds a gunicorn thread, so others are still answered."""
    service, front = pair
    big = service.http.post(
        f"{service.url}/api/images/upload", files={"image": ("big.png", png_of_size(MAX_UPLOAD))}
    ).json()["image"]["_id"]
    held = []
    try:
        for i in range(50):
            # From addresses of their own: nginx allows 64 busy connections per address.
            source = (f"127.0.1.{i + 1}", 0)
            slow_headers = socket.create_connection(
                ("127.0.0.1", front.port), source_address=source
            )
            slow_headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow_body = socket.create_connection(("127.0.0.1", front.port), source_address=source)
            slow_body.sendall(
                b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\n"
                + service.auth_header
                + b"Content-Type: multipart/form-data; boundary=b\r\n"
                + b"Content-Length: 100000\r\n\r\n--b\r\n"
            )
            unread = socket.create_connection(("127.0.0.1", front.port), source_address=source)
            unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            unread.sendall(
                f"GET /api/images/{big}/download HTTP/1.1\r\nHost: x\r\n".encode()
                + service.auth_header
                + b"\r\n"
            )
            held += [slow_headers, slow_body, unread]
        for _ in range(5):
            assert requests.get(f"{front.url}/healthz", timeout=10).status_code == 200
            listed = service.http.get(f"{front.url}/api/images?limit=1", timeout=10)
            assert listed.status_code == 200
    finally:
        for connection in held:
            connection.close()


def test_one_address_holds_at_most_64_busy_connections(pair):
    _, front = pair
    held = []
    try:
        for _ in range(70):  # bodies promised and never sent: busy connections
            connection = socket.create_connection(
                ("127.0.0.1", front.port), source_address=("127.0.2.1", 0)
            )
            connection.sendall(
                b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            )
            held.append(connection)
        answer = held[-1].recv(4096)
        assert answer.startswith(b"HTTP/1.1 429") and b'"code":"rate_limited"' in answer
        assert requests.get(f"{front.url}/healthz", timeout=10).status_code == 200  # others
    finally:
        for connection in held:
            connection.close()


def test_a_refused_body_never_costs_another_client_its_request(pair):
    """A body the service refuses unread (no key, no route, wrong method) is drained, so
    gunicorn keeps the connection nginx reuses: others never get a 502 or 503 for it."""
    service, front = pair
    body = b"a" * 300_000
    for target in ("/healthz", "/api/images/upload", "/nowhere"):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", front.port)) as attacker:
                attacker.sendall(
                    f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                assert attacker.recv(100).startswith(b"HTTP/1.1 4")
            for _ in range(3):
                assert requests.get(f"{front.url}/healthz", timeout=10).status_code == 200
    # Straight to gunicorn, on one keep-alive connection: the refusal, then a request.
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall(
            f"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answers = b""
        while chunk := connection.recv(65536):
            answers += chunk
    assert answers.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200" in answers


def test_nginx_errors_are_json_and_its_log_holds_no_signature(http, pair):
    _, front = pair
    with socket.create_connection(("127.0.0.1", front.port)) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host
        answer = raw.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert b"nosniff" in head and b'"code":"bad_request"' in body
    assert b"Referrer-Policy: no-referrer" in head and b"frame-ancestors 'none'" in head
    refused_by_nginx = {
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n": (b"505", b"http_version_not_supported"),
        b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n": (
            b"501",
            b"not_implemented",
        ),
        b"TRACE /api/images HTTP/1.1\r\nHost: x\r\n\r\n": (b"405", b"method_not_allowed"),
    }
    for request, (status, code) in refused_by_nginx.items():
        with socket.create_connection(("127.0.0.1", front.port)) as raw:
            raw.sendall(request)
            head, _, body = raw.recv(4096).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), (request, head)
        assert b"application/json" in head and b'"code":"' + code + b'"' in body, (request, body)
        assert b"nosniff" in head and b"Referrer-Policy" in head
        assert (b"Allow: GET" in head) == (status == b"405")
    # nginx's internal locations asked for from outside: its 404, in JSON too.
    for path in ("/_errors/too_large", "/_errors/gone", "/_errors/not_found"):
        hidden = requests.get(f"{front.url}{path}", timeout=10)
        assert hidden.status_code == 404 and hidden.json()["code"] == "not_found", path
    # HTTP/0.9 (no headers either way): the 505's JSON alone, not the resource.
    for path in (b"/healthz", b"/api/images", b"/"):
        with socket.create_connection(("127.0.0.1", front.port)) as raw:
            raw.sendall(b"GET " + path + b"\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        assert json.loads(answer)["code"] == "http_version_not_supported", (path, answer)
    long = requests.get(f"{front.url}/api/images?x={'a' * 9000}", timeout=10)
    assert long.status_code == 414 and long.json()["code"] == "uri_too_long"
    # Within nginx's limits but over gunicorn's: gunicorn refuses, in JSON too.
    longer_than_gunicorn = requests.get(f"{front.url}/api/images?x={'a' * 5000}", timeout=10)
    assert longer_than_gunicorn.status_code == 414
    assert longer_than_gunicorn.json()["code"] == "uri_too_long"
    many = requests.get(f"{front.url}/healthz", headers={f"X-{i}": "y" for i in range(101)})
    assert many.status_code == 431 and many.json()["code"] == "headers_too_large"
    # Over nginx's own limit: nginx refuses it, with the status gunicorn would give.
    big = requests.get(f"{front.url}/healthz", headers={"X-Big": "a" * 9000}, timeout=10)
    assert big.status_code == 431 and big.json()["code"] == "headers_too_large"
    assert big.headers["X-Content-Type-Options"] == "nosniff"
    image = http.post(f"{front.url}/api/images/upload", files={"image": ("s.png", make_image())})
    anonymous = requests.get(image.json()["image"]["imageUrl"], timeout=10)
    assert anonymous.status_code == 200
    front.stop()  # flushes the buffered access log
    front.start()
    log = (front.prefix / "logs" / "access.log").read_text()
    # The path asked for, not the internal location an accel download was sent from.
    assert f'GET /api/images/{image.json()["image"]["_id"]}/download HTTP/1.1" 200' in log
    assert "_accel" not in log and "signature" not in log and "expires" not in log


def test_nginx_logs_no_warnings_that_quote_a_request_line(home):
    """nginx's warnings quote the request line, query and signature included: a body
    buffered to a temporary file, or a download buffered to one for a slow client (a signed
    URL that anyone reading the log could use). The log keeps errors only."""
    service, front = start_pair(home, "quiet-log", MAX_UPLOAD_BYTES="1000000")
    try:
        body = b"x" * 400_000  # over client_body_buffer_size: nginx spools it to a file
        refused = requests.post(
            f"{front.url}/api/images/upload?signature=SECRET-MARK",
            data=body,
            headers={"Authorization": f"Bearer {service.key}", "Content-Type": "image/png"},
            timeout=10,
        )
        assert refused.status_code == 400  # not multipart: gunicorn had the whole body
    finally:
        front.stop()
        service.stop()
    assert "SECRET-MARK" not in (front.prefix / "logs" / "error.log").read_text()


def test_with_gunicorn_stopped_nginx_answers_json_503(home):
    service, front = start_pair(home, "stopped")
    try:
        service.stop()
        response = requests.get(f"{front.url}/api/images", timeout=10)
        assert response.status_code == 503
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["code"] == "service_unavailable"
        assert response.headers["Retry-After"] == "5"
    finally:
        front.stop()


def test_nginx_errors_carry_the_services_cors_headers(home):
    """With CORS_ORIGINS, an allowed origin's app can read nginx's own errors (a 413 over
    its body limit, the 503 with gunicorn down) as it reads the service's: the same CORS
    headers. Another origin gets none."""
    app_origin = "https://app.example.com"
    service, front = start_pair(home, "cors", CORS_ORIGINS=app_origin)
    try:
        auth = {"Authorization": f"Bearer {service.key}"}
        answers = {}
        for origin in (app_origin, "https://evil.example"):
            headers = {**auth, "Origin": origin}
            big = png_of_size(10 * MAX_UPLOAD)
            answers[origin] = (
                requests.get(f"{front.url}/api/images", headers=headers, timeout=10),
                requests.post(
                    f"{front.url}/api/images/upload",
                    files={"image": ("big.png", big)},
                    headers=headers,
                    timeout=10,
                ),
            )
        listed, too_large = answers[app_origin]
        assert (listed.status_code, too_large.status_code) == (200, 413)
        assert "larger than the service accepts" in too_large.json()["message"]  # nginx's
        for name in ("Access-Control-Allow-Origin", "Access-Control-Expose-Headers"):
            assert too_large.headers[name] == listed.headers[name], name
        assert too_large.headers["Access-Control-Allow-Origin"] == app_origin
        assert "Origin" in too_large.headers["Vary"]
        for response in answers["https://evil.example"]:
            assert "Access-Control-Allow-Origin" not in response.headers
            assert "Access-Control-Expose-Headers" not in response.headers
        service.stop()
        down = requests.get(f"{front.url}/api/images", headers={"Origin": app_origin}, timeout=10)
        assert down.status_code == 503 and down.headers["Access-Control-Allow-Origin"] == app_origin
    finally:
        front.stop()
        service.stop()


# --- S3 behind accel ----------------------------------------------------------------------

APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def s3_pair(home, moto_server):
    from image_api.records import new_id

    service, front = start_pair(
        home,
        "s3",
        S3_BUCKET_NAME=f"accel-{new_id()}",
        S3_ENDPOINT_URL=moto_server,
        CORS_ORIGINS=APP_ORIGIN,
        **FAKE_AWS,
    )
    yield service, front
    front.stop()
    service.stop()


def test_accel_downloads_from_s3_behave_as_proxy_mode(s3_pair):
    service, front = s3_pair
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {service.key}"
    data = make_image("PNG", (90, 70), color="navy")
    image_id = http.post(f"{front.url}/api/images/upload", files={"image": ("n.png", data)}).json()[
        "image"
    ]["_id"]
    accel_checks(http, front, image_id, data)
    variant = "?w=30&format=jpeg"
    rendered = http.get(f"{front.url}/api/images/{image_id}/download{variant}").content
    accel_checks(http, front, image_id, rendered, variant)
    # The allowed origin gets the service's CORS headers once (S3 answered the Origin
    # header with its own: two Access-Control-Allow-Origin, which browsers refuse).
    allowed = http.get(
        f"{front.url}/api/images/{image_id}/download", headers={"Origin": APP_ORIGIN}
    )
    assert allowed.content == data
    assert allowed.raw.headers.getlist("Access-Control-Allow-Origin") == [APP_ORIGIN]
    assert len(allowed.raw.headers.getlist("Vary")) == 1


def test_the_longest_filename_is_served_from_s3_through_nginx(home, s3_pair, moto_server):
    """In accel mode the presigned URL in X-Accel-Redirect, in redirect mode the one in
    Location, repeat the filename: with Content-Disposition, over nginx's default buffer."""
    from image_api.records import new_id

    service, front = s3_pair
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {service.key}"
    data = make_image("PNG", (40, 30), color="teal")
    created = http.post(f"{front.url}/api/images/upload", files={"image": (LONGEST_NAME, data)})
    assert_served_under_its_name(http, front, created.json()["image"], data)
    redirecting, redirect_front = start_pair(
        home,
        "s3-redirect",
        DOWNLOAD_MODE="redirect",
        S3_BUCKET_NAME=f"redirect-{new_id()}",
        S3_ENDPOINT_URL=moto_server,
        **FAKE_AWS,
    )
    try:
        http.headers["Authorization"] = f"Bearer {redirecting.key}"
        created = http.post(
            f"{redirect_front.url}/api/images/upload", files={"image": (LONGEST_NAME, data)}
        )
        image_id = created.json()["image"]["_id"]
        redirect = http.get(
            f"{redirect_front.url}/api/images/{image_id}/download", allow_redirects=False
        )
        assert redirect.status_code == 302, redirect.text
        assert_served_under_its_name(http, redirect_front, created.json()["image"], data)
    finally:
        redirect_front.stop()
        redirecting.stop()


def test_accel_on_s3_answers_a_missing_object_as_proxy_mode_does(s3_pair):
    """The bucket's own error (XML, none of the service's headers) used to reach the
    client: a delete racing a download, or a blob lost, now gets the service's JSON 404."""
    import boto3

    service, front = s3_pair
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {service.key}"
    bucket = boto3.resource(
        "s3", endpoint_url=service.env["S3_ENDPOINT_URL"], region_name="us-east-1", **_aws()
    ).Bucket(service.env["S3_BUCKET_NAME"])
    before = {item.key for item in bucket.objects.all()}
    data = make_image("PNG", (20, 20), color="teal")
    image_id = http.post(f"{front.url}/api/images/upload", files={"image": ("t.png", data)}).json()[
        "image"
    ]["_id"]
    (blob,) = {item.key for item in bucket.objects.all()} - before
    bucket.Object(blob).delete()
    url = f"{front.url}/api/images/{image_id}/download"
    sent = {"X-Request-ID": "gone-1", "Origin": APP_ORIGIN}
    for response in (
        http.get(url, headers=sent),
        http.get(url, headers={**sent, "Range": "bytes=0-3"}),
        http.head(url, headers=sent),
    ):
        assert response.status_code == 404, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["X-Request-ID"] == "gone-1"
        assert response.raw.headers.getlist("Access-Control-Allow-Origin") == [APP_ORIGIN]
        assert not [name for name in response.headers if name.lower().startswith("x-amz")]
        if response.request.method == "GET":
            assert response.json() == {
                "message": "The image's file is missing",
                "code": "not_found",
            }


def _aws() -> dict:
    return {
        "aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
    }


def test_accel_on_s3_answers_a_bucket_that_refuses_or_stalls_with_the_services_503(home, proxy):
    """nginx fetched from a bucket that refused (or never answered, for 60 s) and said
    gunicorn was down (503 service_unavailable). Now it is proxy mode's 503
    backend_unavailable, a stall within REQUEST_TIMEOUT."""
    from image_api.records import new_id
    from tests import faultproxy

    service, front = start_pair(
        home,
        "s3-faults",
        S3_BUCKET_NAME=f"faults-{new_id()}",
        S3_ENDPOINT_URL=proxy.url,
        REQUEST_TIMEOUT="3",
        **FAKE_AWS,
    )
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {service.key}"
        data = make_image("PNG", (20, 20), color="olive")
        posted = http.post(f"{front.url}/api/images/upload", files={"image": ("o.png", data)})
        url = f"{front.url}/api/images/{posted.json()['image']['_id']}/download"
        for mode in (faultproxy.REFUSE, faultproxy.STALL):
            proxy.mode = mode
            started = time.monotonic()
            response = http.get(url, headers={"X-Request-ID": f"s3-{mode}"}, timeout=30)
            assert time.monotonic() - started < 10, mode  # not nginx's 60 s
            assert response.status_code == 503, (mode, response.text)
            assert response.json() == {
                "message": "The blob storage (S3) is unavailable; retry later",
                "code": "backend_unavailable",
            }
            assert response.headers["Retry-After"] == "5"
            assert response.headers["X-Request-ID"] == f"s3-{mode}"
        proxy.mode = faultproxy.PASS
        assert http.get(url).content == data
    finally:
        front.stop()
        service.stop()
    assert "Traceback" not in service.log.read_text()


# --- make run-nginx -----------------------------------------------------------------------


def wait_until_served(url: str, runner: subprocess.Popen, log: Path) -> None:
    for _ in range(600):
        assert runner.poll() is None, log.read_text()
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()}")


@pytest.mark.parametrize("env_file", [".env", "site.env"])
def test_make_run_nginx_honours_env_and_stops_both_on_sigterm(home, env_file):
    """`make run-nginx` as a user runs it, in a checkout with its own .env. The .env's
    PROXY_HOPS=0 is kept (the script exported 1 over it, so anyone reaching gunicorn's port
    forged links with X-Forwarded-Host), nginx's logs are the user's alone (its error log
    can quote a signed URL), and SIGTERM stops gunicorn and nginx."""
    checkout = home / f"checkout{env_file}"
    checkout.mkdir()
    for name in ("image_api", "tools", "gunicorn.conf.py", "wsgi.py", ".venv"):
        (checkout / name).symlink_to(ROOT / name)
    port, nginx_port = free_port(), free_port()
    (checkout / env_file).write_text(
        f"PORT={port}\nNGINX_PORT={nginx_port}\nDATA_DIR={checkout / 'data'}\n"
        "WEB_CONCURRENCY=1\nPROXY_HOPS=0\n"
    )
    settings = set(Settings.__dataclass_fields__)
    env = {k: v for k, v in os.environ.items() if k.lower() not in settings}
    if env_file != ".env":  # named: the file IMAGE_API_ENV_FILE names was not read for it
        env["IMAGE_API_ENV_FILE"] = env_file
    log = checkout / "run-nginx.log"
    with log.open("wb") as out:
        runner = subprocess.Popen(
            ["bash", "tools/run-nginx.sh"], cwd=checkout, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_served(f"http://127.0.0.1:{nginx_port}/healthz", runner, log)
        key = (checkout / "data" / "admin-key").read_text().strip()
        forged = requests.post(
            f"http://127.0.0.1:{port}/api/images/upload",
            files={"image": ("a.png", make_image(), "image/png")},
            headers={
                "Authorization": f"Bearer {key}",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
            },
            timeout=10,
        )
        assert forged.status_code == 201
        assert forged.headers["Location"].startswith(f"http://127.0.0.1:{port}/api/images/")
        for name in ("access.log", "error.log"):
            assert (checkout / ".nginx" / "logs" / name).stat().st_mode & 0o077 == 0, name
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(60) is not None
        for serving in (port, nginx_port):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{serving}/healthz", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(10)


def test_accel_serves_from_a_data_dir_with_spaces_and_semicolons(home):
    """The blob directory was written into `alias` unquoted: a space stopped nginx from
    starting (make run-nginx failed) and a `;` or `{` added directives of its own."""
    service, front = start_pair(home, "odd; name {x}")
    try:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {service.key}"
        data = make_image("PNG", (30, 20), color="olive")
        made = session.post(f"{front.url}/api/images/upload", files={"image": ("o.png", data)})
        image_id = made.json()["image"]["_id"]
        download = session.get(f"{front.url}/api/images/{image_id}/download")
        assert download.status_code == 200 and download.content == data
        assert "X-Accel-Redirect" not in download.headers
    finally:
        front.stop()
        service.stop()
