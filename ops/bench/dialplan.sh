#!/usr/bin/env bash
# Dialplan runs per second on one core: the sandbox running whole runs of two scripts
# (dialplan/benches/runs.rs), pinned to core 0.
# Usage: ./ops/bench/dialplan.sh   (prints runs/s per script; record results in BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
. ./ops/env.sh
cargo build -p tandem-dialplan --benches --profile dev
exec taskset -c 0 cargo bench --profile dev -p tandem-dialplan --bench runs
