#!/usr/bin/env bash
# Lay out ../shared/data/mixed as the data folder `nextword train` reads (train.txt, valid.txt,
# test.txt), with train-open.txt, the text a shipped model may train on, as its train.txt.
# The files are links: the corpus is only read, never copied into the project.
#
#   scripts/layout_mixed.sh [DIR]   # default runs/mixed-open
set -euo pipefail
cd "$(dirname "$0")/.."
mixed=../shared/data/mixed
data=${1:-runs/mixed-open}
mkdir -p "$data"
ln -sf "$(realpath "$mixed/train-open.txt")" "$data/train.txt"
ln -sf "$(realpath "$mixed/valid.txt")" "$data/valid.txt"
ln -sf "$(realpath "$mixed/test.txt")" "$data/test.txt"
