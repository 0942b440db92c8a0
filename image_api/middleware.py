"""WSGI middleware: what the request looks like before Flask sees it (PUBLIC_URL, a body
the server cannot read), and headers every response carries, whoever answered it."""

from __future__ import annotations

from urllib.parse import urlsplit

from werkzeug.exceptions import BadRequest


class PublicUrl:
    """Every request is seen as addressed to `url` (scheme, host, port and path prefix), so
    links never come from the client's Host or X-Forwarded-* headers."""

    def __init__(self, app, url: str):
        self.app = app
        parts = urlsplit(url)
        self.scheme, self.host, self.prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")

    def __call__(self, environ, start_response):
        environ["wsgi.url_scheme"] = self.scheme
        environ["HTTP_HOST"] = self.host
        environ["SCRIPT_NAME"] = self.prefix
        environ.pop("HTTP_X_FORWARDED_HOST", None)
        return self.app(environ, start_response)


class ReadableBody:
    """A request body the server cannot decode is the client's error: a 400.

    gunicorn parses chunked bodies while the app reads them, and raises its own
    exceptions (an invalid chunk size, a missing terminator, a bad trailer) from
    `wsgi.input.read()`, deep inside the multipart parser: they would be 500s.

    And a body the app did not read (a request refused for its key or route) is read to
    its end, up to `drain_limit` bytes, once the response is sent: gunicorn would
    otherwise take the rest of the body for the next request on the connection and close
    it without saying so, and nginx, which keeps connections to gunicorn open, sent
    another client's request down that closed connection (a 502, then a 503 for that
    client). After the response, not before: a client refused at its headers (a 401, a
    413 by Content-Length) hears so at once, and can stop sending.
    """

    def __init__(self, app, drain_limit: int):
        self.app = app
        self.drain_limit = drain_limit

    def __call__(self, environ, start_response):
        has_body = environ.get("CONTENT_LENGTH", "0") not in ("", "0") or environ.get(
            "HTTP_TRANSFER_ENCODING"
        )
        if not (has_body and "wsgi.input" in environ):
            return self.app(environ, start_response)
        stream = environ["wsgi.input"] = _Input(environ["wsgi.input"])
        return _DrainedWhenSent(self.app(environ, start_response), stream, self.drain_limit)


class _DrainedWhenSent:
    """A response whose request body is read to its end (up to `limit` bytes) when the
    server closes it, which it does once the response is sent."""

    def __init__(self, result, stream: _Input, limit: int):
        self._result, self._stream, self._limit = result, stream, limit

    def __iter__(self):
        return iter(self._result)

    def close(self) -> None:
        try:
            if hasattr(self._result, "close"):
                self._result.close()
        finally:
            try:
                left = self._limit
                while left > 0 and (chunk := self._stream.read(min(left, _DRAIN_CHUNK))):
                    left -= len(chunk)
            except BadRequest:
                pass  # a body that does not parse, or a client gone: gunicorn closes anyway


_DRAIN_CHUNK = 64 * 1024


class _Input:
    """The server's input stream, with its read methods (only those it has: Werkzeug looks
    for `readinto`) turning any error into a 400."""

    _READS = frozenset({"read", "readline", "readlines", "readinto"})

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        attribute = getattr(self._stream, name)
        if name not in self._READS:
            return attribute

        def guarded(*args):
            try:
                return attribute(*args)
            except BadRequest:
                raise
            except Exception as error:  # noqa: BLE001 - whatever the server raises, see above
                raise BadRequest(f"The request body is malformed: {error}") from None

        return guarded

    def __iter__(self):
        return iter(self.readline, b"")


#: Where the app queues headers for `ResponseHeaders` to add (see `queue_headers`).
QUEUED_HEADERS = "image_api.headers"


def queue_headers(environ: dict, headers: dict[str, str]) -> None:
    """Headers for this request's response, whatever answers it (a view or an error)."""
    environ[QUEUED_HEADERS].extend(headers.items())


class ResponseHeaders:
    """Headers added to the list the server is given, outside Flask: an error answered
    before any view (a 404, a 413) gets them too, and a response pays one pass over its
    headers instead of Werkzeug's checks on each.

    Every response: never sniffed, never sends a Referer onward; JSON also never runs or
    frames as a page. A response that set one of these itself (downloads, the docs page)
    keeps its own. And what the app queued for the request (`queue_headers`: the rate
    limit's).
    """

    HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))
    JSON_POLICY = "default-src 'none'; frame-ancestors 'none'"

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        # Made here, not on first use: a copy of the environ made on the way in (a test's
        # recorder) shares the list.
        queued: list[tuple[str, str]] = []
        environ[QUEUED_HEADERS] = queued

        def start(status, headers, exc_info=None):
            present = {name.lower(): value for name, value in headers}
            for name, value in self.HEADERS:
                if name.lower() not in present:
                    headers.append((name, value))
            if "content-security-policy" not in present and present.get(
                "content-type", ""
            ).startswith("application/json"):
                headers.append(("Content-Security-Policy", self.JSON_POLICY))
            headers.extend(queued)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
