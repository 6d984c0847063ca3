#!/usr/bin/env bash
# Create the private venv of one peer library:  bash tools/peers/setup.sh recbole|rectools
# The venv lives outside the repo (~/.cache/recbook/peers/NAME-venv) and is never a dependency of
# recbook: run_peers.py calls its python as a subprocess.
# torch is pinned exactly (==2.13.0): a range lets pip pull a multi-GB CUDA build.
# A venv is complete only once .recbook-peer-ok is written; a half-built one is rebuilt.
set -euo pipefail
NAME="${1:?usage: bash tools/peers/setup.sh recbole|rectools}"
ROOT="${RECBOOK_PEERS_DIR:-$HOME/.cache/recbook/peers}"
VENV="$ROOT/$NAME-venv"
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
case "$NAME" in
  recbole)
    # RecBole 1.2.1 uses np.float_ (removed in numpy 2): pin numpy 1.26.4. Left alone pip picks
    # pandas 3, which RecBole (2023) predates: pin pandas 2.3.3 (the line rectools resolves to).
    # RecBole pins ray<=2.6.3, whose import needs pkg_resources (gone from setuptools>=81); only
    # recbole.quick_start imports ray, the runner does not, but setuptools<81 keeps it importable.
    # Remaining torch-2.x issues are patched at import in recbole_sasrec.py.
    PKGS=("recbole==1.2.1" "numpy==1.26.4" "pandas==2.3.3" "setuptools<81" "$TORCH")
    ;;
  rectools)
    PKGS=("rectools[torch]==0.19.0" "$TORCH")
    ;;
  *) echo "unknown peer '$NAME' (recbole or rectools)" >&2; exit 2;;
esac
if [ -f "$VENV/.recbook-peer-ok" ]; then echo "$VENV is ready"; exit 0; fi
rm -rf "$VENV"
mkdir -p "$ROOT"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${PKGS[@]}"
"$VENV/bin/python" -m pip freeze > "$VENV/.recbook-peer-ok"
echo "$VENV is ready"
