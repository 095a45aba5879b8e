#!/usr/bin/env bash
# Each site: a SuperNode that verifies the SuperLink's certificate with the CA,
# authenticates with its private key and carries the site's node config.
set -euo pipefail
. "$(dirname "$0")/env.sh"
for s in $SITES; do
    FLWR_HOME="$WORK/sites/$s/flwr-home" flower-supernode \
        --superlink "127.0.0.1:$SUPERLINK_PORT" \
        --root-certificates "$WORK/certs/ca.crt" \
        --auth-supernode-private-key "$WORK/certs/supernodes/$s" \
        --node-config "$WORK/sites/$s/node-config.toml" \
        --host 127.0.0.1 --port "${SITE_PORT[$s]}" > "$WORK/logs/supernode-$s.log" 2>&1 &
    echo $! > "$WORK/pids/supernode-$s.pid"
done
n=$(echo $SITES | wc -w)
for _ in $(seq 1 60); do
    online=$(flwr supernode ls fedarches --format json | python -c \
        'import json,sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))')
    if [ "$online" -ge "$n" ]; then echo "$online SuperNode(s) online"; exit 0; fi
    sleep 1
done
echo "SuperNodes did not come online; see $WORK/logs/supernode-*.log" >&2
exit 1
