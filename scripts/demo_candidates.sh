#!/usr/bin/env bash
# Candidates for a stronger demo model: LSTMs larger than the 2x256 demo, trained side by side on
# one GPU from ../shared/data/mixed/train-open.txt (laid out by scripts/layout_mixed.sh),
# each exported, made into a static int8 bundle (the committed demo must stay under 25 MB, and a
# 2x512 LSTM is 37 MB in fp32), and its perplexity scored by `nextword quantize`.
#
#   scripts/demo_candidates.sh                          # on a GPU, MINUTES (default 7) of training each
#   DEVICE=cpu MINUTES=0.2 DATA=DIR scripts/demo_candidates.sh   # a smoke run on a small DIR
#
# Then, on the CPU that serves them, for each int8 bundle B (keystrokes against Presage, by source;
# Presage's own runs are kept after the first bundle's, so later ones take about 15 minutes less):
#   python -m benchmarks.ksr_sources --bundle B --presage-corpus mixed
# Several small trainings share one GPU well: one 2x256 run alone leaves most of it idle.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-runs/mixed-open}
[ -n "${DATA:-}" ] || scripts/layout_mixed.sh "$data"
runs=${RUNS:-runs/candidates}
minutes=${MINUTES:-7}
device=${DEVICE:-cuda}
mkdir -p "$runs"

# name, then nextword train's options for it
candidates=(
    "lstm512 --hidden-size 512 --embedding-dim 512 --dropout 0.4"
    "lstm768 --hidden-size 768 --embedding-dim 768 --dropout 0.5"
    "lstm512-v20k --hidden-size 512 --embedding-dim 512 --dropout 0.4 --vocab-size 20000"
)
for candidate in "${candidates[@]}"; do
    set -- $candidate
    name=$1
    shift
    # Each run writes its own log; nextword train will not write over a run left by an earlier try.
    python -m nextword.cli train --data "$data" --format raw --out "$runs/$name" --device "$device" \
        --epochs 60 --batch-size 64 --max-minutes "$minutes" "$@" >"$runs/$name.log" 2>&1 &
done
wait

for candidate in "${candidates[@]}"; do
    set -- $candidate
    name=$1
    python -m nextword.cli export "$runs/$name" --out "$runs/$name.bundle" --name mixed
    python -m nextword.cli quantize "$runs/$name.bundle" --out "$runs/$name.int8" --data "$data"
    echo "$name: $(grep '^epoch' "$runs/$name.log" | tail -1 | cut -d: -f1), $(tail -1 "$runs/$name.log"); int8 bundle $(du -sh "$runs/$name.int8" | cut -f1)"
done
