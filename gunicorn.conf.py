"""gunicorn settings, from the environment (and `.env`)."""

import os

from dotenv import load_dotenv

load_dotenv()

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads keep a worker serving while one request waits on S3 or MongoDB.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# Backend timeouts (BACKEND_*_TIMEOUT) are well under this, so a stuck backend gives a 503.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = 30
# No preload: each worker builds its own app after the fork, so MongoDB, S3 and SQLite
# clients are never shared across processes.
preload_app = False
accesslog = "-"
# gunicorn 27's control socket has one default path per user: several instances on a machine
# (tests, benchmarks, make run) would fight over it, and nothing here uses it.
control_socket_disable = True
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
