#!/usr/bin/env bash
# Coordinator and sites, before any Flower process: data, atlas, site keys, enrollment.
set -euo pipefail
. "$(dirname "$0")/env.sh"

# (example only) generated data: a reference for the coordinator, one file per site
python "$HERE/make_data.py" "$WORK/data" $SITES

# coordinator: a new atlas, its reference version 1
fedarches atlas init "$WORK/atlas" --name flower-example
fedarches atlas build "$WORK/atlas" --data "$WORK/data/reference.h5ad" \
    --condition-key study --label-key cell_type --epochs 40 --quiet

# each site: its own Ed25519 key (the private key never leaves the site) ...
for s in $SITES; do
    fedarches site keygen --out "$WORK/sites/$s/keys"
done
# ... whose public half the coordinator enrolls (handed over out of band)
for s in $SITES; do
    fedarches atlas enroll "$WORK/atlas" --site "$s" --public-key "$WORK/sites/$s/keys/site.pub"
done

# each site's SuperNode node config: its name, data, condition key, key, pinned trust root
for s in $SITES; do
    cp "$WORK/atlas/root.json" "$WORK/sites/$s/root.json"      # handed over out of band
    cat > "$WORK/sites/$s/node-config.toml" <<TOML
site = "$s"
data = "$WORK/data/$s.h5ad"
condition-key = "study"
key-dir = "$WORK/sites/$s/keys"
trust-root = "$WORK/sites/$s/root.json"
out-dir = "$WORK/sites/$s/results"
TOML
    if [ -n "$EPOCHS" ]; then echo "epochs = $EPOCHS" >> "$WORK/sites/$s/node-config.toml"; fi
done
echo "prepared $WORK"
