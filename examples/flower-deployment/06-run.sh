#!/usr/bin/env bash
# Coordinator: the federated rounds (`rounds` in $FEDERATION_CONFIG). The ServerApp asks
# every site to map onto the current version, verifies and merges the signed bundles,
# publishes; then the lineage and each site's outcome and scores per round.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$APP_DIR"
flwr run . fedarches --stream --run-config \
    "atlas-dir=\"$WORK/atlas\" atlas-url=\"http://127.0.0.1:$ATLAS_PORT\" num-server-rounds=$ROUNDS min-sites=$(echo $SITES | wc -w) report=\"$WORK/report.json\""
fedarches atlas log "$WORK/atlas"
fedarches atlas report "$WORK/report.json"
