#!/usr/bin/env bash
# One command for the bench: installs what it needs, then runs it.
#   bench/run.sh --quick    (zion, uvicorn, the floor: under 3 minutes)
#   bench/run.sh            (every server and scenario, ~25 minutes)
#   bench/run.sh --h2       (bench/h2_load.py: HTTP/2 against HTTP/1.1 and granian, ~3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in wrk nginx-light nghttp2-client openssl; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian starts nginx as a service on install. It is left alone: the bench
  # runs its own nginx on a free port with its own pid file and stops only
  # the processes it started (servers.py: each server in a session of its own).
fi
work=bench/.work
if [ ! -x "$work/venv/bin/granian" ] || ! "$work/venv/bin/python" -c 'import wsproto, zttp, aioquic' 2>/dev/null; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q --disable-pip-version-check \
    'uvicorn[standard]' uvloop httptools gunicorn uvicorn-worker granian 'hypercorn[h3]' matplotlib \
    wsproto websockets zttp  # zttp: uvicorn's HTTP/2 (--http zttp --http2), bench/h2_load.py;
  # hypercorn[h3]: aioquic, for hypercorn's HTTP/3 and the http3 scenario's client
fi
if [ "${1:-}" = "--h2" ]; then  # HTTP/2 against HTTP/1.1 and granian: bench/h2_load.py
  shift
  exec .venv/bin/python bench/h2_load.py "$@"
fi
exec "$work/venv/bin/python" bench/run.py "$@"
