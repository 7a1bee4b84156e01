#!/usr/bin/env bash
# The test command: installs missing packages, builds, and runs every test through ctest.
# Usage: deploy/test.sh [ctest options], e.g. deploy/test.sh -L integration
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
"$root/deploy/install-deps.sh" --test
"$root/deploy/build.sh"
cd "$build"
ctest --output-on-failure -j "$(nproc)" --timeout 300 "$@"
