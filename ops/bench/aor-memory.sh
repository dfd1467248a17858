#!/usr/bin/env bash
# Resident memory per registered AOR, Tandem against Kamailio in the same run.
#
# Tandem: a three-node cluster (ops/bench/cluster.sh), COUNT accounts created through node
# 1's admin API and each registered once through node 1 (REGISTER, 401, REGISTER with MD5
# credentials, 200) and refreshed once, then node 1's VmRSS growth divided by COUNT. The
# growth covers the account and the binding, in every layer (Raft log, RocksDB, caches:
# the refresh fills the bindings the node keeps in memory); the binding alone is the
# growth after the accounts were created.
#
# Kamailio (ops/bench/kamailio-sip.cfg, usrloc in memory): the same COUNT AORs
# (u0..u<COUNT>) registered once each, then the growth of the proportional set size of all
# its processes divided by COUNT. It keeps no accounts (any user name is accepted with
# the one bench password), so its figure stands beside Tandem's binding alone.
#
# Target (issue #22): at most 1 KiB per AOR at 100,000 AORs, account and binding.
# Usage: ./ops/bench/aor-memory.sh [COUNT] [WORKERS]   (defaults 100000 and 64)
# BENCH_TANDEM_BIN runs another tandem binary, such as an earlier build for a before/after.
# Record the output in BENCHMARKS.md with this command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-100000}"
workers="${2:-64}"
. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
form_cluster
echo "three tandem processes on 127.0.0.1-3, $(nproc) cores; $count AORs registered through node 1"
"$CARGO_TARGET_DIR/debug/aor-load" "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" \
  "$count" "$workers" 2> "$work/progress.log"
for i in 2 3; do
  echo "node $i (replica only): $(awk '/VmRSS/ {print $2, $3}' "/proc/${node_pid[i]}/status")"
done

# The reference, with the cluster stopped so that the two do not share the cores.
for p in "${node_pid[@]}"; do kill -INT "$p" 2>/dev/null || true; done
for p in "${node_pid[@]}"; do wait "$p" 2>/dev/null || true; done
node_pid=()
password="bench-password-1"   # aor-load's accounts have this password
kam="127.0.0.1:$(udp_port 127.0.0.1)"
kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -A "BENCH_PASSWORD=\"$password\"" \
  -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
kamailio_main=$!
pids+=("$kamailio_main")
sleep 2
kill -0 "$kamailio_main" 2>/dev/null || { echo "Kamailio did not start:" >&2; cat "$work/kamailio.log" >&2; exit 1; }
echo "kamailio $(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p') (usrloc in memory, children=2); $count AORs registered"
before=$(pss_kib "$kamailio_main")
"$CARGO_TARGET_DIR/debug/aor-load" --storm "$kam" "$count" 0 "$password" 2> /dev/null \
  | sed 's/^storm/kamailio registrations/'
sleep 5
after=$(pss_kib "$kamailio_main")
echo "kamailio memory (Pss of all processes): $before KiB before, $after KiB with bindings;" \
  "per registered AOR (binding): $(( (after - before) * 1024 / count )) bytes"
