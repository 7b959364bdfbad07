#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis (PyPI),
# against a real quickstart server with its own state directory and ports:
# no answer may be 5xx, every error must be the JSON `{"error": …}`, and every
# answer must match the document. Usage: fuzz/schemathesis/run.sh [seconds]
# (default 60); KEEL_BIN_DIR picks the binaries (default target/debug).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
seconds="${1:-60}"
bin="$(cd "${KEEL_BIN_DIR:-target/debug}" && pwd)"
version=4.32.5
if ! command -v schemathesis >/dev/null 2>&1 || ! schemathesis --version 2>/dev/null | grep -q "$version"; then
    python3 -m pip install -q --root-user-action=ignore "schemathesis==$version"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port="$(free_port)"
http_port="$(free_port)"
dir="$(mktemp -d)"
"$bin/keel-server" quickstart --dir "$dir/qs" --agent-bin "$bin/keel-agent" \
    --grpc-port "$grpc_port" --http-port "$http_port" >"$dir/quickstart.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
    [ -s "$dir/qs/admin.token" ] && curl -fsS -o /dev/null "http://127.0.0.1:$http_port/healthz" 2>/dev/null && break
    sleep 0.2
done
token="$(cat "$dir/qs/admin.token")"
# Revoking tokens is left out: the run would revoke its own and see only 401s.
# Run from the temporary directory, where its example database goes.
cd "$dir"
PYTHONPATH="$here" SCHEMATHESIS_HOOKS=hooks schemathesis run \
    "http://127.0.0.1:$http_port/api/v1/openapi.json" \
    -H "Authorization: Bearer $token" \
    --checks not_a_server_error,errors_are_json,status_code_conformance,content_type_conformance,response_schema_conformance \
    --exclude-path '/api/v1/tokens/{id}' \
    --max-time "$seconds" --workers 1 --seed 1 \
    --report-junit-path "$dir/junit.xml"
