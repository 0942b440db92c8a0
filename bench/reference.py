"""Reference apps for the benchmarks, served under the same gunicorn configuration as the
service: a trivial JSON endpoint, a bare Flask `send_file`, a bare X-Accel-Redirect, a bare
multipart upload that saves the file with one fsync, and bare thumbnail renders (Pillow,
libvips)."""

import io
import os
import secrets
import shutil

from flask import Flask, Response, request, send_file
from PIL import Image

app = Flask(__name__)
FILE = os.environ.get("BENCH_FILE", "")
ACCEL = os.environ.get("BENCH_ACCEL", "")
UPLOAD_DIR = os.environ.get("BENCH_UPLOAD_DIR", "")


@app.get("/ping")
def ping():
    return {"status": "ok"}


@app.get("/file")
def file():
    return send_file(FILE, mimetype="image/png")


@app.get("/accel")
def accel():
    """BENCH_ACCEL (an internal location of the rendered nginx config) for nginx to send,
    under a strong ETag: the least a download decided by Python and sent by nginx costs.
    No lookup, no key, no conditions, no log line."""
    return Response(headers={"X-Accel-Redirect": ACCEL, "ETag": '"bench"'})


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


@app.get("/render")
def render():
    """BENCH_FILE as a `w`-pixel WebP by Pillow's fastest path: open, draft (DCT scaling),
    thumbnail, save. Nothing else: no lookup, no cache, no orientation, no hash."""
    width = int(request.args["w"])
    with Image.open(FILE) as image:
        image.draft("RGB", (width, width))
        image.thumbnail((width, width))
        out = io.BytesIO()
        image.save(out, "WEBP")
    return Response(out.getvalue(), mimetype="image/webp")


@app.get("/render-vips")
def render_vips():
    """The same with libvips (`thumbnail`, imgproxy's engine), for the record."""
    import pyvips

    width = int(request.args["w"])
    data = pyvips.Image.thumbnail(FILE, width).webpsave_buffer()
    return Response(data, mimetype="image/webp")


def wsgi_accel(environ, start_response):
    """The X-Accel-Redirect of `accel` for every path, with no Flask: what gunicorn alone
    costs a download decided in Python (the floor under any Flask view)."""
    start_response("200 OK", [("X-Accel-Redirect", ACCEL), ("ETag", '"bench"')])
    return [b""]
