#!/usr/bin/env bash
# Fetch Triton's perf_analyzer, once, from the package registry: the real binary ships inside the
# tritonclient 2.41.0 wheel (the PyPI package named perf-analyzer is an empty placeholder). It
# links libb64 (Debian's libb64-0d, installed with apt-get when missing and we are root) and
# libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel; no GPU is needed to run it).
#
#   benchmarks/perf_analyzer/fetch.sh     # prints: LD_LIBRARY_PATH-folder perf_analyzer-path
#
# Output goes to benchmarks/.cache/perf_analyzer/ (git-ignored); a second run only prints.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="$ROOT/benchmarks/.cache/perf_analyzer"
BIN="$CACHE/tritonclient-2.41.0.data/data/bin/perf_analyzer"
LIB="$CACHE/nvidia/cuda_runtime/lib"

if [[ ! -x "$BIN" || ! -e "$LIB/libcudart.so.12" ]]; then
  exec 3>&1 1>&2
  mkdir -p "$CACHE/wheels"
  python -m pip download -q --no-deps -d "$CACHE/wheels" tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.4.127
  python - "$CACHE" <<'PY'
import sys, zipfile, pathlib
cache = pathlib.Path(sys.argv[1])
for wheel in (cache / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith("/bin/perf_analyzer") or "libcudart.so" in name:
                z.extract(name, cache)
(cache / "tritonclient-2.41.0.data/data/bin/perf_analyzer").chmod(0o755)
PY
  exec 1>&3
fi
if ! ldconfig -p | grep -q "libb64.so.0d"; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >&2
  else
    echo "perf_analyzer needs libb64: apt-get install libb64-0d" >&2
    exit 1
  fi
fi
echo "$LIB $BIN"
