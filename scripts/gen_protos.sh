#!/usr/bin/env bash
# Regenerate the Python stubs in nextword/v1/ from protos/ (the source of truth).
# tests/test_protos.py fails when the committed stubs are out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
python -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/nextword/v1/nextword.proto
