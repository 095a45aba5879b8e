# Settings shared by the scripts of this example (source it: `. ./env.sh`).
# Everything lives under $WORK; ports are explicit and on loopback.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export WORK="${WORK:-$(cd "$HERE/../.." && pwd)/out/flower-deployment}"   # /out is git-ignored
export APP_DIR="${APP_DIR:-$(cd "$HERE/../.." && pwd)}"   # a directory whose pyproject.toml has [tool.flwr.app]
export SUPERLINK_PORT="${SUPERLINK_PORT:-9093}"
export ATLAS_PORT="${ATLAS_PORT:-8765}"
export SITES="${SITES:-site-a site-b}"
export SUPERNODE_BASE_PORT="${SUPERNODE_BASE_PORT:-9094}"   # site i gets SUPERNODE_BASE_PORT + i
export EPOCHS="${EPOCHS:-}"                                  # empty = the model's own schedule
# Flower: no telemetry, no update check, no Ray usage stats; one thread per process.
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The flwr CLI keeps its connections in $FLWR_HOME/config.toml: use one of our own.
export FLWR_HOME="$WORK/flwr-home"
mkdir -p "$WORK/pids" "$WORK/logs"
