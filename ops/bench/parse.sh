#!/usr/bin/env bash
# INVITE parse + serialise throughput of the SIP wire format on one core.
# Usage: ./ops/bench/parse.sh   (prints messages/s; record results in BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
. ./ops/env.sh
cargo build -p tandem-sip --benches --profile dev
# Pin to one core so the figure is per core whatever else the machine runs.
exec taskset -c 0 cargo bench --profile dev -p tandem-sip --bench parse
