#!/usr/bin/env bash
# Fuzzes the SIP wire format for a bounded time: ./ops/fuzz.sh [SECONDS] (default 600).
# Seeds come from the RFC 4475 corpus. A crash leaves its input under
# sip/fuzz/artifacts/parse/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
. ./ops/env.sh
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz needs nightly features; the machine's one toolchain is stable.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$CARGO_TARGET_DIR/../fuzz-target"
corpus=sip/fuzz/corpus/parse
mkdir -p "$corpus"
cp sip/tests/rfc4475/*.sip "$corpus"/
cd sip
echo "fuzz: running the parse target for $seconds s" >&2
cargo fuzz run parse -- -max_total_time="$seconds" -max_len=70000 -print_final_stats=1
