#!/usr/bin/env bash
# Authenticated registrations per second with many AORs, Tandem against Kamailio, driven by
# the same load generator in the same run: COUNT distinct accounts u0..u<COUNT> each
# registered once (REGISTER, 401, REGISTER with MD5 credentials, 200; a new binding, so in
# Tandem one replicated write each), by WORKERS closed-loop workers. Complements
# ops/bench/sip.sh, whose sipp load can authenticate as only one account per sipp process.
# Tandem is the three-node cluster of ops/bench/cluster.sh with all load on node 1 (its
# accounts are created first through the admin API); Kamailio is ops/bench/kamailio-sip.cfg.
# Then a second pass registers every AOR again from a second contact (one more write
# each). For Tandem it also prints each node's CPU time per registration (user plus
# system, over the registrations), the steadiest figure on a noisy machine.
# Usage: ./ops/bench/registrations.sh [COUNT] [WORKERS]   (defaults 50000 and 64)
#   BENCH_TANDEM_BIN runs another tandem binary, such as an earlier build for a before/after.
# Record the output in BENCHMARKS.md with this command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-50000}"
workers="${2:-64}"
password="bench-password-1"   # aor-load's accounts have this password
. ./ops/bench/build.sh
load="$CARGO_TARGET_DIR/debug/aor-load"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
. ./ops/bench/cluster.sh
form_cluster
kam="127.0.0.1:$(port 127.0.0.1)"
kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -A "BENCH_PASSWORD=\"$password\"" \
  -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
sleep 2
echo "$count AORs, $workers workers, sipp-free load generator (aor-load), $(nproc) cores shared"
echo -n "tandem   (3 nodes, load on node 1): "
# --no-refresh: the same load as Kamailio gets below, one registration per AOR.
"$load" --no-refresh "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" "$count" "$workers" \
  "${node_pid[1]},${node_pid[2]},${node_pid[3]}" 2> "$work/tandem-progress.log" \
  | grep -E '^(registrations|CPU)' | sed '2s/^/  nodes 1, 2, 3: /'
echo -n "kamailio (usrloc in memory):        "
"$load" --register-only "$kam" "$count" "$workers" "$password" \
  2> "$work/kamailio-progress.log" | grep '^registrations'
# The second pass: every AOR registers again from a new contact (each registration is a
# new UDP port), so each is again one write, now against warm caches and with no
# account creation just before.
echo "again, each AOR from a second contact:"
echo -n "tandem   (3 nodes, load on node 1): "
"$load" --register-only "$sip1" "$count" "$workers" "$password" \
  "${node_pid[1]},${node_pid[2]},${node_pid[3]}" 2>> "$work/tandem-progress.log" \
  | grep -E '^(registrations|CPU)' | sed '2s/^/  nodes 1, 2, 3: /'
echo -n "kamailio (usrloc in memory):        "
"$load" --register-only "$kam" "$count" "$workers" "$password" \
  2>> "$work/kamailio-progress.log" | grep '^registrations'
