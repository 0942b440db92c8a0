#!/usr/bin/env bash
# `make run-nginx`: gunicorn on PORT (loopback) and nginx in front on NGINX_PORT, as one
# would try the pair on one machine before deploying. Both read the same .env (DATA_DIR,
# DOWNLOAD_MODE, MAX_UPLOAD_BYTES...); Ctrl-C or SIGTERM stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
command -v nginx >/dev/null 2>&1 || { echo "nginx is missing: apt-get install nginx-light" >&2; exit 1; }

# What this makes is for this user only: nginx's error log can quote a signed URL.
umask 077

# The service trusts the one proxy in front for X-Forwarded-*, unless the environment or
# .env (or the file IMAGE_API_ENV_FILE names) says otherwise (an exported value would win over .env's: set only when neither does).
if [ -z "${PROXY_HOPS+set}" ] && ! "$BIN/python" -c \
  'import os, sys; from dotenv import dotenv_values; sys.exit("PROXY_HOPS" not in dotenv_values(os.environ.get("IMAGE_API_ENV_FILE") or ".env"))'
then
  export PROXY_HOPS=1
fi
PREFIX="${NGINX_PREFIX:-.nginx}"
mkdir -p "$PREFIX/logs" "$PREFIX/tmp"
# Logs made before the umask above were readable by every local user.
chmod -f go= "$PREFIX"/logs/* 2>/dev/null || true

"$BIN/flask" --app image_api init
# nginx's workers run as this user (as root they would otherwise drop to nobody, who may
# not read the blob files); NGINX_PORT and PORT come from .env or the environment.
"$BIN/flask" --app image_api nginx-config --user "$(id -un) $(id -gn)" \
  --output "$PREFIX/nginx.conf"
listen=$(sed -n 's/^ *listen \([^;]*\);/\1/p' "$PREFIX/nginx.conf" | head -1)
upstream=$(sed -n 's/^ *server \([^;]*\);/\1/p' "$PREFIX/nginx.conf" | head -1)

"$BIN/gunicorn" --config gunicorn.conf.py wsgi:app &
gunicorn_pid=$!
nginx -p "$PREFIX" -c nginx.conf -g "daemon off;" &
nginx_pid=$!
stop() {
  kill -TERM "$gunicorn_pid" 2>/dev/null || true
  kill -QUIT "$nginx_pid" 2>/dev/null || true
  wait "$gunicorn_pid" "$nginx_pid" 2>/dev/null || true
}
trap stop INT TERM EXIT
echo "nginx on http://localhost:$listen in front of gunicorn on $upstream"
# Either one ending ends both.
wait -n "$gunicorn_pid" "$nginx_pid"
