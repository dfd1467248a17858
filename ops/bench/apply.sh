#!/usr/bin/env bash
# What one replica's state machine spends applying a registration storm's writes
# (raft-store/benches/apply.rs): µs per replaced binding per pass, then, under callgrind,
# instructions per replaced binding, which a shared machine's noise does not move: the
# bench run with its passes applied and with their commands only built, the difference
# divided by PASSES × COUNT, so registering the AORs and building the commands cancel out.
# Usage: ./ops/bench/apply.sh [COUNT] [PASSES]   (defaults 50000 and 4; record the output
# in BENCHMARKS.md with this command)
set -euo pipefail
cd "$(dirname "$0")/../.."
. ./ops/env.sh
count="${1:-50000}"
passes="${2:-4}"
cargo bench --profile dev -p tandem-raft-store --bench apply --no-run 2> "${TMPDIR:-/tmp}/apply-build.log" \
  || { cat "${TMPDIR:-/tmp}/apply-build.log" >&2; exit 1; }
bin=$(ls -t "$CARGO_TARGET_DIR"/debug/deps/apply-* | grep -v '\.d$' | head -1)
"$bin" "$count" "$passes"
if ! command -v valgrind > /dev/null; then
  echo "valgrind is not installed: no instruction counts" >&2
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
instructions() {
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin" "$count" "$passes" ${1:+"$1"} \
    > /dev/null 2> "$out/log"
  sed -n 's/.*Collected : \([0-9]*\)$/\1/p' "$out/log"
}
with=$(instructions "")
without=$(instructions build-only)
echo "instructions per binding applied (callgrind): $(( (with - without) / (passes * count) ))"
