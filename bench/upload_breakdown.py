"""Where an upload's time goes: one thread, in-process (Flask's test client, no network),
the service's POST /api/images/upload of the benchmark's 83 KB JPEG beside the bare
one-fsync endpoint, with parts of the work switched off in turn (never in production):
the full decode, and the file fsyncs (SQLite's own WAL fsync stays in every variant)."""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flask import Flask, request  # noqa: E402
from PIL import ImageFile  # noqa: E402

from bench.run import multipart_body, photo_jpeg  # noqa: E402
from image_api import create_app  # noqa: E402


def bare_app(directory: str) -> Flask:
    app = Flask("bare")

    @app.post("/upload")
    def upload():
        with open(os.path.join(directory, secrets.token_hex(16)), "xb") as out:
            shutil.copyfileobj(request.files["image"].stream, out)
            out.flush()
            os.fsync(out.fileno())
        return {"ok": True}, 201

    return app


def per_upload_ms(client, path: str, body: bytes, content_type: str, count: int) -> float:
    for _ in range(20):
        client.post(path, data=body, content_type=content_type)
    started = time.perf_counter()
    for _ in range(count):
        response = client.post(path, data=body, content_type=content_type)
        assert response.status_code == 201, response.get_data(as_text=True)
    return (time.perf_counter() - started) / count * 1000


def main(rounds: int = 5, count: int = 300) -> None:
    body = multipart_body(photo_jpeg(), "image", "bench.jpg", "image/jpeg")
    content_type = "multipart/form-data; boundary=" + body.split(b"\r\n")[0][2:].decode()
    real_fsync, real_load = os.fsync, ImageFile.ImageFile.load
    variants = {
        "bare endpoint": ("bare", False, False),
        "service": ("service", False, False),
        "service, no decode": ("service", True, False),
        "service, no file fsyncs": ("service", False, True),
        "service, neither": ("service", True, True),
        "bare endpoint, no fsync": ("bare", False, True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="upload-breakdown-") as tmp:
        service = create_app(
            {"DATA_DIR": f"{tmp}/service", "AUTH": "off", "RATE_LIMIT_WRITE": "100000000/minute"}
        ).test_client()
        Path(f"{tmp}/bare").mkdir()
        bare = bare_app(f"{tmp}/bare").test_client()
        try:
            for _ in range(rounds):
                for name, (which, no_decode, no_fsync) in variants.items():
                    os.fsync = (lambda fd: None) if no_fsync else real_fsync
                    ImageFile.ImageFile.load = (lambda self: None) if no_decode else real_load
                    client, path = (
                        (bare, "/upload") if which == "bare" else (service, "/api/images/upload")
                    )
                    results[name].append(per_upload_ms(client, path, body, content_type, count))
        finally:
            os.fsync, ImageFile.ImageFile.load = real_fsync, real_load
    for name, values in results.items():
        print(
            f"{name:26s} {statistics.median(values):6.2f} ms  (rounds: "
            f"{', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
