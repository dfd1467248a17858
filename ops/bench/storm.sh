#!/usr/bin/env bash
# A registration storm, Tandem against Kamailio in the same run: COUNT phones registered
# through one node re-register through another when their node dies, each one a
# replicated write (a new edge node and a new flow).
#
# At each offered RATE, for Tandem: a fresh three-node cluster (ops/bench/cluster.sh),
# COUNT accounts u0..u<COUNT>@bench.example created through node 1's admin API, each AOR
# registered once through node 2 (64 closed-loop workers), node 2 SIGKILLed, and one
# second later every AOR registers again through node 1 (the leader) at RATE per second
# on schedule (`aor-load --storm`: the same Contact per AOR as a phone behind NAT keeps,
# sent from a new socket, so from a new flow; latency counts from when each was due).
# For Kamailio (ops/bench/kamailio-sip.cfg, usrloc in memory): a fresh instance, the
# same COUNT AORs registered once, then re-registered at RATE from new flows. Both send
# every registered contact a NAT keepalive every 20 s (Tandem's default; Kamailio's
# nathelper with BENCH_NAT_PINGS), so the CPU counted includes the same keepalives.
#
# A step meets the target if p99 is under 100 ms, under 1% failed and at least 95% of the
# offered rate was achieved (every AOR offered is counted as registered or failed). A
# server that misses a step is not run at the higher ones. Per step it prints the
# achieved rate, the time until all were registered, p50/p99, and CPU per registration of
# each surviving Tandem node (user plus system) or of all Kamailio processes; for Tandem
# also the commands proposed, log entries (batches) and WAL fsyncs on node 1 and node 3
# during the storm, commands per fsync on node 1, and how long each node's fsyncs took
# (the median, 99th percentile and slowest, to the bucket of tandem_log_fsync_seconds).
#
# Usage: ./ops/bench/storm.sh [COUNT] [RATES]   (defaults 50000 and
#   2000,3000,4000,5000,6000,8000,10000). Environment: KEEP_WORK, TANDEM_BENCH_NO_BUILD,
#   BENCH_TANDEM_BIN, NODE_ENV, NODE_TOML as in ops/bench/sip.sh.
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-50000}"
IFS=, read -r -a rates <<< "${2:-2000,3000,4000,5000,6000,8000,10000}"
password="bench-password-1"   # aor-load's accounts have this password
. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
load="$CARGO_TARGET_DIR/debug/aor-load"
base=$work

# A fresh cluster's or Kamailio's work directory per step; the cleanup removes the base.
trap 'work=$base; cleanup' EXIT

# counters ADMIN: commands proposed, log entries proposed, WAL fsyncs.
counters() {
  curl -sf "http://$1/metrics" | awk '
    $1 == "tandem_raft_proposals_total" { p = $2 }
    $1 == "tandem_raft_batch_size_count" { b = $2 }
    $1 == "tandem_log_wal_syncs_total" { s = $2 }
    END { print p + 0, b + 0, s + 0 }'
}
# fsync_buckets ADMIN: the cumulative counts of tandem_log_fsync_seconds' buckets, as
# "bound=count" words.
fsync_buckets() {
  curl -sf "http://$1/metrics" \
    | sed -n 's/^tandem_log_fsync_seconds_bucket{le="\([^"]*\)"} \([0-9]*\)$/\1=\2/p' | tr '\n' ' '
}
# fsync_summary BEFORE AFTER: the WAL fsyncs between two readings of fsync_buckets: the
# buckets' bounds that hold the median, the 99th percentile and the slowest, and how many
# took over 16 ms.
fsync_summary() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) {
      split(x[i], p, "="); split(y[i], q, "=")
      le[i] = p[1] == "+Inf" ? "more" : sprintf("%g ms", p[1] * 1000); c[i] = q[2] - p[2]
      if (p[1] != "+Inf" && p[1] + 0 <= 0.016) slow_from = c[i]
    }
    for (i = 1; i <= n; i++) {
      if (m == "" && c[i] * 2 >= c[n]) m = le[i]
      if (p99 == "" && c[i] * 100 >= c[n] * 99) p99 = le[i]
      if (max == "" && c[i] == c[n]) max = le[i]
    }
    printf "fsyncs p50 <= %s, p99 <= %s, slowest <= %s, %d over 16 ms", m, p99, max, c[n] - slow_from }'
}
# verdict LINE RATE: "yes" if the storm line meets the target.
verdict() {
  awk -v r="$2" '{
    for (i = 1; i <= NF; i++) {
      if ($i == "of") { ok = $(i - 1); n = $(i + 1) }
      if ($i == "failed,") f = $(i - 1)
      if ($i == "achieved),") a = $(i - 1)
      if ($i == "p99") p = $(i + 1)
    }
    sub(/\/s$/, "", a); sub(/^\(/, "", a)
    good = ok > 0 && f / n < 0.01 && a * 100 >= r * 95 && p + 0 < 100 && ok + f == n
    print good ? "yes" : "no" }' <<< "$1"
}

# judge NAME LINES RATE: records whether NAME's storm (the first of LINES) met the target
# at RATE, and says so.
judge() {
  if [ "$(verdict "$(head -1 <<< "$2")" "$3")" = yes ]; then
    best[$1]=$3
    printf '%-8s target met: yes\n' "$1"
  else
    missed[$1]=$3
    printf '%-8s target met: no\n' "$1"
  fi
}

echo "storm.sh: $count AORs, $(nproc) cores shared; Tandem 3 nodes (registered through node 2," \
  "node 2 SIGKILLed, the storm through node 1, the leader); Kamailio" \
  "$(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p') (usrloc in memory)"
declare -A missed best
for rate in "${rates[@]}"; do
  echo
  echo "== $rate registrations/s offered"
  if [ -z "${missed[tandem]:-}" ]; then
    work="$base/tandem-$rate"
    mkdir -p "$work"
    form_cluster
    admin3=$(listen_of "$work/node3/tandem.toml" admin)
    sip2=$(sed -n 's/^udp = \["\(.*\)"\]/\1/p' "$work/node2/tandem.toml")
    "$load" --accounts-only "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" "$count" 64 \
      2> /dev/null | sed 's/^/tandem   /'
    "$load" --storm "$sip2" "$count" 0 "$password" 2> /dev/null \
      | sed 's/^storm/tandem   through node 2 first/'
    sleep 2
    kill -KILL "${node_pid[2]}"
    wait "${node_pid[2]}" 2>/dev/null || true
    sleep 1
    read -r p1 b1 s1 <<< "$(counters "$admin1")"
    read -r p3 b3 s3 <<< "$(counters "$admin3")"
    f1=$(fsync_buckets "$admin1")
    f3=$(fsync_buckets "$admin3")
    line=$("$load" --storm "$sip1" "$count" "$rate" "$password" \
      "${node_pid[1]},${node_pid[3]}" 2> "$work/storm-progress.log")
    read -r q1 c1 t1 <<< "$(counters "$admin1")"
    read -r q3 c3 t3 <<< "$(counters "$admin3")"
    echo "$line" | sed -e 's/^storm/tandem   storm through node 1/' \
      -e 's/^CPU per registration (us) of processes.*: /tandem   CPU per registration (us), nodes 1 and 3: /'
    echo "tandem   node 1: $((q1 - p1)) commands in $((c1 - b1)) log entries, $((t1 - s1)) WAL fsyncs" \
      "($(awk -v c="$((q1 - p1))" -v s="$((t1 - s1))" 'BEGIN { printf "%.1f", s ? c / s : 0 }') commands per fsync);" \
      "node 3: $((t3 - s3)) WAL fsyncs"
    echo "tandem   node 1: $(fsync_summary "$f1" "$(fsync_buckets "$admin1")");" \
      "node 3: $(fsync_summary "$f3" "$(fsync_buckets "$admin3")")"
    judge tandem "$line" "$rate"
    stop_nodes
  fi
  if [ -z "${missed[kamailio]:-}" ]; then
    work="$base/kamailio-$rate"
    mkdir -p "$work"
    kam="127.0.0.1:$(udp_port 127.0.0.1)"
    kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -A "BENCH_PASSWORD=\"$password\"" -A BENCH_NAT_PINGS \
      -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
    kpid=$!
    sleep 2
    kill -0 "$kpid" 2>/dev/null || { echo "Kamailio did not start:" >&2; cat "$work/kamailio.log" >&2; exit 1; }
    kpids=$(echo $kpid $(pgrep -P $kpid || true) | tr ' ' ,)
    "$load" --storm "$kam" "$count" 0 "$password" 2> /dev/null | sed 's/^storm/kamailio first/'
    line=$("$load" --storm "$kam" "$count" "$rate" "$password" "$kpids" \
      2> "$work/storm-progress.log")
    echo "$line" | sed -e 's/^storm/kamailio storm/' \
      -e 's/^CPU per registration (us) of processes.*(sum \(.*\))$/kamailio CPU per registration (us), all processes: \1/'
    judge kamailio "$line" "$rate"
    kill "$kpid" 2>/dev/null || true
    wait "$kpid" 2>/dev/null || true
  fi
  [ -z "${missed[tandem]:-}" ] || [ -z "${missed[kamailio]:-}" ] || break
done
work=$base
echo
for n in tandem kamailio; do
  if [ -n "${missed[$n]:-}" ]; then why="missed at ${missed[$n]}/s"; else why="no step missed (push the steps higher)"; fi
  echo "$n: highest offered rate that met the target ${best[$n]:-none}/s; $why"
done
echo "Target: p99 under 100 ms, under 1% failed, at least 95% of the offered rate achieved."
