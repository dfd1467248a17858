#!/usr/bin/env bash
# Resident memory per registered AOR: a three-node cluster (ops/bench/cluster.sh), COUNT
# accounts created through node 1's admin API and each registered once through node 1
# (REGISTER, 401, REGISTER with MD5 credentials, 200) and refreshed once, then node 1's
# VmRSS growth divided by COUNT. The growth covers the account and the binding, in every
# layer (Raft log, RocksDB, caches: the refresh fills the bindings the node keeps in memory). Target: at most 2 KiB per AOR at 100,000.
# Usage: ./ops/bench/aor-memory.sh [COUNT] [WORKERS]   (defaults 100000 and 64)
# BENCH_TANDEM_BIN runs another tandem binary, such as an earlier build for a before/after.
# Record the output in BENCHMARKS.md with this command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-100000}"
workers="${2:-64}"
. ./ops/bench/build.sh
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
. ./ops/bench/cluster.sh
form_cluster
echo "three tandem processes on 127.0.0.1-3, $(nproc) cores; $count AORs registered through node 1"
"$CARGO_TARGET_DIR/debug/aor-load" "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" \
  "$count" "$workers" 2> "$work/progress.log"
for i in 2 3; do
  echo "node $i (replica only): $(awk '/VmRSS/ {print $2, $3}' "/proc/${node_pid[i]}/status")"
done
