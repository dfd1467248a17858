#!/usr/bin/env bash
# The README's "Test it" command, and what CI runs: installs what is missing, builds the
# one profile once, and runs every test (unit, RFC 4475 corpus, black-box tests that start
# real tandem processes and drive them with sipp and real softphones).
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
# A test this machine cannot run is left out by name, said here, and counted as skipped in
# nextest's summary; it is never run to pass silently.
skip=()
probe=$(mktemp -d)
if [ "$(id -u)" -eq 0 ] && ! chattr +i "$probe" 2> /dev/null; then
  echo "test: skipping a_data_dir_that_is_not_writable_is_refused_with_its_path:" \
    "root cannot make a directory read-only without chattr +i, which $(dirname "$probe") does not support" >&2
  skip+=("test(a_data_dir_that_is_not_writable_is_refused_with_its_path)")
fi
chattr -i "$probe" 2> /dev/null || true
if [ "$(id -u)" -ne 0 ]; then
  echo "test: skipping the network-namespace fault tests (named netns_*) and the disk" \
    "fault tests (named root_*): namespaces and mounts need root; CI runs as root" >&2
  skip+=("test(/^netns_/)" "test(/^root_/)")
fi
rmdir "$probe"
filter=()
if [ ${#skip[@]} -gt 0 ]; then
  filter=(-E "not ($(IFS='|'; echo "${skip[*]}"))")
fi
cargo nextest run --workspace --no-fail-fast "${filter[@]}"
echo "test: all tests passed in $(( $(date +%s) - started )) s" >&2
