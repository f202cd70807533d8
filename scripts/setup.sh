#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent; safe to rerun.
# On a machine without an NVIDIA GPU, torch's CPU wheel is installed first so that no multi-GB CUDA
# build is pulled in by the other packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found; installing the default (CUDA) torch"
else
  echo "setup: no NVIDIA GPU; installing the CPU build torch==2.13.0 first"
  "${PIP[@]}" install 'torch==2.13.0'
fi
"${PIP[@]}" install -e '.[dev]' -c constraints.txt
touch "$VENV/.installed"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
