#!/usr/bin/env bash
# Committed writes/s and commit latency (p50/p99) of a three-process cluster on loopback
# (127.0.0.1/.2/.3), each node with its own RocksDB and real fsyncs, Raft over mutual TLS,
# 300-byte commands, 1, 16 and 256 concurrent writers, measured two ways:
#  A. proposers inside the leader process (as the registrar and the other agents write),
#     through the admin API's write check: the Raft write path itself;
#  B. PutCustomer requests from an external client with one keep-alive HTTP connection per
#     writer: latency is sent → 200, one loopback HTTP round trip on top of the commit.
# Usage: ./ops/bench/raft-cluster.sh [SECONDS_PER_LEVEL]   (default 10)
# Record the output in BENCHMARKS.md with this command.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-10}"
. ./ops/bench/build.sh
load="$CARGO_TARGET_DIR/debug/admin-load"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

. ./ops/bench/cluster.sh
form_cluster

echo "three tandem processes on 127.0.0.1-3, $(nproc) cores, ${seconds}s per level, writes to node 1 (leader)"
echo "A. Raft write path: proposers inside the leader, as the SIP agents propose (POST /v1/cluster/write-check)"
token=$(cat "$work/admin.token")
for c in ${LEVELS:-1 16 256}; do
  curl -sS --max-time $((seconds + 30)) -H "Authorization: Bearer $token" \
    -d "{\"proposers\": $c, \"seconds\": $seconds, \"command_bytes\": 300}" \
    "http://$admin1/v1/cluster/write-check"
  echo
done
echo "B. Admin API clients: one keep-alive HTTP connection per writer (admin-load)"
"$load" "$admin1" "$work/admin.token" 16 2 > /dev/null   # warm-up
for c in ${LEVELS:-1 16 256}; do
  "$load" "$admin1" "$work/admin.token" "$c" "$seconds"
done
"$TANDEM_BIN" cluster status --config "$work/node1/tandem.toml" | head -4
