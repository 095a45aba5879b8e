#!/usr/bin/env bash
# The coordinator's side of fedarches, step by step.
#
#   examples/coordinator.sh setup                 # atlas init + build version 1 from the reference
#   examples/coordinator.sh serve                 # serve the signed repository (foreground, Ctrl-C stops)
#   examples/coordinator.sh enroll SITE PUBKEY    # accept contributions signed by this site key
#   examples/coordinator.sh merge BUNDLE...       # verify bundles, publish the next version
#   examples/coordinator.sh log                   # print the lineage
#   examples/coordinator.sh walkthrough           # everything above with two sites (uses site.sh), end to end
#
# Settings (environment): WORK (default out/example), DATA (a labelled .h5ad with
# obs["study"] and obs["cell_type"]; default ../shared/data/cellbench_3cl_3tech.h5ad),
# REFERENCE_STUDY (default 10x_3cl), EPOCHS (default 40), PORT (default 8765).
# The reference file must hold raw counts; only the coordinator ever reads it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -z "${FEDARCHES:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/fedarches" ]]; then FEDARCHES="$ROOT/.venv/bin/fedarches"; else FEDARCHES=fedarches; fi
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
WORK="${WORK:-out/example}"
DATA="${DATA:-$ROOT/../shared/data/cellbench_3cl_3tech.h5ad}"
REFERENCE_STUDY="${REFERENCE_STUDY:-10x_3cl}"
EPOCHS="${EPOCHS:-40}"
PORT="${PORT:-8765}"
ATLAS="$WORK/coordinator/atlas"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

split_data() {
  # Stand-in for real life, where each party already has its own file: the
  # reference study goes to the coordinator, every other study to a site.
  [[ -f "$DATA" ]] || { echo "no data at $DATA; set DATA=path/to/labelled.h5ad" >&2; exit 1; }
  mkdir -p "$WORK/coordinator" "$WORK/inputs"
  "$PYTHON" - "$DATA" "$REFERENCE_STUDY" "$WORK" <<'PY'
import sys, anndata as ad
data, ref_study, work = sys.argv[1:]
a = ad.read_h5ad(data)
studies = [str(s) for s in a.obs["study"].astype(str).unique()]
if ref_study not in studies:
    sys.exit(f"REFERENCE_STUDY {ref_study!r} not in {studies}")
a[a.obs["study"].astype(str) == ref_study].copy().write_h5ad(f"{work}/coordinator/reference.h5ad")
for i, s in enumerate(x for x in studies if x != ref_study):
    a[a.obs["study"].astype(str) == s].copy().write_h5ad(f"{work}/inputs/site-{chr(97 + i)}.h5ad")
    print(f"site-{chr(97 + i)}: {s}")
PY
}

setup() {
  split_data
  rm -rf "$ATLAS"
  "$FEDARCHES" atlas init "$ATLAS" --name example-atlas
  "$FEDARCHES" atlas build "$ATLAS" --data "$WORK/coordinator/reference.h5ad" --condition-key study \
    --label-key cell_type --model trvae --n-genes 500 --epochs "$EPOCHS" --threads 1 --quiet
}

serve() { exec "$FEDARCHES" atlas serve "$ATLAS" --host 127.0.0.1 --port "$PORT"; }

walkthrough() {
  setup
  "$FEDARCHES" atlas serve "$ATLAS" --host 127.0.0.1 --port "$PORT" > "$WORK/coordinator/serve.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 50); do grep -q serving "$WORK/coordinator/serve.log" 2>/dev/null && break; sleep 0.2; done
  url="http://127.0.0.1:$PORT"
  bundles=()
  for input in "$WORK"/inputs/site-*.h5ad; do
    site="$(basename "$input" .h5ad)"
    # the site makes its key and mails the public half to the coordinator
    SITE="$site" WORK="$WORK" "$HERE/site.sh" keygen
    cp "$ATLAS/root.json" "$WORK/$site/root.json"   # out of band: the trust anchor goes to the site
    "$FEDARCHES" atlas enroll "$ATLAS" --site "$site" --public-key "$WORK/$site/key/site.pub"
    # the site maps its private data; only contribution.safetensors comes back
    SITE="$site" WORK="$WORK" ATLAS_URL="$url" TRUST="$WORK/$site/root.json" DATA="$input" EPOCHS="$EPOCHS" \
      "$HERE/site.sh" map
    bundles+=("$WORK/$site/out/contribution.safetensors")
  done
  "$FEDARCHES" atlas audit "${bundles[0]}"   # what leaves a site: condition vectors + signed manifest
  "$FEDARCHES" atlas merge "$ATLAS" "${bundles[@]}"
  "$FEDARCHES" atlas log "$ATLAS"
  # every site can now fetch the merged version and embed its own cells with it
  SITE=site-a WORK="$WORK" ATLAS_URL="$url" TRUST="$WORK/site-a/root.json" DATA="$WORK/inputs/site-a.h5ad" \
    "$HERE/site.sh" fetch
}

cmd="${1:-}"
case "$cmd" in
  setup) setup ;;
  serve) serve ;;
  enroll) shift; "$FEDARCHES" atlas enroll "$ATLAS" --site "$1" --public-key "$2" ;;
  merge) shift; "$FEDARCHES" atlas merge "$ATLAS" "$@" ;;
  log) "$FEDARCHES" atlas log "$ATLAS" ;;
  walkthrough) walkthrough ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
