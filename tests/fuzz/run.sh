#!/usr/bin/env bash
# Fuzzes infergate's parsers (HTTP/1.1 heads and bodies, hostlists, usage scanning) with
# libFuzzer, ASan and UBSan for a while, starting from the checked-in corpus.
# Usage: tests/fuzz/run.sh [seconds (default 60)] [extra libFuzzer flags]
# FUZZ_KEEP_CORPUS=1 keeps the grown corpus (its directory is printed).
# A crash leaves crash-* in the current directory: copy it into tests/fuzz/corpus once fixed,
# and the ctest replay keeps it fixed.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
shift || true
build="${FUZZ_BUILD_DIR:-$root/build-fuzz}"
"$root/deploy/install-deps.sh" --test --fuzz
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DINFERGATE_FUZZ=ON >/dev/null
cmake --build "$build" --target infergate-fuzz
# The grown corpus is kept only with FUZZ_KEEP_CORPUS=1 (crash files land in the current directory).
work="$(mktemp -d /tmp/infergate-fuzz.XXXXXX)"
[[ "${FUZZ_KEEP_CORPUS:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
cp "$root"/tests/fuzz/corpus/* "$work/"
"$build/tests/fuzz/infergate-fuzz" -max_total_time="$seconds" -max_len=4096 -timeout=10 "$@" "$work"
echo "fuzzed for ${seconds}s; the corpus grew to $(ls "$work" | wc -l) inputs${FUZZ_KEEP_CORPUS:+ in $work}"
