#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real, when they are missing:
# `make test` runs this first. As root with apt-get (as CI runs) it installs them; otherwise
# it says loudly which tests will be skipped.
set -euo pipefail

# command  package  what is skipped without it
needed=(
  "chromium chromium tests/test_docs_browser.py (the docs page in a headless browser)"
  "redis-server redis-server the Redis tests of tests/test_limits.py (shared rate limits)"
  "nginx nginx-light tests/test_nginx.py (nginx in front of gunicorn, accel downloads)"
)

missing=()
for entry in "${needed[@]}"; do
  read -r command package _ <<<"$entry"
  command -v "$command" >/dev/null 2>&1 || missing+=("$entry")
done
[ ${#missing[@]} -eq 0 ] && exit 0

packages=()
for entry in "${missing[@]}"; do
  read -r _ package _ <<<"$entry"
  packages+=("$package")
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages the tests use: ${packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  # The nginx package starts a server on port 80; the tests start their own.
  if [[ " ${packages[*]} " == *" nginx-light "* ]]; then pkill -x nginx || true; fi
else
  for entry in "${missing[@]}"; do
    read -r command package skipped <<<"$entry"
    echo "!!! '$command' is missing and cannot be installed here (needs root and apt-get):" >&2
    echo "!!! SKIPPED: $skipped. Install it with: apt-get install $package" >&2
  done
fi
