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
. ./ops/env.sh
# The same build as ./ops/test.sh, so the two share every artefact.
cargo build --workspace --all-targets
load="$CARGO_TARGET_DIR/debug/admin-load"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# Free ports: the kernel picks, per address.
port() { python3 -c "import socket; s=socket.socket(); s.bind(('$1', 0)); print(s.getsockname()[1])"; }

"$TANDEM_BIN" cert ca --out "$work/ca" > /dev/null
"$TANDEM_BIN" keygen --out "$work/master.key" > /dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/admin.token"
for i in 1 2 3; do
  ip="127.0.0.$i"
  "$TANDEM_BIN" cert node --ca "$work/ca" --name "node$i" --san "$ip" --out "$work/certs" > /dev/null
  mkdir -p "$work/node$i"
  cp "$work/master.key" "$work/node$i/master.key"
  cat > "$work/node$i/tandem.toml" <<TOML
[node]
id = $i
data_dir = "$work/node$i/data"
master_key = "$work/node$i/master.key"
[sip]
udp = ["$ip:$(port "$ip")"]
tcp = []
[cluster]
listen = "$ip:$(port "$ip")"
ca_certificate = "$work/certs/ca.crt"
certificate = "$work/certs/node$i.crt"
private_key = "$work/certs/node$i.key"
[admin]
listen = "$ip:$(port "$ip")"
token_file = "$work/admin.token"
[log]
filter = "warn"
TOML
done
raft1=$(grep -A1 '^\[cluster\]' "$work/node1/tandem.toml" | sed -n 's/listen = "\(.*\)"/\1/p')
admin1=$(grep -A1 '^\[admin\]' "$work/node1/tandem.toml" | sed -n 's/listen = "\(.*\)"/\1/p')
"$TANDEM_BIN" cluster init --config "$work/node1/tandem.toml" > /dev/null
"$TANDEM_BIN" run --config "$work/node1/tandem.toml" 2> "$work/node1.log" &
sleep 2
for i in 2 3; do
  "$TANDEM_BIN" cluster join --config "$work/node$i/tandem.toml" --peer "$raft1" > /dev/null
  "$TANDEM_BIN" run --config "$work/node$i/tandem.toml" 2> "$work/node$i.log" &
done
for _ in $(seq 100); do
  voters=$("$TANDEM_BIN" cluster status --config "$work/node1/tandem.toml" --json 2>/dev/null \
    | grep -c '"voter": true' || true)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
[ "$voters" = 3 ] || { echo "cluster did not form"; cat "$work"/node*.log; exit 1; }

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
