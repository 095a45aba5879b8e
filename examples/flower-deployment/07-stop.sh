#!/usr/bin/env bash
# Stop what 03 and 05 started, by the PIDs they recorded, and wait until they are gone
# (their SuperExec children follow them).
set -uo pipefail
. "$(dirname "$0")/env.sh"
stopped=()
for f in "$WORK"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2> /dev/null; then
        kill "$pid" && echo "stopped $(basename "$f" .pid) (pid $pid)" && stopped+=("$pid")
    fi
    rm -f "$f"
done
for _ in $(seq 1 30); do
    alive=0
    for pid in "${stopped[@]:-}"; do
        [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null && alive=1
    done
    [ "$alive" = 0 ] && exit 0
    sleep 1
done
echo "some processes are still running: ${stopped[*]}" >&2
