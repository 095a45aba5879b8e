# Settings shared by the scripts of this example (source it: `. ./env.sh`).
# They all come from ONE file: $FEDERATION_CONFIG (default: federation.toml here),
# read by federation_config.py, which prints `export VAR=...` lines and per-site arrays
# (SITE_DATA[name], SITE_CONDITION_KEY, SITE_KEY_DIR, SITE_KEYGEN, SITE_EPOCHS, SITE_PORT).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export FEDERATION_CONFIG="${FEDERATION_CONFIG:-$HERE/federation.toml}"
if ! _settings="$(python "$HERE/federation_config.py" "$FEDERATION_CONFIG")"; then
    echo "cannot read the settings of $FEDERATION_CONFIG (see above)" >&2
    exit 2
fi
eval "$_settings"
unset _settings
export APP_DIR="${APP_DIR:-$(cd "$HERE/../.." && pwd)}"   # a directory whose pyproject.toml has [tool.flwr.app]
# Flower: no telemetry, no update check, no Ray usage stats; one thread per process.
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The flwr CLI keeps its connections in $FLWR_HOME/config.toml: use one of our own.
export FLWR_HOME="$WORK/flwr-home"
mkdir -p "$WORK/pids" "$WORK/logs"
