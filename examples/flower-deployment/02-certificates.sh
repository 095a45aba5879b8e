#!/usr/bin/env bash
# TLS: a private CA and a SuperLink certificate for 127.0.0.1/localhost (add --host NAME
# for a real SuperLink address). SuperNode authentication: one EC P-384 key pair per site.
set -euo pipefail
. "$(dirname "$0")/env.sh"
args=()
for s in $SITES; do args+=(--supernode "$s"); done
python -m fedarches.federation.certs "$WORK/certs" "${args[@]}"
