#!/usr/bin/env bash
# Fuzzes the admin API from its own description: starts `thunderline serve` on a fresh data
# directory and a free loopback port, points schemathesis at GET /api/openapi.json with the
# admin token, and fails on any server error (5xx other than the documented 503s), any status,
# content type or body the description does not allow, and any input the description forbids
# that the server takes. The server is stopped whatever happens; the run is bounded by
# MAX_TIME seconds.
#
# usage: contrib/schemathesis.sh [BINARY]
#
# BINARY defaults to target/release/thunderline or target/debug/thunderline, whichever exists.
# schemathesis comes from SCHEMATHESIS (a command), else from a virtual environment made in
# $VENV (default ~/.cache/thunderline/schemathesis) with pip; it needs Python 3.10 or later.
# MAX_TIME (default 120) bounds each of its two runs; MAX_EXAMPLES (default 60) the cases per
# operation.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5
MAX_TIME=${MAX_TIME:-120}
MAX_EXAMPLES=${MAX_EXAMPLES:-60}

binary=${1:-}
if [ -z "$binary" ]; then
  for candidate in target/release/thunderline target/debug/thunderline; do
    [ -x "$candidate" ] && { binary=$candidate; break; }
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] || {
  echo "no thunderline binary: build one (cargo build) or pass its path" >&2
  exit 1
}

schemathesis=${SCHEMATHESIS:-}
if [ -z "$schemathesis" ]; then
  venv=${VENV:-$HOME/.cache/thunderline/schemathesis}
  if [ ! -x "$venv/bin/schemathesis" ] || ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
    python3 -m venv "$venv" || {
      echo "python3 -m venv failed (Debian: apt-get install -y python3-venv)" >&2
      exit 1
    }
    "$venv/bin/pip" install -q "schemathesis==$VERSION"
  fi
  schemathesis=$venv/bin/schemathesis
fi

work=$(mktemp -d)
server=
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT INT TERM

# One worker: with two threads, Python 3.11's ast.parse (used by hypothesis to describe its
# strategies) can fail with "AST constructor recursion depth mismatch", a CPython bug.
#
# One run of schemathesis against a fresh server (its own data directory and free port), with
# the filter arguments given; its status.
fuzz() {
  local name=$1 port url token status=0
  shift
  # A free port: the kernel's choice for a socket bound to port 0, released for the server.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url=http://127.0.0.1:$port
  mkdir -m 700 "$work/$name"
  "$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/$name" --log-level warn \
    >"$work/$name.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    curl -fsS "$url/readyz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.2
  done
  if ! curl -fsS "$url/readyz" >/dev/null 2>&1; then
    cat "$work/$name.log" >&2
    echo "the server did not start" >&2
    return 1
  fi
  token=$(cat "$work/$name/admin_token")
  echo "== $name"
  "$schemathesis" run "$url/api/openapi.json" "$@" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --workers 1 \
    --seed 1 \
    --generation-database :memory: \
    --no-color || status=$?
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server died during the run:" >&2
    cat "$work/$name.log" >&2
    return 1
  fi
  if grep -q "panicked" "$work/$name.log"; then
    echo "the server panicked during the run:" >&2
    grep -A5 "panicked" "$work/$name.log" >&2
    return 1
  fi
  stop_server
  return "$status"
}

# The pipeline's controls on a server of their own: a rate limit of one command a day is a
# valid request, and would stall every zone operation of the same run.
status=0
fuzz api --exclude-tag pipeline || status=1
fuzz pipeline --include-tag pipeline || status=1
exit "$status"
