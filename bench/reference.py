"""Reference apps for the benchmarks, served under the same gunicorn configuration as the
service: a trivial JSON endpoint and a bare Flask `send_file`."""

import os

from flask import Flask, send_file

app = Flask(__name__)
FILE = os.environ.get("BENCH_FILE", "")


@app.get("/ping")
def ping():
    return {"status": "ok"}


@app.get("/file")
def file():
    return send_file(FILE, mimetype="image/png")
