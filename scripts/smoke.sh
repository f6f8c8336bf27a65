#!/usr/bin/env bash
# Start the server on the default model, wait for SERVING, call Suggest, stop it with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODEL=${MODEL:-models/default.pt}
PORT=${SMOKE_PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
METRICS_PORT=${SMOKE_METRICS_PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log=$(mktemp)
"$VENV/bin/python" -m service --model "$MODEL" --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do
    if "$VENV/bin/python" -m service.client --target "127.0.0.1:$PORT" --timeout 2 health >/dev/null 2>&1; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "smoke: the server exited:"; cat "$log"; exit 1; }
    sleep 1
done
answer=$("$VENV/bin/python" -m service.client --target "127.0.0.1:$PORT" suggest "In the beginning God")
echo "smoke: Suggest \"In the beginning God\" -> $answer"
[ -n "$answer" ] && [ "$answer" != "(none)" ] || { echo "smoke: no suggestions"; exit 1; }
"$VENV/bin/python" - "$METRICS_PORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
line = next(l for l in text.splitlines() if l.startswith('nextword_requests_total{') and 'method="Suggest"' in l)
print("smoke: /metrics ->", line)
PY
kill -TERM "$server"
wait "$server"
echo "smoke: the server stopped cleanly on SIGTERM"
