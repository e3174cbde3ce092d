#!/usr/bin/env bash
# Set up, then run every check CI runs: generated code current, lint, format, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh
echo "==> generated gRPC code is current"
.venv/bin/python tools/gen_protos.py --check
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy services models tools
tools/check_helm.sh
# tests/server runs tests/test_retrieval_service.py once more, against the Milvus server that
# tools/setup.sh installed (milvus-lite for the first run): about two minutes more.
echo "==> pytest"
.venv/bin/python -m pytest "$@"
