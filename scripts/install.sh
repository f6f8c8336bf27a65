#!/usr/bin/env bash
# Install nextword into a local virtual environment and generate the gRPC stubs.
#   scripts/install.sh [EXTRAS]     EXTRAS: serve (default) | train | dev
# Environment: PYTHON (default python3), VENV (default .venv),
#   TORCH_INDEX_URL (extra index for the torch wheel, e.g. https://download.pytorch.org/whl/cpu).
# The Dockerfile and CI call this same script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${1:-serve}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install: nextword needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "install: installing nextword[$EXTRAS] into $VENV (pinned by constraints.txt)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        --constraint constraints.txt --editable ".[$EXTRAS]"
    touch "$stamp"
fi
VENV="$VENV" scripts/gen_proto.sh
