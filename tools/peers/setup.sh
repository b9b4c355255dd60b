#!/usr/bin/env bash
# Create .venv-peers at the repo root: the peer converters (litdata) for tools/bench_convert.py
# and loaders (MosaicML streaming, litdata) for tools/bench_peers.py, isolated from the
# project's .venv and its pins.
# torch goes in first, alone, under constraints.txt, so the CPU wheel is the one taken and
# nothing litdata pulls in can upgrade it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-peers
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# Keep the environment out of git and of tools (ruff) that honour .gitignore.
echo '*' > "$VENV/.gitignore"
"$VENV/bin/pip" install --quiet -c tools/peers/constraints.txt torch==2.13.0
"$VENV/bin/pip" install --quiet -c tools/peers/constraints.txt -r tools/peers/requirements.txt
"$VENV/bin/python" -c "import importlib.metadata as m, litdata, torch; print('peers ready: litdata', litdata.__version__, 'mosaicml-streaming', m.version('mosaicml-streaming'), 'torch', torch.__version__)"
