#!/usr/bin/env bash
# Installs the Debian 12 packages infergate needs to build and run its demo (--test: also what the
# tests use; --bench: the peer proxies and load generator; --fuzz: clang with libFuzzer's runtime,
# and ninja).
# Idempotent and quiet when everything is already there. Needs root (or sudo) only to install.
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libboost1.81-all-dev   # by name: Debian 12's default Boost is 1.74
  nlohmann-json3-dev libspdlog-dev libyaml-cpp-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev
  curl
)
for arg in "$@"; do
  case "$arg" in
    --test)
      packages+=(prometheus chromium)   # promtool checks /metrics; chromium loads the status page
      command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)  # the OpenAI client test
      ;;
    --bench) packages+=(wrk nginx haproxy procps) ;;
    --fuzz) packages+=(clang libclang-rt-14-dev ninja-build) ;;  # the runtime is only a Recommends of clang
    *) echo "usage: $0 [--test] [--bench] [--fuzz]" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  [[ "$p" == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "infergate: installing ${missing[*]}" >&2
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "infergate: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
