"""The OpenAPI document as a contract every in-process request of the suite is held to.

`watch()` connects to Flask's request signals: each request records the query parameters
and request headers the code reads, and each response of a documented operation is checked
against the app's own document: its status is documented, its JSON body (or image media
type) is what that status promises, every header it sets is documented, and every query
parameter and request header the code read is a documented parameter. Problems are kept
per test; the `_contract` fixture in conftest fails the test that caused them.
"""

from __future__ import annotations

import json

from flask import Flask, request, request_finished, request_started
from jsonschema import Draft202012Validator, FormatChecker
from werkzeug.datastructures import EnvironHeaders, ImmutableMultiDict

from image_api.api.openapi import build_document, path_template
from image_api.service import EXTENSION

#: Headers any response or request may carry without being a documented parameter.
GENERIC_RESPONSE_HEADERS = {"content-type", "content-length"}
GENERIC_REQUEST_HEADERS = {
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    # The CORS protocol's (flask-cors reads them on every request when CORS_ORIGINS is set).
    "origin",
    "access-control-request-method",
    "access-control-request-headers",
    "access-control-request-private-network",
}

problems: list[str] = []
_documents: dict[tuple, dict] = {}


def document_of(app: Flask) -> dict:
    """The app's document. Building one takes ~15 ms and the suite makes hundreds of apps,
    so documents are shared between apps alike in all that `build_document` reads: the
    routes and the views' declarations."""
    key = tuple(
        sorted(
            (
                rule.rule,
                rule.endpoint,
                tuple(sorted(rule.methods)),
                id(app.view_functions[rule.endpoint]),
            )
            for rule in app.url_map.iter_rules()
        )
    )
    document = _documents.get(key)
    if document is None:
        document = _documents[key] = build_document(app)
    return document


def operation_of(app: Flask, rule: str, method: str) -> dict | None:
    """The documented operation for a URL rule and method, or None."""
    return document_of(app)["paths"].get(path_template(rule), {}).get(method.lower())


class _RecordingEnviron(dict):
    """The request's environ, noting each HTTP_* key the code looks up."""

    def __init__(self, environ: dict):
        super().__init__(environ)
        self.read: set[str] = set()

    def _note(self, key):
        if isinstance(key, str) and key.startswith("HTTP_"):
            self.read.add(key[5:].replace("_", "-").lower())

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)


class _RecordingArgs(ImmutableMultiDict):
    """The query string, noting each parameter the code looks up."""

    read: set[str]

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None, type=None):
        self.read.add(key)
        return super().get(key, default, type)

    def getlist(self, key, type=None):
        self.read.add(key)
        return super().getlist(key, type)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _ours(app: Flask) -> bool:
    return EXTENSION in app.extensions  # not moto's server, a Flask app too


def _started(app: Flask, **_extra) -> None:
    if not _ours(app):
        return
    environ = _RecordingEnviron(request.environ)
    request.environ = environ
    request.headers = EnvironHeaders(environ)
    args = _RecordingArgs(request.args)
    args.read = set()
    request.__dict__["args"] = args


def _finished(app: Flask, response, **_extra) -> None:
    rule = request.url_rule
    if rule is None or not _ours(app):
        return
    operation = operation_of(app, rule.rule, request.method)
    if operation is None:
        return
    label = f"{request.method} {rule.rule} -> {response.status_code}"
    problems.extend(f"{label}: {problem}" for problem in check(app, operation, response))


def check(app: Flask, operation: dict, response) -> list[str]:
    """What in this request and response the document does not describe."""
    found = []
    parameters = {(p["in"], p["name"].lower()) for p in operation["parameters"]}
    if operation.get("security"):
        # The document's security schemes name these headers, not its parameters.
        parameters |= {("header", "authorization"), ("header", "x-api-key")}
    environ = request.environ
    if isinstance(environ, _RecordingEnviron):
        for header in sorted(environ.read - GENERIC_REQUEST_HEADERS):
            if ("header", header) not in parameters:
                found.append(f"reads request header {header!r}, not a documented parameter")
    args = request.__dict__.get("args")
    if isinstance(args, _RecordingArgs):
        for name in sorted(args.read):
            if ("query", name.lower()) not in parameters:
                found.append(f"reads query parameter {name!r}, not a documented parameter")

    documented = operation["responses"].get(str(response.status_code))
    if documented is None:
        return [*found, f"status {response.status_code} is not documented"]
    headers = {name.lower() for name in documented.get("headers", {})}
    headers |= {name.lower() for name in document_of(app).get("x-every-response-headers", {})}
    # Iterating Werkzeug's Headers gives (name, value) pairs: keys() gives names.
    for name in sorted({name.lower() for name in response.headers.keys()}):  # noqa: SIM118
        if name not in headers and name not in GENERIC_RESPONSE_HEADERS:
            found.append(f"sets header {name!r}, not documented for this status")
    content = documented.get("content")
    if request.method == "HEAD" or response.status_code == 304:
        return found
    if content is None:
        if response.content_length:
            found.append("has a body where the document gives none")
        return found
    media = response.mimetype
    if media not in content:
        return [*found, f"is {media!r}, not one of {sorted(content)}"]
    if media == "application/json":
        validator = _validator(document_of(app), content[media]["schema"])
        body = json.loads(response.get_data())
        found += [
            f"body {error.json_path}: {error.message}" for error in validator.iter_errors(body)
        ]
    return found


_validators: dict[int, tuple[dict, Draft202012Validator]] = {}


def _validator(document: dict, schema: dict) -> Draft202012Validator:
    """A validator for one response schema of `document`, made once."""
    known = _validators.get(id(schema))
    if known is None or known[0] is not schema:
        resolvable = {**schema, "components": document["components"]}
        validator = Draft202012Validator(resolvable, format_checker=FormatChecker())
        known = _validators[id(schema)] = (schema, validator)
    return known[1]


def watch() -> None:
    """Hold every request of every app in this process to its document."""
    request_started.connect(_started)
    request_finished.connect(_finished)


def unwatch() -> None:
    request_started.disconnect(_started)
    request_finished.disconnect(_finished)
