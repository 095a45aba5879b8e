#!/usr/bin/env bash
# Coordinator: one federated round (ROUNDS=N for more). The ServerApp asks every site
# to map onto the current version, verifies and merges the signed bundles, publishes.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$APP_DIR"
flwr run . fedarches --stream --run-config \
    "atlas-dir=\"$WORK/atlas\" atlas-url=\"http://127.0.0.1:$ATLAS_PORT\" num-server-rounds=${ROUNDS:-1} report=\"$WORK/report.json\""
fedarches atlas log "$WORK/atlas"
