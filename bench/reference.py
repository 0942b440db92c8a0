"""Reference apps for the benchmarks, served under the same gunicorn configuration as the
service: a trivial JSON endpoint, a bare Flask `send_file`, and a bare multipart upload that
saves the file with one fsync."""

import os
import secrets
import shutil

from flask import Flask, request, send_file

app = Flask(__name__)
FILE = os.environ.get("BENCH_FILE", "")
UPLOAD_DIR = os.environ.get("BENCH_UPLOAD_DIR", "")


@app.get("/ping")
def ping():
    return {"status": "ok"}


@app.get("/file")
def file():
    return send_file(FILE, mimetype="image/png")


@app.post("/upload")
def upload():
    """Multipart field `image` to a new file in BENCH_UPLOAD_DIR: write, flush, one fsync.

    No validation, no hash, no metadata, no rename or directory fsync: the least a durable
    upload endpoint does, to compare POST /api/images/upload with.
    """
    image = request.files["image"]
    with open(os.path.join(UPLOAD_DIR, secrets.token_hex(16)), "xb") as out:
        shutil.copyfileobj(image.stream, out)
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    return {"size": size}, 201
