#!/usr/bin/env bash
# The test command: installs missing packages, builds, and runs every test through ctest.
# Usage: deploy/test.sh [ctest options], e.g. deploy/test.sh -L integration
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
"$root/deploy/install-deps.sh" --test
BUILD_TARGETS=all "$root/deploy/build.sh"  # everything: the tests use more than the demo
# The official OpenAI client (npm package "openai") that a test drives against the gateway.
if [[ ! -d "$root/tests/openai_client/node_modules/openai" ]]; then
  (cd "$root/tests/openai_client" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
cd "$build"
ctest --output-on-failure -j "$(nproc)" --timeout 300 "$@"
