# Sourced by the benchmarks: forms a three-node Tandem cluster the operator's way (`tandem
# cert`, `keygen`, `cluster init`, `cluster join`) on 127.0.0.1, .2 and .3 under "$work",
# each node with its own RocksDB, Raft over mutual TLS, free ports picked by the kernel.
# After `form_cluster`: node i's config is $work/node$i/tandem.toml, its log
# $work/node$i.log, its pid ${node_pid[i]}, and $admin1, $sip1 and $raft1 are node 1's
# admin, SIP (UDP) and Raft addresses, `api ADDR PATH BODY` PUTs to an admin API, and
# `stop_nodes` stops them all. Node 1 is the leader. Needs $TANDEM_BIN and $work.
# NODE_ENV (optional): VAR=value words set in the nodes' environment only, for experiments
# (for example NODE_ENV=RUST_LOG=debug). RUNTIME_THREADS (optional): the nodes'
# node.runtime_threads, SIP_THREADS (optional): node.sip_threads, to compare thread counts
# (unset: the defaults). SIP_TCP=1 (optional): each node also listens for SIP over TCP on a
# free port of its address (else tcp = []); node i's is then on the `tcp = [...]` line of
# its config. NODE_TOML (optional): more config appended to every node's file, tables
# included (for example NODE_TOML=$'[cdr]\nproxied_calls = false'), after a
# [registration_agent] table of its own (so NODE_TOML cannot open that one again).

# A free port on an address.
port() { python3 -c "import socket; s=socket.socket(); s.bind(('$1', 0)); print(s.getsockname()[1])"; }

# api ADDR PATH BODY: PUT BODY to the admin API at ADDR with the cluster's admin token,
# failing the script on an error status.
api() {
  curl -sSf -o /dev/null -X PUT -H "Authorization: Bearer $(cat "$work/admin.token")" \
    -d "$3" "http://$1$2"
}

# The value of `listen` in a config section.
listen_of() { grep -A1 "^\[$2\]" "$1" | sed -n 's/listen = "\(.*\)"/\1/p'; }

declare -a node_pid
# stop_nodes: stops every node with SIGINT (the fast stop) and waits for them.
stop_nodes() {
  local p
  for p in "${node_pid[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${node_pid[@]}"; do wait "$p" 2>/dev/null || true; done
  node_pid=()
}
form_cluster() {
  "$TANDEM_BIN" cert ca --out "$work/ca" > /dev/null
  "$TANDEM_BIN" keygen --out "$work/master.key" > /dev/null
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/admin.token")
  local i ip tcp
  for i in 1 2 3; do
    ip="127.0.0.$i"
    tcp="[]"
    [ "${SIP_TCP:-0}" != 1 ] || tcp="[\"$ip:$(port "$ip")\"]"
    "$TANDEM_BIN" cert node --ca "$work/ca" --name "node$i" --id "$i" --san "$ip" --out "$work/certs" > /dev/null
    mkdir -p "$work/node$i"
    cp "$work/master.key" "$work/node$i/master.key"
    cat > "$work/node$i/tandem.toml" <<TOML
[node]
id = $i
data_dir = "$work/node$i/data"
master_key = "$work/node$i/master.key"
${RUNTIME_THREADS:+runtime_threads = $RUNTIME_THREADS}
${SIP_THREADS:+sip_threads = $SIP_THREADS}
[sip]
udp = ["$ip:$(port "$ip")"]
tcp = $tcp
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
[registration_agent]
# The benchmarks' providers are Kamailio on loopback; by default providers reach only
# public addresses.
private_networks = ["127.0.0.0/8"]
${NODE_TOML:-}
TOML
  done
  raft1=$(listen_of "$work/node1/tandem.toml" cluster)
  admin1=$(listen_of "$work/node1/tandem.toml" admin)
  sip1=$(sed -n 's/^udp = \["\(.*\)"\]/\1/p' "$work/node1/tandem.toml")
  "$TANDEM_BIN" cluster init --config "$work/node1/tandem.toml" > /dev/null
  env ${NODE_ENV:-} "$TANDEM_BIN" run --config "$work/node1/tandem.toml" 2> "$work/node1.log" &
  node_pid[1]=$!
  sleep 2
  for i in 2 3; do
    # One-time join token, minted on node 1 (retried while node 1 raises the cluster's
    # feature version, just after it starts).
    for _ in $(seq 50); do
      rm -f "$work/join$i.token"
      "$TANDEM_BIN" cluster join-token create --config "$work/node1/tandem.toml" \
        --node-id "$i" --out "$work/join$i.token" > /dev/null 2>&1 && break
      sleep 0.2
    done
    "$TANDEM_BIN" cluster join --config "$work/node$i/tandem.toml" --peer "$raft1" \
      --token-file "$work/join$i.token" > /dev/null
    env ${NODE_ENV:-} "$TANDEM_BIN" run --config "$work/node$i/tandem.toml" 2> "$work/node$i.log" &
    node_pid[i]=$!
  done
  local voters=0
  for _ in $(seq 100); do
    voters=$("$TANDEM_BIN" cluster status --config "$work/node1/tandem.toml" --json 2>/dev/null \
      | grep -c '"voter": true' || true)
    [ "$voters" = 3 ] && break
    sleep 0.2
  done
  [ "$voters" = 3 ] || { echo "cluster did not form"; cat "$work"/node*.log; exit 1; }
}
