#!/usr/bin/env bash
# Build KenLM's lmplz, build_binary and query from the kenlm sdist on PyPI, once.
#
#   benchmarks/kenlm/build.sh        # prints the path of lmplz (the other two sit beside it)
#
# Output goes to benchmarks/.cache/kenlm/ (git-ignored); a second run only prints the path.
# Build dependencies come from Debian (boost, cmake, a C++ compiler); they are installed with
# apt-get when missing and we are root, otherwise the script says what to install.
set -euo pipefail

KENLM_VERSION="${KENLM_VERSION:-0.3.0}"  # pinned: the baseline's numbers should not drift with PyPI
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="$ROOT/benchmarks/.cache/kenlm"
BIN="$CACHE/build/bin"
TOOLS=(lmplz build_binary query)

built() {
  local t
  for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

if built; then
  echo "$BIN/lmplz"
  exit 0
fi

# Everything below logs to stderr so that stdout stays the one path callers read.
exec 3>&1 1>&2

PACKAGES=(cmake g++ make libboost-program-options-dev libboost-system-dev libboost-thread-dev
  libboost-test-dev libeigen3-dev zlib1g-dev libbz2-dev liblzma-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "kenlm: installing ${missing[*]}"
    # Only refresh the package lists when they were never fetched (fresh containers).
    if [[ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]]; then
      apt-get update -q
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "kenlm: missing build dependencies: ${missing[*]} (install them, e.g. with apt-get)" >&2
    exit 1
  fi
fi

SRC="$CACHE/kenlm-$KENLM_VERSION"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  mkdir -p "$CACHE/dl"
  # --no-build-isolation: otherwise pip builds the sdist's build requirements (cmake!) from
  # source just to read its metadata, which takes far longer than KenLM itself.
  python -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$CACHE/dl" "kenlm==$KENLM_VERSION"
  tar -xzf "$CACHE/dl/kenlm-$KENLM_VERSION.tar.gz" -C "$CACHE"
fi

start=$SECONDS
cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DCOMPILE_TESTS=OFF \
  -DENABLE_PYTHON=OFF -DENABLE_INTERPOLATE=OFF >/dev/null
cmake --build "$CACHE/build" -j "$(nproc)" --target "${TOOLS[@]}"
built || { echo "kenlm: build finished but ${TOOLS[*]} are not all in $BIN" >&2; exit 1; }
echo "kenlm: built in $((SECONDS - start)) s"
echo "$BIN/lmplz" >&3
