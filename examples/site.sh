#!/usr/bin/env bash
# A site's side of fedarches, step by step.
#
#   SITE=site-a examples/site.sh keygen      # once: key pair; send key/site.pub to the coordinator
#   SITE=site-a ATLAS_URL=http://host:8765 TRUST=root.json DATA=mine.h5ad examples/site.sh map
#                                           # verify + fetch the newest version, map DATA onto it,
#                                           # write out/query.h5ad, out/report.json and the signed
#                                           # out/contribution.safetensors (the only file to send)
#   SITE=site-a ATLAS_URL=... TRUST=root.json examples/site.sh fetch
#                                           # verify + fetch the newest version, embed DATA with it
#
# Settings: WORK (default out/example; the site keeps everything in $WORK/$SITE),
# CONDITION_KEY (default study), EPOCHS (default: the model's schedule).
# root.json comes from the coordinator out of band (mail, USB stick); it pins the atlas keys.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -z "${FEDARCHES:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/fedarches" ]]; then FEDARCHES="$ROOT/.venv/bin/fedarches"; else FEDARCHES=fedarches; fi
fi
: "${SITE:?set SITE to the enrolled site name}"
WORK="${WORK:-out/example}"
DIR="$WORK/$SITE"
CONDITION_KEY="${CONDITION_KEY:-study}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# the trusted-metadata cache (rollback protection) lives with the site's files
export FEDARCHES_CACHE="${FEDARCHES_CACHE:-$DIR/cache}"

case "${1:-}" in
  keygen)
    if [[ -f "$DIR/key/site.key" ]]; then echo "key exists: $DIR/key/site.pub"; else "$FEDARCHES" site keygen --out "$DIR/key"; fi
    ;;
  map)
    : "${ATLAS_URL:?set ATLAS_URL}" "${TRUST:?set TRUST to the atlas root.json}" "${DATA:?set DATA to the site .h5ad}"
    epochs=()
    [[ -n "${EPOCHS:-}" ]] && epochs=(--epochs "$EPOCHS")
    "$FEDARCHES" site map --atlas "$ATLAS_URL" --trust "$TRUST" --key "$DIR/key" --site "$SITE" \
      --data "$DATA" --condition-key "$CONDITION_KEY" "${epochs[@]}" --threads 1 --quiet --out "$DIR/out"
    ;;
  fetch)
    : "${ATLAS_URL:?set ATLAS_URL}" "${TRUST:?set TRUST to the atlas root.json}"
    "$FEDARCHES" site fetch --atlas "$ATLAS_URL" --trust "$TRUST" --out "$DIR/atlas-latest"
    if [[ -n "${DATA:-}" ]]; then
      "$FEDARCHES" embed --model "$DIR/atlas-latest" --data "$DATA" --condition-key "$CONDITION_KEY" \
        --out "$DIR/embedded.h5ad"
    fi
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
