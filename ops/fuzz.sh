#!/usr/bin/env bash
# Fuzzes the SIP wire format for a bounded time: ./ops/fuzz.sh [SECONDS] [TARGET]
# (default 600 s, target parse). Targets: parse (messages, stream framing, every accessor)
# and auth (the digest header parser). Seeds come from the RFC 4475 corpus. A crash leaves
# its input under sip/fuzz/artifacts/TARGET/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
target="${2:-parse}"
. ./ops/env.sh
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz needs nightly features; the machine's one toolchain is stable.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$CARGO_TARGET_DIR/../fuzz-target"
corpus="sip/fuzz/corpus/$target"
mkdir -p "$corpus"
case "$target" in
  parse) cp sip/tests/rfc4475/*.sip "$corpus"/ ;;
  auth)
    printf '%s' 'Digest username="alice", realm="example.com", nonce="6b13.1.ab.cd", uri="sip:example.com", response="0123", algorithm=MD5, qop=auth, nc=00000001, cnonce="x"' > "$corpus/credentials"
    printf '%s' 'Digest realm="example.com", nonce="6b13.1.ab.cd", algorithm=SHA-256, qop="auth", stale=true' > "$corpus/challenge"
    ;;
  *) echo "fuzz: unknown target $target (parse or auth)" >&2; exit 64 ;;
esac
cd sip
echo "fuzz: running the $target target for $seconds s" >&2
cargo fuzz run "$target" -- -max_total_time="$seconds" -max_len=70000 -print_final_stats=1
