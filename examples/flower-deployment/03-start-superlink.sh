#!/usr/bin/env bash
# Coordinator: the atlas over HTTP for the sites, and the SuperLink (TLS + SuperNode
# authentication). --disable-runtime-dependency-installation: the app runs in this
# environment; without it the SuperLink runs `uv sync` for every run.
set -euo pipefail
. "$(dirname "$0")/env.sh"

fedarches atlas serve "$WORK/atlas" --host 127.0.0.1 --port "$ATLAS_PORT" > "$WORK/logs/atlas-serve.log" 2>&1 &
echo $! > "$WORK/pids/atlas-serve.pid"

flower-superlink \
    --ssl-ca-certfile "$WORK/certs/ca.crt" \
    --ssl-certfile "$WORK/certs/server.pem" \
    --ssl-keyfile "$WORK/certs/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --database "$WORK/superlink.db" \
    --host 127.0.0.1 --port "$SUPERLINK_PORT" > "$WORK/logs/superlink.log" 2>&1 &
echo $! > "$WORK/pids/superlink.pid"

# wait until the SuperLink answers over TLS
for _ in $(seq 1 60); do
    if python -c 'import httpx, sys; sys.exit(0 if httpx.get(sys.argv[1], verify=sys.argv[2]).is_success else 1)' \
        "https://127.0.0.1:$SUPERLINK_PORT/health" "$WORK/certs/ca.crt" 2> /dev/null; then
        echo "SuperLink up on 127.0.0.1:$SUPERLINK_PORT (pid $(cat "$WORK/pids/superlink.pid"))"
        exit 0
    fi
    sleep 1
done
echo "SuperLink did not come up; see $WORK/logs/superlink.log" >&2
exit 1
