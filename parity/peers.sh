#!/usr/bin/env bash
# make peers: trl 0.23.1 (the last release with DDPOTrainer and AlignPropTrainer) in its own environment beside ours,
# in one run: seconds per step and peak memory of both, and trl's DDIM step log-prob against ours (parity/peers.py).
#   PEERS_VENV  the peer environment (default .peers-venv, git-ignored; built on first use, about two minutes)
#   PY          the project's Python (default .venv/bin/python)
# Why its own environment: trl 0.23.1 needs transformers 4.x (the project runs 5.x), and no trl release that has
# these trainers supports transformers 5.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${PEERS_VENV:-$ROOT/.peers-venv}"
PY="${PY:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
# The versions that resolved for `pip install torch==2.13.0 trl==0.23.1 "transformers<5" diffusers peft accelerate`
# (no torchvision is pulled, so no shim is needed there), pinned so the peer is the same on every machine.
PINS="torch==2.13.0 trl==0.23.1 transformers==4.57.6 diffusers==0.39.0 peft==0.21.2 accelerate==1.16.0 \
huggingface-hub==0.36.2"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$PINS" ]; then
    echo "peers: building $VENV (trl 0.23.1 and its era's libraries)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -qq --disable-pip-version-check $PINS
    echo "$PINS" > "$VENV/.installed"
fi
PEERS_PY="$VENV/bin/python" "$PY" parity/peers.py "$@"
