"""The real service under gunicorn, driven over HTTP, restarted with its data kept."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image
from urllib3 import encode_multipart_formdata

from bench.processes import free_port, worker_pids
from tests.helpers import FAKE_AWS, ROOT, Service, make_image


@pytest.fixture
def service(tmp_path):
    running = Service(tmp_path / "data")
    running.start()
    yield running
    running.stop()


def test_upload_list_download_replace_delete_and_restart(service):
    api = f"{service.url}/api/images"
    payloads = [make_image("PNG", (20 + i, 20), color=(i * 20, 0, 0)) for i in range(8)]

    def upload(data):
        return service.http.post(f"{api}/upload", files={"image": ("pic.png", data)}, timeout=10)

    # Concurrent uploads across two workers sharing one SQLite file.
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(upload, payloads))
    assert [r.status_code for r in responses] == [201] * len(payloads)
    images = [r.json()["image"] for r in responses]
    for image, data in zip(images, payloads, strict=True):
        # imageUrl is signed: it needs no key, whichever worker signed or serves it.
        download = requests.get(image["imageUrl"], timeout=10)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == image["sha256"]
        assert download.headers["Content-Length"] == str(len(data))
    listing = service.http.get(api, timeout=10).json()
    assert listing["total"] == len(payloads)

    # Through gunicorn's sendfile(): a range starts at the right offset and stops in time.
    image, data = images[0], payloads[0]
    ranged = service.http.get(image["imageUrl"], headers={"Range": "bytes=7-20"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == data[7:21]
    etag = ranged.headers["ETag"]
    cached = service.http.get(image["imageUrl"], headers={"If-None-Match": etag}, timeout=10)
    assert cached.status_code == 304 and cached.content == b""

    first, second = images[0]["_id"], images[1]["_id"]
    new = make_image("JPEG", (33, 44))
    replaced = service.http.put(f"{api}/{first}", files={"image": ("n.jpg", new)}, timeout=10)
    assert replaced.status_code == 200 and replaced.json()["image"]["version"] == 2
    assert service.http.delete(f"{api}/{second}", timeout=10).status_code == 200

    bad = service.http.post(f"{api}/upload", files={"image": ("x.png", b"nope")}, timeout=10)
    assert bad.status_code == 415 and bad.json()["code"] == "unsupported_media_type"
    assert service.http.get(f"{service.url}/missing", timeout=10).json()["code"] == "not_found"

    service.stop()
    # The log (complete once gunicorn has stopped) has a JSON line per request, signed
    # downloads among them, without their query: whoever reads it cannot use the URLs.
    log = service.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    downloads = [
        line for line in lines if line.get("route") == "/api/images/<id:image_id>/download"
    ]
    assert len(downloads) >= len(images)
    assert "signature" not in log and "expires=" not in log
    assert not any(image["imageUrl"].rpartition("=")[2] in log for image in images)
    service.start()

    listing = service.http.get(api, timeout=10).json()
    assert listing["total"] == len(payloads) - 1
    assert service.http.get(f"{api}/{second}", timeout=10).status_code == 404
    download = service.http.get(f"{api}/{first}/download", timeout=10)
    assert download.content == new
    assert download.headers["Content-Type"] == "image/jpeg"


def noisy_png(seed: int) -> bytes:
    """About 1 MB that does not compress, so writes take long enough to be interrupted."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((640, 480), 40 + seed % 50).convert("RGB").save(out, "PNG")
    return out.getvalue()


def test_workers_killed_mid_write_leave_nothing_broken_after_repair(service):
    import threading

    api = f"{service.url}/api/images"
    payloads = [noisy_png(i) for i in range(4)]
    acknowledged: dict[str, str] = {}
    interrupted: list[int] = []
    stop = threading.Event()

    def load(worker: int):
        n = worker
        while not stop.is_set():
            n += 1
            data = payloads[n % len(payloads)]
            try:
                if acknowledged and n % 3 == 0:
                    image_id = sorted(acknowledged)[n % len(acknowledged)]
                    service.http.put(
                        f"{api}/{image_id}", files={"image": ("r.png", data)}, timeout=10
                    )
                else:
                    response = service.http.post(
                        f"{api}/upload", files={"image": ("u.png", data)}, timeout=10
                    )
                    if response.status_code == 201:
                        acknowledged[response.json()["image"]["_id"]] = "acked"
            except requests.RequestException:
                interrupted.append(n)  # the worker died under us, or is restarting
                time.sleep(0.05)

    def another_acknowledged(timeout: float = 60) -> None:
        """Wait until one more upload is acknowledged: the workers are up and writing."""
        wanted, deadline = len(acknowledged) + 1, time.monotonic() + timeout
        while len(acknowledged) < wanted:
            assert time.monotonic() < deadline, "no upload got through"
            time.sleep(0.01)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        # Each kill lands while three clients write: some of it mid-write, whatever the
        # machine's speed, since it waits for the workers to be writing again, not a time.
        for _ in range(8):
            another_acknowledged()
            for pid in worker_pids(service.process.pid):
                # One listed may have exited since (a kill before it, reaped by gunicorn).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        another_acknowledged()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    service.wait_ready()
    assert interrupted, "no kill landed during a request"

    def run_repair(*flags):
        return json.loads(service.flask("repair", "--json", *flags))

    run_repair("--grace", "0", "--apply")
    assert run_repair("--grace", "0")["findings"] == []

    listed = service.http.get(f"{api}?limit=1000", timeout=10).json()["images"]
    assert set(acknowledged) <= {image["_id"] for image in listed}
    for image in listed:
        download = service.http.get(image["imageUrl"], timeout=10)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == image["sha256"]


#: What gunicorn's error log (the service's stderr) holds on a clean run: its own INFO
#: lines only. A traceback, an app warning or an error gunicorn logged would not match.
#: gunicorn's own INFO lines, and the service's JSON lines at level info.
_CLEAN_LOG_LINE = re.compile(r'\[[^]]+\] \[\d+\] \[INFO\] |\{"time": "[^"]+", "level": "info"')


@pytest.fixture(params=["embedded", "s3"])
def backend_service(request, tmp_path):
    """gunicorn on each backend pair it runs here: directory + SQLite, S3 (a moto server
    over HTTP) + SQLite."""
    env = {}
    if request.param == "s3":
        env = {
            **FAKE_AWS,
            "S3_BUCKET_NAME": f"keepalive-{uuid.uuid4().hex[:12]}",
            "S3_ENDPOINT_URL": request.getfixturevalue("moto_server"),
        }
    running = Service(tmp_path / "data", env)
    if request.param == "s3":
        running.init()
    running.start()
    yield running
    running.stop()
    print(running.log.read_text())  # pytest shows it when the test failed


def test_s3_failing_mid_download_closes_the_connection_and_logs_why(tmp_path, proxy):
    """Once the headers are out, a failure of S3 can only end the response early: the
    client gets fewer bytes than Content-Length and the connection is closed (never left
    open for the rest to be read as the next response). It was a traceback in gunicorn's
    log and nothing in the service's."""
    service = Service(
        tmp_path / "data",
        {
            **FAKE_AWS,
            "S3_BUCKET_NAME": f"cut-{uuid.uuid4().hex[:12]}",
            "S3_ENDPOINT_URL": proxy.url,
            "WEB_CONCURRENCY": "1",
        },
    )
    service.init()
    service.start()
    auth = {"Authorization": f"Bearer {service.key}"}
    try:
        noise = io.BytesIO()
        Image.frombytes("RGB", (600, 600), random.randbytes(600 * 600 * 3)).save(noise, "PNG")
        data = noise.getvalue()
        created = requests.post(
            f"{service.url}/api/images/upload",
            files={"image": ("noise.png", data)},
            headers=auth,
            timeout=10,
        )
        path = f"/api/images/{created.json()['image']['_id']}/download"
        proxy.cut_answers_after(300_000)  # S3 goes away a third of the way through
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        conn.request("GET", path, headers={**auth, "X-Request-ID": "cut-short-1"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(len(data))
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()  # the connection closed: not a wait for the rest
        assert 0 < len(cut.value.partial) < len(data)
        assert data.startswith(cut.value.partial)
        conn.close()
        proxy.answers_left = None  # S3 is back
        again = requests.get(f"{service.url}{path}", headers=auth, timeout=10)
        assert again.status_code == 200 and again.content == data
    finally:
        service.stop()
    log = service.log.read_text()
    assert "Traceback" not in log, log
    (line,) = [json.loads(line) for line in log.splitlines() if "cut short after" in line]
    assert line["level"] == "error" and line["request_id"] == "cut-short-1"


def test_one_keep_alive_connection_serves_full_ranged_head_and_304(backend_service):
    """Regression: after a 206 from the filesystem, gunicorn's socket.sendfile() seeked
    the range wrapper, got io.UnsupportedOperation and dropped the connection, so the next
    request on it failed with RemoteDisconnected."""
    service = backend_service
    data = make_image("PNG", (64, 48), color=(10, 120, 200))
    size = len(data)
    # Not through requests: its closed sessions leave the socket open until garbage
    # collection, and a stopping worker lingers two seconds over an open connection.
    form, content_type = encode_multipart_formdata({"image": ("k.png", data, "image/png")})
    upload = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        auth = {"Authorization": f"Bearer {service.key}"}
        upload.request("POST", "/api/images/upload", form, {"Content-Type": content_type, **auth})
        uploaded = upload.getresponse()
        assert uploaded.status == 201, uploaded.read()
        path = f"/api/images/{json.loads(uploaded.read())['image']['_id']}/download"
    finally:
        upload.close()

    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.connect()
    sock = conn.sock
    done: list[str] = []

    def send(step: str, method: str = "GET", headers: dict[str, str] | None = None):
        try:
            conn.request(
                method, path, headers={"Authorization": f"Bearer {service.key}", **(headers or {})}
            )
            response = conn.getresponse()
            body = response.read()
        except (http.client.HTTPException, OSError) as error:
            # gunicorn logs why before it closes the socket: the log is complete here.
            pytest.fail(
                f"{step}: connection lost after {done}: {error!r}\n{service.log.read_text()}"
            )
        # Kept alive: announced by the server (never "close"), kept by http.client, never
        # reopened.
        assert response.getheader("Connection") == "keep-alive", step
        assert not response.will_close, step
        assert conn.sock is sock, f"{step}: http.client reconnected after {done}"
        done.append(step)
        return response, body

    full, body = send("full GET")
    assert full.status == 200 and body == data
    assert full.getheader("Content-Length") == str(size)
    assert full.getheader("Content-Range") is None
    etag = full.getheader("ETag")
    assert etag

    ranged, body = send("range 7-20", headers={"Range": "bytes=7-20"})
    assert ranged.status == 206 and body == data[7:21]
    assert ranged.getheader("Content-Length") == "14"
    assert ranged.getheader("Content-Range") == f"bytes 7-20/{size}"

    suffix, body = send("suffix range -10", headers={"Range": "bytes=-10"})
    assert suffix.status == 206 and body == data[-10:]
    assert suffix.getheader("Content-Length") == "10"
    assert suffix.getheader("Content-Range") == f"bytes {size - 10}-{size - 1}/{size}"

    head, body = send("HEAD", method="HEAD")
    assert head.status == 200 and body == b""
    assert head.getheader("Content-Length") == str(size)
    assert head.getheader("Content-Range") is None
    assert head.getheader("ETag") == etag

    cached, body = send("If-None-Match", headers={"If-None-Match": etag})
    assert cached.status == 304 and body == b""
    assert cached.getheader("Content-Length") is None
    assert cached.getheader("Content-Range") is None
    assert cached.getheader("ETag") == etag

    again, body = send("full GET again")
    assert again.status == 200 and body == data
    assert again.getheader("Content-Length") == str(size)
    assert again.getheader("Content-Range") is None

    conn.close()
    service.stop()
    log = service.log.read_text()
    unexpected = [line for line in log.splitlines() if not _CLEAN_LOG_LINE.match(line)]
    assert "Traceback" not in log and not unexpected, log
    assert "Booting worker" in log  # the check above read the right file


# --- crafted requests over raw sockets -------------------------------------------------------


def raw_exchange(service: Service, request: bytes) -> tuple[int, dict, bytes]:
    """Send `request` bytes on a fresh connection; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def chunked_upload(service: Service, chunks: bytes) -> bytes:
    return (
        b"POST /api/images/upload HTTP/1.1\r\nHost: localhost\r\n"
        + service.auth_header
        + b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks
    )


MULTIPART_START = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def assert_log_has_no_traceback(service: Service):
    log = service.log.read_text()
    assert "Traceback" not in log, log


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n" + MULTIPART_START + b"\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"%x\r\n" % len(MULTIPART_START) + MULTIPART_START + b"XX0\r\n\r\n",  # no terminator
        b"%x\r\n" % len(MULTIPART_START) + MULTIPART_START + b"\r\n0\r\nbad trailer\r\n\r\n",
        b"%x\r\n" % (len(MULTIPART_START) + 100) + MULTIPART_START,  # a chunk cut short
    ],
    ids=["size", "terminator", "trailer", "short"],
)
def test_malformed_chunked_bodies_are_a_400_and_no_traceback(service, chunks):
    status, headers, body = raw_exchange(service, chunked_upload(service, chunks))
    assert status == 400, body
    assert headers["content-type"] == "application/json" and json.loads(body)["code"]
    service.stop()
    assert_log_has_no_traceback(service)


def test_a_well_formed_chunked_upload_works(service):
    data = make_image()
    body, content_type = encode_multipart_formdata({"image": ("a.png", data, "image/png")})
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100])
        for i in range(0, len(body), 100)
    )
    request = (
        b"POST /api/images/upload HTTP/1.1\r\nHost: localhost\r\n"
        + service.auth_header
        + f"Content-Type: {content_type}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    status, _, answer = raw_exchange(service, request)
    assert status == 201, answer


def test_a_local_client_cannot_switch_links_to_https_without_proxy_hops(service):
    data = make_image()
    response = service.http.post(
        f"{service.url}/api/images/upload",
        files={"image": ("a.png", data)},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
        timeout=10,
    )
    assert response.status_code == 201
    assert response.json()["image"]["imageUrl"].startswith(f"http://127.0.0.1:{service.port}/")
    assert response.headers["Location"].startswith(f"http://127.0.0.1:{service.port}/")


def test_http_1_0_without_a_host_is_a_400_not_a_link_to_0_0_0_0(service):
    status, _, body = raw_exchange(service, b"GET /api/images HTTP/1.0\r\n\r\n")
    assert status == 400 and b"Host" in body
    assert b"0.0.0.0" not in body


def test_crafted_requests_get_4xx_json_and_leave_no_traceback(service):
    """The inputs an attack on `make run` tried, through gunicorn: each a JSON 4xx."""
    api = f"{service.url}/api/images"
    created = service.http.post(
        f"{api}/upload", files={"image": ("a.png", make_image())}, timeout=10
    ).json()["image"]
    download = f"{api}/{created['_id']}/download"
    overflowing_cursor = "OTk5OS0xMi0zMVQyMzo1OTo1OS0yMzo1OXxhYWFhYWFhYWFhYWFhYWFhYWFhYWFh"
    crafted = [
        ("GET", f"{api}?uploadedAfter=9999-12-31T23:59:59-23:59", {}, None),
        ("GET", f"{api}?uploadedBefore=0001-01-01T00:00:00%2B23:59", {}, None),
        ("GET", f"{api}?cursor={overflowing_cursor}", {}, None),
        ("GET", f"{api}?limit=99999999999999999999999", {}, None),
        ("GET", download, {"If-Match": '"stale"'}, None),
        ("GET", download, {"Range": "bytes=999999-"}, None),
        ("GET", f"{service.url}//api/images//{created['_id']}", {}, None),
        ("PUT", f"{api}/{created['_id']}", {"If-Match": 'W/"x"'}, {"image": ("b.png", b"GIF")}),
        ("POST", f"{api}/upload", {"Idempotency-Key": "x" * 300}, {"image": ("a.png", b"x")}),
        ("DELETE", f"{api}/{'f' * 24}", {}, None),
        ("POST", f"{api}/upload", {"Content-Type": "multipart/form-data; boundary="}, None),
    ]
    for method, url, headers, files in crafted:
        response = service.http.request(method, url, headers=headers, files=files, timeout=10)
        assert 400 <= response.status_code < 500, (method, url, response.status_code)
        assert response.headers["Content-Type"] == "application/json", (url, response.text)
        assert response.json()["code"], url
    # Names url_for reserves are ignored, and never reach a link.
    listing = service.http.get(f"{api}?limit=1&_external=0&_scheme=javascript", timeout=10)
    assert listing.status_code == 200 and "javascript" not in listing.headers.get("Link", "")
    ignored = service.http.get(
        download, headers={"If-Modified-Since": "x", "Range": "y"}, timeout=10
    )
    assert ignored.status_code == 200
    service.stop()
    assert_log_has_no_traceback(service)


def test_a_request_refused_at_its_headers_is_answered_before_its_body_arrives(service):
    """A refusal the headers decide (no key; a Content-Length over the limit) comes at once,
    so the client can stop sending; the body still sent is read afterwards, and the
    connection serves the next request. (Before, the service read up to the whole limit,
    31 MB, before it answered.)"""
    for credentials, length, status in (
        (b"", 2_000_000, b"401"),
        (service.auth_header, 40_000_000, b"413"),
    ):
        with (
            socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock,
            sock.makefile("rb") as reader,  # closed with the socket: the client is gone
        ):
            sock.sendall(
                b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\n" + credentials
                + b"Content-Type: multipart/form-data; boundary=b\r\n"
                + b"Content-Length: %d\r\n\r\n--b\r\n" % length
            )  # fmt: skip
            assert reader.readline().startswith(b"HTTP/1.1 " + status)  # with the body unsent
            while reader.readline() not in (b"\r\n", b""):
                pass
            if status == b"413":
                continue  # more than the service reads; gunicorn then closes the connection
            sock.sendall(b"x" * (length - 5))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            rest = reader.read()
            assert rest.count(b"HTTP/1.1 ") == 1 and b"HTTP/1.1 200" in rest, rest[:500]
    service.stop()
    assert_log_has_no_traceback(service)


REFUSED_BY_GUNICORN = {
    "request line": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "method": (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "version": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "header name": (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400, "bad_request"),
    # A signed URL with a space in its query: gunicorn logs the part after the space.
    "space in the query": (
        b"GET /api/images/x/download?disposition=in line&expires=9&signature=S1gnatur3 "
        b"HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    ),
    # A signed URL with a byte that is not ASCII: gunicorn logs the line it refuses.
    "byte in the query": (
        b"GET /api/images/x/download?expires=9&signature=S1gnatur3\xd9\xa3 HTTP/1.1\r\n"
        b"Host: x\r\n\r\n",
        400,
        "bad_request",
    ),
    "two lengths": (
        b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        "bad_request",
    ),
    "transfer coding": (
        b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        "bad_request",
    ),
    "long request line": (
        b"GET /api/images?cursor=" + b"x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "long header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(101))
        + b"\r\n",
        431,
        "headers_too_large",
    ),
    "expectation": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n",
        417,
        "expectation_failed",
    ),
}


def test_what_gunicorn_refuses_itself_is_json_and_documented(service):
    """gunicorn refuses what is not valid HTTP or is over its limits before the app sees
    it; the answer is the service's JSON, with its security headers, never gunicorn's HTML
    page, and the document lists each status with its code."""
    document = service.http.get(f"{service.url}/api/openapi.json", timeout=10).json()
    responses = document["paths"]["/api/images/{image_id}"]["get"]["responses"]
    for name, (request, status, code) in REFUSED_BY_GUNICORN.items():
        answered, headers, body = raw_exchange(service, request)
        assert answered == status, (name, body)
        assert headers["content-type"] == "application/json", (name, body)
        assert headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert int(headers["content-length"]) == len(body)
        refusal = json.loads(body)
        assert refusal["code"] == code and refusal["message"], name
        assert len(refusal["message"]) <= 200  # never the whole 5000-byte line echoed
        schema = responses[str(status)]["content"]["application/json"]["schema"]
        assert code in schema["properties"]["code"]["enum"] or schema == {
            "$ref": "#/components/schemas/Error"
        }, (name, schema)
    # Under the limits, the service answers itself.
    assert (
        service.http.get(f"{service.url}/api/images?cursor={'x' * 3000}", timeout=10).status_code
        == 400
    )
    service.stop()
    assert_log_has_no_traceback(service)
    log = service.log.read_text()
    assert "Invalid request" in log and "?[query removed]" in log  # logged, without its query
    assert "S1gnatur3" not in log


def _exits(command: list[str], service: Service) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=service.env, capture_output=True, text=True, timeout=60
    )


def test_a_bad_setting_stops_gunicorn_and_flask_commands_with_one_line(tmp_path):
    """A wrong setting names itself in one line, not a traceback: for gunicorn's master
    (which reads the settings), for `flask` commands (which build the app), and for
    gunicorn's workers when only building the app finds it (then gunicorn stops, as for
    any worker that cannot boot, instead of starting it again and again)."""
    # Where gunicorn.conf.py makes the workers' metrics directory: none may be left behind
    # by a start that stopped (one was, at every refused start).
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    malformed = Service(tmp_path / "data", {"MAX_UPLOAD_BYTES": "lots", "TMPDIR": str(temporary)})
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    for command in (
        [gunicorn, "--config", "gunicorn.conf.py", "wsgi:app"],
        [sys.executable, "-m", "flask", "--app", "image_api", "keys", "list"],
        [sys.executable, "-m", "flask", "--app", "image_api", "nginx-config"],
    ):
        result = _exits(command, malformed)
        assert result.returncode == 1, result.stderr
        assert "MAX_UPLOAD_BYTES must be an integer, got 'lots'" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    unusable = Service(not_a_directory, {"WEB_CONCURRENCY": "1", "TMPDIR": str(temporary)})
    listed = _exits([sys.executable, "-m", "flask", "--app", "image_api", "keys", "list"], unusable)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    assert f"DATA_DIR {not_a_directory} cannot be used" in listed.stderr
    served = _exits([gunicorn, "--config", "gunicorn.conf.py", "wsgi:app"], unusable)
    assert served.returncode == 3 and f"DATA_DIR {not_a_directory}" in served.stderr
    data = tmp_path / "short-secret"
    data.mkdir()
    (data / "secret-key").write_text("too short")
    # One worker: with two, gunicorn's master can itself fail on the second one's exit
    # while it stops (its own traceback, status 1).
    one_worker = Service(data, {"WEB_CONCURRENCY": "1", "TMPDIR": str(temporary)})
    short = _exits([gunicorn, "--config", "gunicorn.conf.py", "wsgi:app"], one_worker)
    assert short.returncode == 3, short.stderr  # gunicorn's "worker failed to boot"
    assert f"{data / 'secret-key'} must hold at least 32 characters" in short.stderr
    assert list(temporary.iterdir()) == []


def wait_for(condition, what: str, log: Path, seconds: float = 60) -> None:
    """Poll `condition` until it holds; fail with gunicorn's log if it never does."""
    for _ in range(int(seconds * 20)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never happened:\n{log.read_text()}")


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_reload_with_a_broken_env_file_is_refused_and_serving_goes_on(tmp_path):
    """SIGHUP runs gunicorn.conf.py again: a mistake in .env made it exit, and the running
    service with it. Now the reload is refused in one line, the workers serve on, and a
    worker gunicorn starts again meanwhile (one died) takes the settings that were checked,
    not the broken file. A valid .env reloads as before."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("image_api", "gunicorn.conf.py", "wsgi.py"):
        (checkout / name).symlink_to(ROOT / name)
    port = free_port()
    env_file = checkout / ".env"
    env_file.write_text(f"PORT={port}\nDATA_DIR={tmp_path / 'data'}\nWEB_CONCURRENCY=1\n")
    environment = {k: v for k, v in os.environ.items() if k not in ("PORT", "DATA_DIR")}
    log = tmp_path / "gunicorn.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        master = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
            cwd=checkout, env=environment, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: answers(f"{url}/healthz"), "gunicorn serving", log)
        key = (tmp_path / "data" / "admin-key").read_text().strip()

        def upload() -> requests.Response:
            return requests.post(
                f"{url}/api/images/upload",
                files={"image": ("a.png", make_image(), "image/png")},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )

        env_file.write_text(env_file.read_text() + "READ_ONLY=maybe\n")
        master.send_signal(signal.SIGHUP)
        refused = "reload refused, serving on as before: READ_ONLY must be true or false"
        wait_for(lambda: refused in log.read_text(), "the refusal", log)
        assert master.poll() is None and upload().status_code == 201
        (worker,) = worker_pids(master.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(
            lambda: worker_pids(master.pid) not in ([], [worker]) and answers(f"{url}/healthz"),
            "a new worker serving",
            log,
        )
        assert upload().status_code == 201  # the checked settings, not READ_ONLY=maybe

        # What only starting the service finds (found by the second outside attack): each
        # stopped gunicorn, or moved it to every default setting.
        good = env_file.read_text().replace("READ_ONLY=maybe\n", "")
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        for change, problem in (
            (lambda: env_file.write_bytes(good.encode() + b"NAME=caf\xe9\n"), "cannot be read"),
            (
                lambda: env_file.write_text(f"{good}DATA_DIR={shared}\n"),
                "may be written by every user",
            ),
            (lambda: env_file.rename(tmp_path / "moved.env"), "is gone"),
        ):
            change()
            master.send_signal(signal.SIGHUP)
            wait_for(lambda p=problem: p in log.read_text(), f"the refusal ({problem})", log)
            assert master.poll() is None and upload().status_code == 201
        env_file.write_text(good + "READ_ONLY=maybe\n")

        env_file.write_text(env_file.read_text().replace("maybe", "true"))
        master.send_signal(signal.SIGHUP)
        wait_for(lambda: upload().status_code == 503, "READ_ONLY=true taking effect", log)
        assert upload().json()["code"] == "read_only"
        master.send_signal(signal.SIGTERM)
        assert master.wait(60) == 0
        assert "Traceback" not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)
        master.wait(10)
