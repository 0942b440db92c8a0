"""One JSON log line per request, with the request's id (the client's when well formed,
echoed), its route, status, duration, bytes and key name; errors logged once with their
request id and stack trace; never a secret or a signed URL's signature."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from image_api.logs import BufferedHandler, JsonFormatter
from tests.helpers import Faulty, ImagesClient, Service, make_image

FORMAT = JsonFormatter()


def lines(caplog, logger="image_api.requests") -> list[dict]:
    return [json.loads(FORMAT.format(r)) for r in caplog.records if r.name == logger]


@pytest.fixture
def client(make_app, tmp_path):
    return make_app({"DATA_DIR": str(tmp_path)}).test_client()


def test_each_request_is_one_line_with_its_route_status_bytes_key_and_id(client, caplog):
    caplog.set_level(logging.INFO, logger="image_api.requests")
    image = ImagesClient(client).create(make_image(), filename="a.png")
    caplog.clear()
    response = client.get(f"/api/images/{image['_id']}", headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    (line,) = lines(caplog)
    assert line["message"] == "request" and line["level"] == "info"
    assert line["method"] == "GET"
    assert line["route"] == "/api/images/<id:image_id>"
    assert line["path"] == f"/api/images/{image['_id']}"
    assert line["status"] == 200
    assert line["bytes_out"] == len(response.data) and line["bytes_in"] is None
    assert line["key"] == "admin"
    assert line["request_id"] == "trace-42"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", "ünïcode"])
def test_a_malformed_request_id_is_replaced(client, caplog, given):
    caplog.set_level(logging.INFO, logger="image_api.requests")
    response = client.get("/healthz", headers={"X-Request-ID": given})
    made = response.headers["X-Request-ID"]
    assert made != given and len(made) == 32 and int(made, 16) >= 0
    assert lines(caplog)[-1]["request_id"] == made


def test_refused_and_unrouted_requests_are_logged_too(client, caplog):
    caplog.set_level(logging.INFO, logger="image_api.requests")
    anonymous = client.application.test_client(key=None)
    anonymous.get("/api/images")
    client.get("/nowhere")
    refused, unrouted = lines(caplog)
    assert (refused["status"], refused["key"], refused["route"]) == (401, None, "/api/images")
    assert (unrouted["status"], unrouted["route"]) == (404, None)


def test_a_non_ascii_path_is_logged_as_sent(client, caplog):
    """WSGI hands the path's bytes over as latin-1: the line has the UTF-8 the client sent,
    and bytes that are not UTF-8 as replacement characters."""
    caplog.set_level(logging.INFO, logger="image_api.requests")
    client.get("/api/images/caf%C3%A9")
    client.get("/api/images/%FF")
    utf8, invalid = lines(caplog)
    assert utf8["path"] == "/api/images/café" and utf8["status"] == 404
    assert invalid["path"] == "/api/images/\ufffd"


def test_a_signed_download_is_logged_without_its_query(client, caplog):
    caplog.set_level(logging.INFO, logger="image_api.requests")
    image = ImagesClient(client).create()
    anonymous = client.application.test_client(key=None)
    assert anonymous.get(image["imageUrl"]).status_code == 200
    text = "\n".join(FORMAT.format(r) for r in caplog.records)
    assert "signature" not in text and "expires" not in text
    assert image["imageUrl"].rpartition("=")[2] not in text


def test_an_error_is_logged_once_with_its_request_id_and_stack(client, caplog):
    service = client.application.extensions["image_api"]
    service.repository = Faulty(service.repository, "list_page", error=RuntimeError("boom"))
    caplog.set_level(logging.INFO)
    response = client.get("/api/images", headers={"X-Request-ID": "broken-1"})
    assert response.status_code == 500 and response.get_json()["code"] == "internal_error"
    errors = [json.loads(FORMAT.format(r)) for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "broken-1"
    assert "Traceback" in errors[0]["error"] and "RuntimeError: boom" in errors[0]["error"]
    assert lines(caplog)[-1]["status"] == 500
    assert "boom" not in response.get_data(as_text=True)


def test_under_gunicorn_every_line_is_json_and_holds_no_secret(tmp_path):
    service = Service(tmp_path / "data")
    service.start()
    try:
        image = service.http.post(
            f"{service.url}/api/images/upload", files={"image": ("a.png", make_image())}
        ).json()["image"]
        service.http.get(image["imageUrl"], headers={"X-Request-ID": "from-client"})
    finally:
        service.stop()
    log = service.log.read_text()
    ours = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_ = [line for line in ours if line["message"] == "request"]
    upload = next(line for line in requests_ if line["method"] == "POST")
    assert (upload["route"], upload["status"], upload["key"]) == (
        "/api/images/upload",
        201,
        "admin",
    )
    assert upload["bytes_in"] > 0
    download = next(line for line in requests_ if line["request_id"] == "from-client")
    assert download["status"] == 200 and download["bytes_out"] == image["size"]
    assert service.key not in log and "signature" not in log
    # gunicorn's own lines (start, workers, stop) are the only ones not in JSON.
    assert all("[INFO]" in line for line in log.splitlines() if not line.startswith("{"))


def buffered(**options) -> tuple[logging.Logger, io.StringIO, BufferedHandler]:
    stream = io.StringIO()
    handler = BufferedHandler(stream, **options)
    logger = logging.Logger(f"buffered-{id(stream)}")  # not registered: no other handlers
    logger.addHandler(handler)
    return logger, stream, handler


def test_buffered_lines_wait_for_a_flush_and_keep_their_order():
    logger, stream, handler = buffered(interval=3600)
    logger.info("one")
    logger.info("two")
    assert stream.getvalue() == ""
    handler.flush()
    assert stream.getvalue() == "one\ntwo\n"
    handler.flush()  # nothing waiting: nothing written twice
    assert stream.getvalue() == "one\ntwo\n"


def test_a_warning_is_written_at_once_after_the_lines_before_it():
    logger, stream, _ = buffered(interval=3600)
    logger.info("before")
    logger.warning("trouble")
    assert stream.getvalue() == "before\ntrouble\n"


def test_lines_are_written_when_the_buffer_is_full():
    logger, stream, _ = buffered(capacity=10, interval=3600)
    logger.info("12345")
    assert stream.getvalue() == ""
    logger.info("67890")  # 12 characters with the newlines: over the capacity
    assert stream.getvalue() == "12345\n67890\n"


def test_waiting_lines_are_written_within_the_interval_and_at_close():
    logger, stream, _ = buffered(interval=0.01)
    logger.info("soon")
    deadline = time.monotonic() + 10
    while stream.getvalue() == "" and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert stream.getvalue() == "soon\n"
    closing, closing_stream, closing_handler = buffered(interval=3600)
    closing.info("last")
    closing_handler.close()
    assert closing_stream.getvalue() == "last\n"
