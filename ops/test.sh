#!/usr/bin/env bash
# The README's "Test it" command, and what CI runs: installs what is missing, builds the
# one profile once, and runs every test (unit, RFC 4475 corpus, black-box tests that start
# real tandem processes and drive them with sipp).
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
. ./ops/env.sh
echo "test: build cache at $CARGO_TARGET_DIR" >&2

started=$(date +%s)
cargo fmt --all -- --check
python3 ops/check-imports.py
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
if [ "$(id -u)" -ne 0 ]; then
  echo "test: not root: tests that need network namespaces will say that they skip" >&2
fi
cargo nextest run --workspace --no-fail-fast
echo "test: all tests passed in $(( $(date +%s) - started )) s" >&2
