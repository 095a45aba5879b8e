#!/usr/bin/env bash
# Coordinator: tell the flwr CLI where the SuperLink is, then register each site's
# SuperNode public key. Only registered SuperNodes may connect (--enable-supernode-auth).
set -euo pipefail
. "$(dirname "$0")/env.sh"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedarches"

[superlink.fedarches]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$WORK/certs/ca.crt"
TOML
for s in $SITES; do
    flwr supernode register "$WORK/certs/supernodes/$s.pub" fedarches --name "$s"
done
flwr supernode ls fedarches
