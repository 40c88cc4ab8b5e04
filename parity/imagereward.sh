#!/usr/bin/env bash
# ImageReward parity: the original `image-reward` 1.5 package (in its own virtual environment, transformers 4.x,
# timm 0.6.13) against rewards/imagereward.py (the project's environment, transformers 5.x), on the same random
# weights of the real architecture (ViT-L/16 + BERT-base, 447 M parameters), the same tokenizer files and the same
# 10 image/prompt pairs.  Fails unless every score agrees to 1e-4.  Usage: make parity  (or bash parity/imagereward.sh)
#   PARITY_VENV  the isolated environment (default .parity-venv, git-ignored; built on first use, about a minute)
#   PARITY_WORK  where the 1.8 GB of weights and the images go (default: a temporary folder, removed afterwards)
#   PY           the project's Python (default .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${PARITY_VENV:-$ROOT/.parity-venv}"
PY="${PY:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

# The package's era: transformers < 5 (its BLIP code uses APIs 5.x removed), timm 0.6.13 (its pin), and the
# libraries `import ImageReward` pulls in.  torch stays the project's CPU build through constraints.txt;
# image-reward and fairscale go in with --no-deps so that pip does not re-resolve their pins.
PINS="torch==2.13.0 torchvision==0.28.0 transformers==4.49.0 huggingface-hub==0.36.2 timm==0.6.13 \
accelerate==1.4.0 diffusers==0.32.2 datasets==2.21.0 setuptools<81"
NODEPS="image-reward==1.5 fairscale==0.4.13"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$PINS $NODEPS" ]; then
    echo "parity: building $VENV (original image-reward 1.5 and its era's libraries)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -qq --disable-pip-version-check -c constraints.txt $PINS
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -qq --disable-pip-version-check --no-deps -c constraints.txt $NODEPS
    echo "$PINS $NODEPS" > "$VENV/.installed"
fi

if [ -n "${PARITY_WORK:-}" ]; then
    WORK="$PARITY_WORK"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/imagereward-parity.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/hub" "$WORK/hf" results/parity

# Side 1: the original package, offline (its tokenizer and files come from the Hugging Face cache it fills).
# parity/stubs provides the undeclared `clip` module, which only the package's CLIP baselines use.
HF_HOME="$WORK/hf" HF_HUB_CACHE="$WORK/hub" HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT/parity/stubs" \
    "$VENV/bin/python" parity/imagereward_original.py --work "$WORK"

# Side 2: ours, constructed with no arguments as a run does (files from that cache; no offline switch needed).
env -u HF_HUB_OFFLINE -u DIFFALIGN_IMAGEREWARD_DIR HF_HOME="$WORK/hf" HF_HUB_CACHE="$WORK/hub" \
    "$PY" parity/imagereward_ours.py --work "$WORK"

cp "$WORK/parity.json" results/parity/imagereward.json
echo "parity: done in $(( $(date +%s) - start )) s; details in results/parity/imagereward.json"
