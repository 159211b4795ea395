#!/usr/bin/env bash
# Rebuild models/demo by running the exact commands recorded in its manifest
# (export.reproduce: train on ../shared/data/gutenberg, then export).
# They train with --device cuda; on a machine without a GPU run them by hand with
# --device cpu (the same model, about 2,000 words/s on 2 cores instead of 200,000).
# nextword train will not write over a run: remove a runs/demo left by an earlier try first.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=$(python -c "import json; print(json.load(open('models/demo/manifest.json'))['export']['reproduce'])")
echo "+ $cmd"
eval "$cmd"
