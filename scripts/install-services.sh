#!/usr/bin/env bash
# Install the real services the tests and deploy/ run, from Debian's packages, where missing:
#   scripts/install-services.sh                 # all of them
#   scripts/install-services.sh redis nginx     # only these (names: redis nginx prometheus chromium)
# redis: redis-server (the shared session store); nginx: the gRPC balancer (deploy/nginx);
# prometheus: promtool, for `promtool check rules` / `promtool test rules` (deploy/prometheus);
# chromium: the browser the gateway's demo page is tested in (driven by Playwright).
# Nothing is started here and no system service is enabled: the tests start their own
# instances on loopback ports in temporary folders. Needs root (or sudo) and apt only when
# something is missing; a no-op otherwise.
set -euo pipefail

declare -A PACKAGE=([redis]=redis-server [nginx]=nginx [prometheus]=prometheus [chromium]=chromium)
declare -A BINARY=([redis]=redis-server [nginx]=nginx [prometheus]=promtool [chromium]=chromium)

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(redis nginx prometheus chromium)

missing=()
for name in "${names[@]}"; do
  if [ -z "${PACKAGE[$name]:-}" ]; then
    echo "install-services: unknown service '$name' (known: ${!PACKAGE[*]})" >&2
    exit 2
  fi
  # nginx and redis-server live in /usr/sbin, which a non-root PATH may lack.
  if ! PATH="$PATH:/usr/sbin" command -v "${BINARY[$name]}" >/dev/null; then
    missing+=("${PACKAGE[$name]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    echo "install-services: ${missing[*]} missing; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install-services: ${missing[*]} missing and no apt-get here; install them with your package manager" >&2
  exit 1
fi
echo "install-services: installing ${missing[*]} (Debian packages)" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the packages' postinst scripts must not start system-wide daemons on
# the default ports (tests start their own on free ports).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  created_policy=1
fi
trap '[ $created_policy -eq 1 ] && "${sudo[@]}" rm -f "$policy"' EXIT
"${sudo[@]}" apt-get update -qq >&2 || true
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
