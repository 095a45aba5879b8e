#!/usr/bin/env bash
# The whole example on one machine: prepare, certificates, SuperLink, registration,
# SuperNodes, one round, stop. Starts from a fresh $WORK.
set -euo pipefail
. "$(dirname "$0")/env.sh"
if [ -e "$WORK/atlas" ]; then echo "$WORK exists; remove it first (rm -rf $WORK)" >&2; exit 1; fi
trap '"$HERE/07-stop.sh"' EXIT
"$HERE/01-prepare.sh"
"$HERE/02-certificates.sh"
"$HERE/03-start-superlink.sh"
"$HERE/04-register-supernodes.sh"
"$HERE/05-start-supernodes.sh"
"$HERE/06-run.sh"
