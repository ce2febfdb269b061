#!/usr/bin/env bash
# The soak, bounded: `flashsale serve` on a private PostgreSQL of its own, driven by
# `flashsale-tools load soak` for SOAK_DURATION (default 1m); fails if any check fails.
# Usage: .ci/soak.sh [target dir, default target/debug]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug}
DURATION=${SOAK_DURATION:-1m}
PORT=$((50000 + RANDOM % 5000)); METRICS_PORT=$((PORT + 5000))
DIR=$(mktemp -d /tmp/flashsale-soak.XXXX); chmod o+x "$DIR"  # a root run starts PostgreSQL as postgres
unset DATABASE_URL
RUST_LOG=warn "$BIN/flashsale" serve --pg-data-dir "$DIR/pg" --listen-addr "127.0.0.1:$PORT" \
  --metrics-addr "127.0.0.1:$METRICS_PORT" > "$DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DIR"' EXIT
# The server listens once its private PostgreSQL is up (the soak then waits for SERVING).
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$DIR/serve.log"; exit 1; }
  sleep 0.1
done
"$BIN/flashsale-tools" load --server "http://127.0.0.1:$PORT" soak --duration "$DURATION" \
  --server-pid $SERVER --metrics "127.0.0.1:$METRICS_PORT"
