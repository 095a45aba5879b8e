#!/usr/bin/env bash
# Coordinator and sites, before any Flower process: data, atlas, site keys, enrollment.
set -euo pipefail
. "$(dirname "$0")/env.sh"

# (example only) generated data, when $FEDERATION_CONFIG has a [generate] table
if [ "$GENERATE" = 1 ]; then python "$HERE/make_data.py" "$FEDERATION_CONFIG"; fi

# coordinator: a new atlas, its reference version 1
fedarches atlas init "$WORK/atlas" --name "$ATLAS_NAME"
build=(--data "$REFERENCE" --condition-key "$CONDITION_KEY" --model "$MODEL" --n-genes "$N_GENES" --quiet)
if [ -n "$LABEL_KEY" ]; then build+=(--label-key "$LABEL_KEY"); fi
if [ -n "$EPOCHS" ]; then build+=(--epochs "$EPOCHS"); fi
fedarches atlas build "$WORK/atlas" "${build[@]}"

# each site: its own Ed25519 key (the private key never leaves the site) ...
for s in $SITES; do
    if [ "${SITE_KEYGEN[$s]}" = 1 ]; then
        fedarches site keygen --out "${SITE_KEY_DIR[$s]}"
    elif [ ! -f "${SITE_KEY_DIR[$s]}/site.pub" ]; then
        echo "site $s: key-dir ${SITE_KEY_DIR[$s]} has no site.pub (make it with \`fedarches site keygen --out DIR\`)" >&2
        exit 2
    fi
done
# ... whose public half the coordinator enrolls (handed over out of band)
for s in $SITES; do
    fedarches atlas enroll "$WORK/atlas" --site "$s" --public-key "${SITE_KEY_DIR[$s]}/site.pub"
done

# each site's SuperNode node config: its name, data, condition key, key, pinned trust root
for s in $SITES; do
    mkdir -p "$WORK/sites/$s"
    cp "$WORK/atlas/root.json" "$WORK/sites/$s/root.json"      # handed over out of band
    python "$HERE/federation_config.py" "$FEDERATION_CONFIG" --node-config "$s" > "$WORK/sites/$s/node-config.toml"
done
echo "prepared $WORK"
