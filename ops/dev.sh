#!/usr/bin/env bash
# The README's "Run it" command: installs what is missing, builds, and runs a local cluster
# of three Tandem nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (SIP on port 5060 of each,
# UDP and TCP; admin API over HTTPS on port 8060 of each, with the nodes' cluster
# certificates), with a demo customer and two demo accounts.
# State lives in ./data/dev and survives restarts: the first run forms the cluster, later
# runs start it again. Ctrl-C stops all three (SIGTERM: each drains first).
#   ./ops/dev.sh            the three-node demo
#   ./ops/dev.sh --single   one standalone node with the embedded defaults (./data)
#   ./ops/dev.sh --config FILE   one node with that config
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
. ./ops/env.sh
# The same build as ./ops/test.sh, so the two share every artefact.
cargo build --workspace --all-targets

if [ "${1:-}" = "--single" ] || [ "${1:-}" = "--config" ]; then
  [ "${1:-}" = "--single" ] && shift
  cat >&2 <<MSG

Tandem is starting on 127.0.0.1:5060 (UDP and TCP), data in ./data.
Probe it from another terminal:
  sipp -sf ops/sipp/options.xml -m 1 -i 127.0.0.1 -p 5070 127.0.0.1:5060
Stop it with Ctrl-C (fast) or SIGTERM (drains first).

MSG
  exec "$TANDEM_BIN" run "$@"
fi

dev="$PWD/data/dev"
mkdir -p "$dev"
token="$dev/admin.token"
pids=()
stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo "stopping the three nodes (each drains first)..." >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop INT TERM EXIT

for i in 1 2 3; do
  ip="127.0.0.$i"
  # Loopback addresses other than 127.0.0.1 answer on Linux without any setup.
  if [ ! -f "$dev/node$i.toml" ]; then
    cat > "$dev/node$i.toml" <<TOML
# Written by ops/dev.sh for the local demo cluster; see ops/tandem.example.toml.
[node]
id = $i
data_dir = "$dev/node$i"
master_key = "$dev/master.key"
[sip]
udp = ["$ip:5060"]
tcp = ["$ip:5060"]
[cluster]
listen = "$ip:7060"
ca_certificate = "$dev/certs/ca.crt"
certificate = "$dev/certs/node$i.crt"
private_key = "$dev/certs/node$i.key"
[admin]
listen = "$ip:8060"
token_file = "$token"
# HTTPS with the node's cluster certificate; the CLI checks it against cluster.ca_certificate.
certificate = "$dev/certs/node$i.crt"
private_key = "$dev/certs/node$i.key"
TOML
  fi
done

formed="$dev/.formed"
if [ ! -f "$formed" ]; then
  echo "forming a new three-node cluster in $dev ..." >&2
  rm -rf "$dev/ca" "$dev/certs" "$dev"/node[123]
  [ -f "$dev/master.key" ] || "$TANDEM_BIN" keygen --out "$dev/master.key" > /dev/null
  # Readable by its owner only: a node refuses a token file others may read.
  [ -f "$token" ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token")
  "$TANDEM_BIN" cert ca --out "$dev/ca" > /dev/null
  for i in 1 2 3; do
    "$TANDEM_BIN" cert node --ca "$dev/ca" --name "node$i" --id "$i" --san "127.0.0.$i" --out "$dev/certs" > /dev/null
  done
  "$TANDEM_BIN" cluster init --config "$dev/node1.toml" > /dev/null
fi
# A cluster formed by an earlier release has certificates that name no node id, which
# the cluster link now refuses: issue them again under the same CA.
for i in 1 2 3; do
  if ! sed '/-----/d' "$dev/certs/node$i.crt" | base64 -d 2> /dev/null | grep -aq "tandem://node/$i"; then
    echo "issuing node $i a certificate that names its node id ..." >&2
    rm -f "$dev/certs/node$i.crt" "$dev/certs/node$i.key"
    "$TANDEM_BIN" cert node --ca "$dev/ca" --name "node$i" --id "$i" --san "127.0.0.$i" --out "$dev/certs" > /dev/null
  fi
done

"$TANDEM_BIN" run --config "$dev/node1.toml" 2> "$dev/node1.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf --cacert "$dev/certs/ca.crt" https://127.0.0.1:8060/health > /dev/null 2>&1 && break
  sleep 0.1
done
for i in 2 3; do
  if [ ! -f "$formed" ]; then
    # A node joins with a one-time token that a member mints (node 1 raises the cluster
    # to the feature version of join tokens a moment after it starts: try again briefly).
    join_token="$dev/join-node$i.token"
    for _ in $(seq 50); do
      rm -f "$join_token"
      "$TANDEM_BIN" cluster join-token create --config "$dev/node1.toml" --node-id "$i" \
        --expires-secs 600 --out "$join_token" > /dev/null 2>&1 && break
      sleep 0.2
    done
    "$TANDEM_BIN" cluster join --config "$dev/node$i.toml" --peer 127.0.0.1:7060 \
      --token-file "$join_token" > /dev/null
    rm -f "$join_token"
  fi
  "$TANDEM_BIN" run --config "$dev/node$i.toml" 2> "$dev/node$i.log" &
  pids+=($!)
done

echo "waiting for three voters..." >&2
voters=0
for _ in $(seq 150); do
  voters=$("$TANDEM_BIN" cluster status --config "$dev/node1.toml" --json 2>/dev/null \
    | grep -c '"voter": true' || true)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
if [ "$voters" != 3 ]; then
  echo "the cluster did not come up; logs:" >&2
  tail -n 20 "$dev"/node*.log >&2
  exit 1
fi

if [ ! -f "$formed" ]; then
  api() { curl -sf --cacert "$dev/certs/ca.crt" -X PUT -H "Authorization: Bearer $(cat "$token")" -d "$2" "https://127.0.0.1:8060$1" > /dev/null; }
  api /v1/customers/demo '{"name":"Demo customer"}'
  api /v1/accounts/demo.example/alice '{"customer":"demo","password":"alice-demo-pw"}'
  api /v1/accounts/demo.example/bob '{"customer":"demo","password":"bob-demo-pw"}'
  touch "$formed"
fi

cat >&2 <<MSG

Tandem runs as a three-node cluster:
  node 1  SIP 127.0.0.1:5060 (UDP, TCP)   admin https://127.0.0.1:8060
  node 2  SIP 127.0.0.2:5060 (UDP, TCP)   admin https://127.0.0.2:8060
  node 3  SIP 127.0.0.3:5060 (UDP, TCP)   admin https://127.0.0.3:8060
Data and logs: $dev   Admin token: $token   Admin CA: $dev/certs/ca.crt

Demo accounts (domain demo.example):
  alice / alice-demo-pw      bob / bob-demo-pw

Point a softphone at it: user alice, domain demo.example, password alice-demo-pw,
outbound proxy / registrar 127.0.0.1:5060 (or .2, .3: any node). Register bob through
another node and call sip:bob@demo.example from alice.

Or with sipp, from another terminal:
  printf 'SEQUENTIAL\nalice;demo.example\n' > /tmp/alice.csv
  sipp -sf ops/sipp/register-md5.xml -inf /tmp/alice.csv -au alice -ap alice-demo-pw \\
       -m 1 -i 127.0.0.1 -p 5070 127.0.0.2:5060
  curl --cacert $dev/certs/ca.crt -H "Authorization: Bearer \$(cat $token)" \\
       https://127.0.0.1:8060/v1/accounts/demo.example/alice/bindings

Cluster state: $TANDEM_BIN cluster status --config $dev/node1.toml
Stop with Ctrl-C (each node drains, then stops).

MSG
wait "${pids[@]}"
