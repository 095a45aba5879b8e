#!/usr/bin/env bash
# Creates the peers' own virtual environment (scvi-tools, scarches) for the
# benchmarks. These are NEVER dependencies of fedarches: they live in
# benchmarks/work/peers-venv and are only ever run as subprocesses that
# exchange files (h5ad / npz / json) with the harness.
#
# torch==2.13.0 is installed FIRST (the local CPU build); anything that lets pip
# pick a newer torch pulls a multi-GB CUDA build. benchmarks/peers-constraints.txt
# pins every other package (written from `pip freeze` of a venv that worked).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PY:-python3.11}"
VENV="${PEERS_VENV:-$HERE/work/peers-venv}"
CONSTRAINTS="$HERE/peers-constraints.txt"
STAMP="$VENV/.fedarches-peers-ok"

if [[ -f "$STAMP" && "$STAMP" -nt "$CONSTRAINTS" ]]; then
  exit 0
fi
command -v "$PY" >/dev/null 2>&1 || { echo "need $PY on PATH (or PY=python3 $0)"; exit 1; }
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"$VENV/bin/python" -m pip install -q --upgrade pip
if [[ -f "$CONSTRAINTS" ]]; then
  "${PIP[@]}" -c "$CONSTRAINTS" torch==2.13.0
  "${PIP[@]}" -c "$CONSTRAINTS" scvi-tools scarches
else
  # first time: find a working set, then freeze it
  printf 'torch==2.13.0\n' > "$VENV/torch-pin.txt"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -c "$VENV/torch-pin.txt" 'scvi-tools>=1.4,<1.5' 'scarches==0.6.1'
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' > "$CONSTRAINTS"
fi
"$VENV/bin/python" - <<'PY'
import anndata
anndata.read = anndata.read_h5ad  # scarches 0.6.1 imports anndata.read
import scvi, scarches, torch
print("peers venv ok: scvi-tools", scvi.__version__, "scarches", getattr(scarches, "__version__", "?"), "torch", torch.__version__)
PY
touch "$STAMP"
