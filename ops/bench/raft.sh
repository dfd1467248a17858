#!/usr/bin/env bash
# Committed proposals/s and commit latency (p50/p99) for 300-byte commands at 1, 16 and
# 256 concurrent proposers, on an in-process three-replica cluster with real RocksDB fsyncs.
# Usage: ./ops/bench/raft.sh   (record the output in BENCHMARKS.md with this command)
set -euo pipefail
cd "$(dirname "$0")/../.."
. ./ops/env.sh
exec cargo bench --profile dev -p tandem-raft-store --bench propose
