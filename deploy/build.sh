#!/usr/bin/env bash
# Installs missing packages and builds infergate into build/ (or $BUILD_DIR).
# Usage: deploy/build.sh [extra cmake -D options]
# Environment: BUILD_DIR, BUILD_TYPE (default Release), BUILD_TARGETS (the targets to build,
#   space-separated, e.g. "infergate infergate-mock"; default all).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
read -ra targets <<<"${BUILD_TARGETS:-all}"
"$root/deploy/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" "$@" >/dev/null
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"
