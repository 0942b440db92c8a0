"""Logs: one JSON line per request, and every other line of the service in JSON too, each
with the id of the request it belongs to.

The request id is the client's `X-Request-ID` when it is well formed (a proxy or a caller
tracing a request across services), else a new one; it is echoed on the response. The
request line names the route's pattern and the path, never the query (a signed URL's
signature is in it), and an API key by its name, never its secret.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

from . import metrics

#: What a client's X-Request-ID may be; anything else is replaced by a new id.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
#: Where the app notes what the request line needs that only it knows (route, key, client).
ENVIRON_INFO = "image_api.log"
#: Longest path logged (a client chooses it).
_MAX_PATH = 512

_current_id: ContextVar[str | None] = ContextVar("image_api_request_id", default=None)

requests_log = logging.getLogger("image_api.requests")


def request_id() -> str | None:
    """The id of the request being handled, if any."""
    return _current_id.get()


class RequestLog:
    """WSGI middleware, outermost: the request id, and one line per request once the app
    has answered (the duration is to the response's start: downloads stream afterwards,
    and wrapping their body would cost gunicorn its sendfile)."""

    def __init__(self, app, monotonic: Callable[[], float] = time.monotonic):
        self.app = app
        self.monotonic = monotonic

    def __call__(self, environ, start_response):
        started = self.monotonic()
        given = environ.get("HTTP_X_REQUEST_ID")
        rid = given if given and _REQUEST_ID.fullmatch(given) else secrets.token_hex(16)
        info: dict = {}
        environ[ENVIRON_INFO] = info
        answer: list = []  # the status line and headers, read once the app has answered

        def start(status, headers, exc_info=None):
            answer[:] = (status, headers)
            headers.append(("X-Request-ID", rid))
            return start_response(status, headers, exc_info)

        token = _current_id.set(rid)
        try:
            return self.app(environ, start)
        finally:
            _current_id.reset(token)
            seconds = self.monotonic() - started
            status, headers = answer or (None, ())
            length = environ.get("CONTENT_LENGTH") or ""
            fields = {
                "method": environ.get("REQUEST_METHOD"),
                "route": info.get("route"),
                "path": _path(environ),
                "status": int(status[:3]) if status else None,
                "duration_ms": round(seconds * 1000, 2),
                "bytes_in": int(length) if length.isdigit() else None,
                "bytes_out": _content_length(headers),
                "key": info.get("key"),
                "client": info.get("client", environ.get("REMOTE_ADDR")),
                "request_id": rid,
            }
            if requests_log.isEnabledFor(logging.INFO):
                # Handed to the handlers directly: Logger.info would also walk the stack
                # for a caller the line does not show.
                requests_log.handle(
                    requests_log.makeRecord(
                        requests_log.name, logging.INFO, __file__, 0, "request", (), None,
                        extra={"fields": fields},
                    )
                )  # fmt: skip
            metrics.observe_request(fields, seconds)


def _path(environ) -> str:
    """The path as the client sent it: WSGI hands its bytes over as latin-1, so a UTF-8
    name (`/api/images/café`) would be logged as mojibake (`cafÃ©`)."""
    path = environ.get("PATH_INFO", "")[:_MAX_PATH]
    if path.isascii():
        return path
    return path.encode("latin-1", "replace").decode("utf-8", "replace")


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)
    return None


def _stamped(factory):
    """Log records made during a request carry its id, whenever they are formatted."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.request_id = _current_id.get()
        return record

    make.stamps_request_ids = True
    return make


if not getattr(logging.getLogRecordFactory(), "stamps_request_ids", False):
    logging.setLogRecordFactory(_stamped(logging.getLogRecordFactory()))


class WithoutQueries(logging.Filter):
    """gunicorn's own lines quote what a client sent: a request line it refuses, the URI of
    a request that failed. Their query strings (which hold signed URLs' signatures) are
    left out, as the service's own lines never log one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message or "=" in message:
            message = _QUERY.sub("?[query removed]", message)
            record.msg, record.args = _SIGNATURE.sub(r"\1[redacted]", message), ()
        return True


#: A query string, up to where gunicorn's quoting of it ends.
_QUERY = re.compile(r"\?[^\s'\"]+")
#: A signature outside of it (a request line split at a space inside its query).
_SIGNATURE = re.compile(r"((?:signature|x-amz-signature|x-amz-credential)=)[^\s&'\"]*", re.I)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, the request's id when
    there is one, the record's `fields`, and the stack trace of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        elif (rid := getattr(record, "request_id", None)) is not None:
            line["request_id"] = rid
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class BufferedHandler(logging.StreamHandler):
    """A stream handler that writes lines in batches, as nginx's `access_log ... buffer`
    does: a write (and flush) per request cost more than formatting the line.

    Lines wait at most `interval` seconds (a thread of the process writes them), or until
    `capacity` characters are waiting; a warning or an error is written at once, after
    the lines before it. What is waiting is written at exit (`logging.shutdown`) and
    before a fork; a process killed outright loses at most `interval` seconds of lines.
    """

    def __init__(self, stream=None, capacity: int = 64 * 1024, interval: float = 1.0):
        super().__init__(stream)
        self.capacity = capacity
        self.interval = interval
        self._waiting: list[str] = []
        self._size = 0
        self._writer_pid: int | None = None  # the process whose thread writes: not a fork's
        self._wake = threading.Event()
        os.register_at_fork(before=self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around emit.
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own rule: report, never raise
            self.handleError(record)
            return
        self._waiting.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.capacity:
            self._write()
        elif self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            threading.Thread(target=self._write_every_interval, daemon=True).start()

    def flush(self) -> None:
        with self.lock:
            self._write()

    def close(self) -> None:
        self.flush()
        self._wake.set()
        super().close()

    def _write(self) -> None:
        if self._waiting:
            text = "".join(self._waiting)
            self._waiting.clear()
            self._size = 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:  # noqa: BLE001 - a closed or full stream must not fail a request
                self.handleError(logging.makeLogRecord({"msg": "buffered log lines"}))

    def _write_every_interval(self) -> None:
        while not self._wake.wait(self.interval):
            self.flush()
