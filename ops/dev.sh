#!/usr/bin/env bash
# The README's "Run it" command: installs what is missing, builds, and starts one Tandem
# node with the embedded defaults: SIP on 127.0.0.1:5060 (UDP and TCP), data under ./data.
# Ctrl-C stops it. Extra arguments go to `tandem run` (e.g. --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
. ./ops/env.sh
# The same build as ./ops/test.sh, so the two share every artefact.
cargo build --workspace --all-targets
cat >&2 <<MSG

Tandem is starting on 127.0.0.1:5060 (UDP and TCP), data in ./data.
Probe it from another terminal:
  sipp -sf ops/sipp/options.xml -m 1 -i 127.0.0.1 -p 5070 127.0.0.1:5060
Stop it with Ctrl-C (fast) or SIGTERM (drains first).

MSG
exec "$TANDEM_BIN" run "$@"
