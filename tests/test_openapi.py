"""The OpenAPI document: valid, complete both ways, every documented status reachable, and
served with Swagger UI. (Every response of the whole suite is also checked against it:
`tests.contract`.)"""

from __future__ import annotations

import io
import re
from urllib.parse import urlsplit

import mongomock
import pytest
from flask import Blueprint
from moto import mock_aws
from openapi_spec_validator import validate

from image_api import errors
from image_api.api.openapi import EXAMPLE_HOST, build_document, operation_id, path_template
from image_api.records import Claim
from tests.conftest import build_app
from tests.helpers import ROOT, Faulty, ImagesClient, image_form, make_image

AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask answers these for every route


@pytest.fixture
def document(make_app, tmp_path):
    """The document as /api/openapi.json serves it."""
    response = make_app({"DATA_DIR": str(tmp_path / "doc")}).test_client().get("/api/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any error


def test_every_route_is_documented_and_nothing_else(app, document):
    """Routes and methods in the code and in the document are the same set, path
    parameters included; only the pages (the docs and the gallery) and their files are
    left out, on purpose."""
    in_code = {}
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        if view.openapi is None:
            assert rule.rule.startswith(("/api/docs", "/gallery/")) or rule.rule == "/", rule.rule
            continue
        path = path_template(rule.rule)
        methods = rule.methods - AUTOMATIC | ({"HEAD"} if view.openapi.head else set())
        for method in methods:
            in_code[(path, method.lower())] = (operation_id(view, method), set(rule.arguments))
    in_document = {
        (path, method): (
            operation["operationId"],
            {p["name"] for p in operation["parameters"] if p["in"] == "path"},
        )
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert in_code == in_document


def test_a_route_without_a_description_stops_the_build(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path)})
    extra = Blueprint("extra", __name__)
    extra.add_url_rule("/api/extra", "extra", lambda: "")
    app.register_blueprint(extra)
    with pytest.raises(LookupError, match="/api/extra"):
        build_document(app)


def test_query_parameters_come_from_the_schemas_the_views_load(document):
    def query(path, method="get"):
        operation = document["paths"][path][method]
        return {p["name"] for p in operation["parameters"] if p["in"] == "query"}

    assert query("/api/images") == {
        "limit",
        "cursor",
        "contentType",
        "uploadedAfter",
        "uploadedBefore",
        "owner",
    }
    assert query("/api/images/{image_id}/download") == {
        "disposition",
        "expires",
        "signature",
        *("w", "h", "fit", "format", "q", "upscale"),
    }
    limit = next(
        p for p in document["paths"]["/api/images"]["get"]["parameters"] if p["name"] == "limit"
    )
    assert limit["schema"] == {"type": "integer", "default": 50, "minimum": 1, "maximum": 1000}


def test_the_error_codes_are_every_error_class_and_werkzeugs(document):
    codes = document["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert set(codes) == (
        {cls.code for cls in errors.api_errors()}
        | set(errors._HTTP_CODES.values())
        | {"http_error"}
    )
    assert "range_not_satisfiable" in codes and "internal_error" in codes


def test_a_new_error_class_is_in_the_enum_without_touching_the_document(make_app, tmp_path):
    class Teapot(errors.ApiError):
        status, code, message = 418, "teapot", "I'm a teapot"

    try:
        app = make_app({"DATA_DIR": str(tmp_path)})
        codes = build_document(app)["components"]["schemas"]["Error"]["properties"]["code"]
        assert "teapot" in codes["enum"]
    finally:
        del Teapot  # keep the subclass list as it was for other tests
        import gc

        gc.collect()


def test_errors_are_listed_with_their_codes_and_examples(document):
    upload = document["paths"]["/api/images/upload"]["post"]["responses"]
    media = upload["422"]["content"]["application/json"]
    assert media["schema"]["properties"]["code"]["enum"] == [
        "idempotency_key_reused",
        "image_too_large",
        "invalid_image",
    ]
    assert media["examples"]["invalid_image"]["value"] == {
        "message": errors.InvalidImage.message,
        "code": "invalid_image",
    }
    assert "Retry-After" in upload["503"]["headers"]
    assert set(
        upload["503"]["content"]["application/json"]["schema"]["properties"]["code"]["enum"]
    ) == {"backend_unavailable", "decoder_busy", "read_only"}


def test_the_examples_are_what_the_service_answers(client, document):
    """Each example validates (the suite's contract check would refuse it otherwise) and has
    exactly the shape of a real response."""
    real = ImagesClient(client).upload(make_image(), "hopper.jpg").get_json()
    example = document["paths"]["/api/images/upload"]["post"]["responses"]["201"]["content"][
        "application/json"
    ]["example"]
    assert list(example) == list(real)
    assert list(example["image"]) == list(real["image"])
    assert example["image"]["imageUrl"].startswith(EXAMPLE_HOST + "/api/images/")
    page = document["paths"]["/api/images"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["example"]
    assert list(page) == list(client.get("/api/images").get_json())


def test_upload_links_lead_to_the_image_operations(document):
    links = document["paths"]["/api/images/upload"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {
        "getImage",
        "replaceImage",
        "downloadImage",
        "downloadImageHead",
        "deleteImage",
    }
    assert all(
        link["parameters"] == {"image_id": "$response.body#/image/_id"} for link in links.values()
    )


# --- every documented status can be produced ------------------------------------------------


def _probes(client, service, image_id, redirect_client, redirect_id):
    """Requests that together produce each documented status of each operation.

    500 is left out: it is a bug by definition, so no request may cause it on purpose
    (its shape is tested in test_hardening with an injected fault). So are 414, 417 and
    431, which gunicorn answers before the app sees the request (test_gunicorn).
    """
    url, download = f"/api/images/{image_id}", f"/api/images/{image_id}/download"
    missing = "0" * 24
    etag = client.get(url).headers["ETag"]
    download_etag = client.get(download).headers["ETag"]
    signed = urlsplit(client.get(url).get_json()["imageUrl"])
    signed_url = f"{signed.path}?{signed.query}"
    bad_host = {"Host": "bad host"}
    unroutable = {"Host": "a" * 300}  # Werkzeug cannot route it: probes answer 400 too
    nobody = client.application.test_client(key=None)
    reader = client.application.test_client(key=_reader_key(service))

    def big():
        return {"image": (io.BytesIO(b"\0" * (service.settings.max_upload_bytes + 1)), "a.png")}

    def downloads(method):
        """The same probes for GET and HEAD of a download."""
        call, anonymous = getattr(client, method), getattr(nobody, method)

        def unrenderable():
            # A stored file damaged behind the service's back cannot give a variant: 422.
            other = ImagesClient(client).create()["_id"]
            record = service.repository.get(other)
            service.storage.put(record.key, io.BytesIO(make_image()[:60]), record.content_type)
            return call(f"/api/images/{other}/download?w=8")

        redirected = getattr(redirect_client, method)
        return [
            lambda: call(download),
            lambda: anonymous(download),
            lambda: call(download, headers={"Range": "bytes=0-9"}),
            lambda: redirected(f"/api/images/{redirect_id}/download"),
            lambda: call(download, headers={"If-None-Match": download_etag}),
            lambda: anonymous(signed_url.replace("expires=", "expires=1")),  # tampered: 403
            lambda: call(download + "?disposition=bogus"),
            lambda: call(f"/api/images/{missing}/download"),
            lambda: call(download, headers={"If-Match": '"stale"'}),
            lambda: call(download, headers={"Range": "bytes=99999999-"}),
            unrenderable,
            ("broken", "get", lambda: call(download)),
        ]

    return {
        ("post", "/api/images/upload"): [
            lambda: client.post("/api/images/upload", data=image_form()),
            lambda: nobody.post("/api/images/upload", data=image_form()),
            lambda: reader.post("/api/images/upload", data=image_form()),
            lambda: client.post("/api/images/upload", data={}),
            lambda: client.post("/api/images/upload", data=big()),
            lambda: client.post(
                "/api/images/upload", data={"image": (io.BytesIO(b"%PDF-1"), "a.pdf")}
            ),
            lambda: client.post(
                "/api/images/upload", data={"image": (io.BytesIO(make_image()[:60]), "a.png")}
            ),
            ("in_progress", "/api/images/upload"),
            ("broken", "insert", lambda: client.post("/api/images/upload", data=image_form())),
        ],
        ("get", "/api/images"): [
            lambda: client.get("/api/images"),
            lambda: nobody.get("/api/images"),
            lambda: reader.get("/api/images?owner=someone-else"),
            lambda: client.get("/api/images?limit=0"),
            ("broken", "list_page", lambda: client.get("/api/images")),
        ],
        ("get", "/api/images/{image_id}"): [
            lambda: client.get(url),
            lambda: nobody.get(url),
            lambda: client.get(url, headers={"If-None-Match": etag}),
            lambda: client.get(url, headers={"If-Match": '"stale"'}),
            lambda: client.get(url, headers=bad_host),
            lambda: client.get(f"/api/images/{missing}"),
            ("broken", "get", lambda: client.get(url)),
        ],
        ("put", "/api/images/{image_id}"): [
            lambda: client.put(url, data=image_form()),
            lambda: nobody.put(url, data=image_form()),
            lambda: reader.put(url, data=image_form()),
            lambda: client.put(url, data={}),
            lambda: client.put(f"/api/images/{missing}", data=image_form()),
            ("in_progress", url),
            lambda: client.put(url, data=image_form(), headers={"If-Match": '"stale"'}),
            lambda: client.put(url, data=big()),
            lambda: client.put(url, data={"image": (io.BytesIO(b"GIF89a"), "a.gif")}),
            lambda: client.put(url, data={"image": (io.BytesIO(b"<svg/>"), "a.svg")}),
            ("broken", "get", lambda: client.put(url, data=image_form())),
        ],
        ("get", "/api/images/{image_id}/download"): downloads("get"),
        ("head", "/api/images/{image_id}/download"): downloads("head"),
        ("get", "/api/openapi.json"): [
            lambda: client.get("/api/openapi.json"),
            lambda: client.get("/api/openapi.json", headers=bad_host),
        ],
        ("get", "/metrics"): [
            lambda: client.get("/metrics"),
            lambda: nobody.get("/metrics"),
            lambda: reader.get("/metrics"),
            lambda: client.get("/metrics", headers=unroutable),
        ],
        ("get", "/healthz"): [
            lambda: client.get("/healthz"),
            lambda: client.get("/healthz", headers=unroutable),
        ],
        ("get", "/readyz"): [
            lambda: client.get("/readyz"),
            lambda: client.get("/readyz", headers=unroutable),
            ("broken", "ping", lambda: client.get("/readyz")),
        ],
        ("delete", "/api/images/{image_id}"): [
            lambda: client.delete(url, headers=bad_host),
            lambda: nobody.delete(url),
            lambda: reader.delete(url),
            lambda: client.delete(f"/api/images/{missing}"),
            lambda: client.delete(url, headers={"If-Match": '"stale"'}),
            ("conflict", lambda: client.delete(url)),
            ("broken", "get", lambda: client.delete(url)),
            lambda: client.delete(url),  # last: the other probes need the image
        ],
    }


@pytest.fixture
def redirecting(tmp_path, clock, cloud_env):
    """An app in DOWNLOAD_MODE=redirect (S3 on moto), with one image."""
    with mock_aws(), mongomock.patch(servers=(("mongo.test", 27017),)):
        app = build_app({**cloud_env, "DOWNLOAD_MODE": "redirect"}, clock)
        client = app.test_client()
        yield client, ImagesClient(client).create()["_id"]
        app.extensions["image_api"].close()


def test_every_documented_status_of_every_operation_is_answered(
    make_app, tmp_path, document, redirecting
):
    # A small MAX_UPLOAD_BYTES keeps the 413 probes' bodies small: Werkzeug's test client
    # leaves the temporary file of a body over 500 KB open.
    app = make_app({"DATA_DIR": str(tmp_path / "probes"), "MAX_UPLOAD_BYTES": "4096"})
    client, service = app.test_client(), app.extensions["image_api"]
    image_id = ImagesClient(client).create()["_id"]
    redirect_client, redirect_id = redirecting
    probes = _probes(client, service, image_id, redirect_client, redirect_id)
    # One request a minute: each operation's second request in a row is a 429 (checked
    # before the image is looked up).
    strict = make_app(
        {
            "DATA_DIR": str(tmp_path / "strict"),
            "RATE_LIMIT_READ": "1/minute",
            "RATE_LIMIT_WRITE": "1/minute",
        }
    ).test_client()
    for (method, path), requests in probes.items():
        if path not in ("/healthz", "/readyz", "/metrics"):
            url = path.replace("{image_id}", image_id)
            requests.append(
                lambda m=method, u=url: (strict.open(u, method=m), strict.open(u, method=m))[1]
            )
    assert set(probes) == {
        (method, path) for path, ops in document["paths"].items() for method in ops
    }
    for (method, path), requests in probes.items():
        answered = set()
        for probe in requests:
            answered.add(_run(probe, client, service).status_code)
        documented = set(map(int, document["paths"][path][method]["responses"])) - {
            500,
            414,
            417,
            431,
        }
        assert answered == documented, f"{method.upper()} {path}"


class Held:
    """A repository in which every idempotency key is held by a request still running."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def claim(self, key, fingerprint, resource, now, expires_at):
        return Claim(key, fingerprint, resource, None, expires_at)


def _reader_key(service) -> str:
    """A key with the read scope alone."""
    return service.keys.create("probe-reader", "probes", ["read"])[1]


def _run(probe, client, service):
    if callable(probe):
        return probe()
    kind, *rest = probe
    if kind == "broken":
        method, request = rest
        inner = service.repository
        service.repository = Faulty(inner, method, "ping")
        try:
            return request()
        finally:
            service.repository = inner
    if kind == "conflict":
        # The image changes under every delete attempt: the service gives up with 409.
        inner = service.repository
        service.repository = Faulty(inner, "delete", error=errors.Conflict())
        try:
            return rest[0]()
        finally:
            service.repository = inner
    if kind == "in_progress":
        # Another request holding the same key is still running: 409 once the wait is over.
        url = rest[0]
        inner = service.repository
        service.repository = Held(inner)
        service.idempotency.wait = 0  # give up at once rather than poll for 10 s
        method = client.post if url.endswith("upload") else client.put
        try:
            return method(url, data=image_form(), headers={"Idempotency-Key": "held"})
        finally:
            service.repository = inner
    raise ValueError(kind)


# --- the docs page --------------------------------------------------------------------------


def test_the_docs_page_loads_only_its_own_files_under_a_strict_csp(client):
    page = client.get("/api/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-eval" not in policy and "script-src 'self' 'unsafe-inline'" not in policy
    html = page.get_data(as_text=True)
    assert "<script>" not in html  # no inline script: the CSP would block it
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(not re.match(r"\w+:|//", url) for url in assets), assets
    for asset in assets:
        response = client.get("/api/" + asset)
        assert response.status_code == 200, asset
        assert response.headers["Content-Security-Policy"] == policy
    script = client.get("/api/docs/docs.js").get_data(as_text=True)
    assert 'url: "openapi.json"' in script and "validatorUrl: null" in script


def test_only_the_pages_files_are_served(client):
    for name in ("../docs.py", "index.html", "oauth2-redirect.html", "swagger-ui.js.map", "x"):
        response = client.get(f"/api/docs/{name}")
        assert response.status_code == 404
        assert response.get_json()["code"] == "not_found"


def test_the_readme_links_the_document_and_the_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert "/api/openapi.json" in readme and "/api/docs" in readme
