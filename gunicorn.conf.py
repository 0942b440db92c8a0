"""gunicorn settings, from the service's own Settings (the environment and `.env`)."""

import atexit
import os
import shutil
import socket
import sys
import tempfile

# Prometheus counts of every worker, in files: one directory per gunicorn master, emptied
# at start and removed at exit. Set before anything imports prometheus_client (importing
# image_api does), which chooses how to count once, at its import.
# A directory of our own (mkdtemp: an unpredictable name, mode 0700), unless one is given.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    made, master = tempfile.mkdtemp(prefix="image-api-metrics-"), os.getpid()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    # Removed when the master exits, however: `on_exit` runs only after a start, not when a
    # setting below is refused or the port is taken. Workers inherit this and do nothing.
    atexit.register(lambda: os.getpid() == master and shutil.rmtree(made, ignore_errors=True))

from gunicorn import glogging, util
from gunicorn.arbiter import Arbiter

from image_api.config import ENV_FILE, ConfigError, Settings, environment, settings_file
from image_api.errors import server_refusal

checked = environment()
try:
    settings = Settings.from_mapping(checked)
except ConfigError as error:
    # One line naming the variable, not gunicorn's traceback of its config file.
    sys.exit(f"image-api: {error.message}")
# Workers take the values checked here, .env's included, and do not read .env themselves:
# gunicorn starts workers again later (one that died), and one reading an .env broken since
# would fail to boot, which stops gunicorn. A reload (SIGHUP) reads .env afresh.
raw_env = [f"{name}={value}" for name, value in checked.items() if name not in os.environ]
raw_env.append(f"{ENV_FILE}=")


def _checked_reload(arbiter):
    """SIGHUP reloads the settings only when the service would start with them: gunicorn
    ran this file again and exited on a mistake in .env (new workers that cannot boot, a
    port in use, the same), stopping a service that was serving."""
    # The environment gunicorn started with: without what the last load took from .env.
    taken, original = arbiter.cfg.env, arbiter.cfg.env_orig
    started = {name: value for name, value in os.environ.items() if name not in taken}
    started.update({name: original[name] for name in taken if name in original})
    try:
        problem = _reload_problem(started, arbiter.cfg.bind)
    except Exception as error:  # noqa: BLE001 - whatever the check meets refuses the reload
        problem = str(getattr(error, "message", error)) or type(error).__name__
    if problem:
        arbiter.log.error("image-api: reload refused, serving on as before: %s", problem)
        return
    _checked_reload.reload(arbiter)


def _reload_problem(started: dict, bound: list[str]) -> str | None:
    from image_api import create_app

    path = settings_file(started)
    if _checked_reload.had_env_file and not os.path.isfile(path):
        return f"{path} is gone (moved while being edited?): every setting would be a default"
    checked = environment(under=started)
    new = Settings.from_mapping(checked)
    if [new.bind] != bound:
        with socket.create_server((new.host, new.port)):
            pass  # free: gunicorn exited when it could not listen there
    create_app(checked).extensions["image_api"].close()  # as each new worker will
    return None


# This file runs again on every reload: wrap gunicorn's own reload once.
if not hasattr(Arbiter.reload, "reload"):
    _checked_reload.reload = Arbiter.reload
    Arbiter.reload = _checked_reload
Arbiter.reload.had_env_file = os.path.isfile(settings_file(os.environ))

bind = settings.bind
workers = settings.web_concurrency
# Threads keep a worker serving while one request waits on S3 or MongoDB.
worker_class = "gthread"
threads = settings.gunicorn_threads
# A gthread worker does not time out a single request; REQUEST_TIMEOUT (below this, checked
# at start-up) bounds each request's backend calls instead.
timeout = settings.gunicorn_timeout
graceful_timeout = 30
# Workers' heartbeats (an fchmod per loop) on a memory filesystem: on a disk-backed /tmp
# they can block a worker (gunicorn's docs recommend this in containers).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No preload: each worker builds its own app after the fork, so MongoDB, S3 and SQLite
# clients are never shared across processes.
preload_app = False
# No gunicorn access log: the service writes one JSON line per request itself
# (image_api.logs), with its route, request id and key name, and never a query string.
accesslog = None


class Logger(glogging.Logger):
    """gunicorn's logger without its access log. With a `logconfig_dict` (below) gunicorn
    counts its access log as on even when `accesslog` is unset: every request then built
    the log's atoms (every header and environ entry) for a logger with no handler."""

    def access(self, resp, req, environ, request_time):
        pass


logger_class = Logger


def write_error(sock, status_int, reason, mesg):
    """What gunicorn refuses itself (a malformed or oversized request line or header, an
    unsupported Expect) is JSON like every other error, not gunicorn's HTML page: with nginx
    in front too, which passes gunicorn's answers on. gunicorn's workers call
    `util.write_error` for every such refusal; the status and the log line stay gunicorn's."""
    util.write_nonblock(sock, server_refusal(status_int, reason, mesg))


util.write_error = write_error
# gunicorn 27's control socket has one default path per user: several instances on a machine
# (tests, benchmarks, make run) would fight over it, and nothing here uses it.
control_socket_disable = True
# PROXY_HOPS alone decides which X-Forwarded-* headers are trusted (werkzeug's ProxyFix in
# create_app): gunicorn's own handling, which trusted X-Forwarded-Proto from any local
# client even with PROXY_HOPS=0, is off.
forwarded_allow_ips = ""
secure_scheme_headers = {}
# The service's own lines (image_api.*: one per request, and the rest) are JSON on stdout;
# gunicorn's own (start, stop, workers) stay in its format on stderr.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "image_api": {"level": "INFO", "handlers": ["json_console"], "propagate": False},
    },
    "handlers": {
        # gunicorn's defaults name it for the root logger.
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stdout",
        },
        # Written in batches, within a second (and warnings at once): see BufferedHandler.
        "json_console": {
            "class": "image_api.logs.BufferedHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        },
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stderr",
            "filters": ["without_queries"],
        },
    },
    "filters": {"without_queries": {"()": "image_api.logs.WithoutQueries"}},
    "formatters": {
        "json": {"()": "image_api.logs.JsonFormatter"},
        "generic": {
            "format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s",
            "datefmt": "[%Y-%m-%d %H:%M:%S %z]",
        },
    },
}


def on_starting(server):
    # Counts of an earlier run are not this one's.
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def post_fork(server, worker):
    """Give decoded images' memory back to the OS when they are freed.

    glibc raises its mmap threshold after the first large free, so later 200 MB pixel
    buffers come from per-thread heap arenas that keep their pages: with 4 threads a worker
    held up to 4 decoded images' worth after DECODE_MEMORY let one run at a time (467 vs
    228 MiB in `make bench`). A fixed threshold keeps every large buffer in mmap.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        m_mmap_threshold = -3
        ctypes.CDLL(libc).mallopt(m_mmap_threshold, 1024 * 1024)


def post_worker_init(worker):
    """Move what the app built at start (modules, routes, schemas: hundreds of thousands of
    objects that live as long as the worker) out of the garbage collector's sight, so that
    its full collections, which requests' allocations keep triggering, do not walk them."""
    import gc

    gc.collect()
    gc.freeze()
