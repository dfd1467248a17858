#!/usr/bin/env bash
# What a /metrics scrape costs, and whether it grows with the registered AORs: Tandem
# against Kamailio's xhttp_prom in the same run.
#
# For Tandem: a three-node cluster (ops/bench/cluster.sh). For Kamailio: the reference
# config (ops/bench/kamailio-sip.cfg, usrloc in memory) with BENCH_METRICS, which adds
# xhttp and xhttp_prom (every internal statistic, usrloc's included) on a TCP listener.
# Each server is scraped SCRAPES times one after another (a new connection each time), first
# with no AOR registered, then after COUNT AORs u0..u<COUNT>@bench.example are registered
# (through Tandem's node 1, which is scraped; accounts created through its admin API). Then
# the same number of requests for /health, which does next to nothing (Kamailio answers it
# 404 from its xhttp route), so that the difference is what rendering the metrics costs,
# apart from HTTP and TCP. Per round it prints the p50 and p99 of the scrape's wall time,
# the body's size, and the CPU time per request of the scraped server (node 1; all of
# Kamailio's processes): user plus system time over the requests, less what the server
# used in an idle window of 5 s just before them, scaled to the requests' duration
# (keepalives and sweeps go on either way).
#
# Usage: ./ops/bench/metrics.sh [COUNT] [SCRAPES]   (defaults 100000 and 3000).
#   Environment: KEEP_WORK, TANDEM_BENCH_NO_BUILD, BENCH_TANDEM_BIN as in ops/bench/sip.sh.
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-100000}"
scrapes="${2:-3000}"
password="bench-password-1"   # aor-load's accounts have this password
. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
load="$CARGO_TARGET_DIR/debug/aor-load"
ticks_per_sec=$(getconf CLK_TCK)

# scrape ADDR PATH N: N GETs of http://ADDR/PATH, one connection each; prints the p50
# and p99 wall time (ms), the last body's size (bytes) and the whole loop's wall time (s).
# Any status is taken: the baseline path may answer 404.
scrape() {
  python3 - "$1" "$2" "$3" <<'PY'
import http.client, sys, time
host, port = sys.argv[1].rsplit(":", 1)
path, n = sys.argv[2], int(sys.argv[3])
took, size, start = [], 0, time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    took.append(time.perf_counter() - t)
    if path == "/metrics" and r.status != 200:
        sys.exit(f"/metrics at {sys.argv[1]} answered {r.status}")
    size = len(body)
took.sort()
print(f"{took[len(took) // 2] * 1000:.2f} {took[min(n - 1, int(n * 0.99))] * 1000:.2f} "
      f"{size} {time.perf_counter() - start:.3f}")
PY
}

# cpu_per NAME ADDR PATH PID…: an idle window of 5 s, then SCRAPES GETs of PATH; prints
# p50, p99, body bytes, loop seconds and the CPU per request (us) less the idle rate.
cpu_per() {
  local addr=$1 path=$2
  shift 2
  local t0 t1 t2 p50 p99 size secs
  t0=$(cpu_ticks "$@")
  sleep 5
  t1=$(cpu_ticks "$@")
  read -r p50 p99 size secs <<< "$(scrape "$addr" "$path" "$scrapes")"
  t2=$(cpu_ticks "$@")
  awk -v p50="$p50" -v p99="$p99" -v b="$size" -v secs="$secs" -v idle=$((t1 - t0)) \
    -v busy=$((t2 - t1)) -v hz="$ticks_per_sec" -v s="$scrapes" 'BEGIN {
      net = busy - idle * secs / 5
      if (net < 0) net = 0
      printf "%s %s %d %.2f %.0f\n", p50, p99, b, secs, net / hz / s * 1e6 }'
}

# measure NAME LABEL ADDR BASELINE_PATH PID…: /metrics, then a request that does next to
# nothing (BASELINE_PATH), each SCRAPES times; the difference in CPU is what rendering the
# metrics costs, apart from HTTP and TCP.
measure() {
  local name=$1 label=$2 addr=$3 baseline=$4
  shift 4
  local p50 p99 size secs cpu b50 b99 bsize bsecs bcpu
  read -r p50 p99 size secs cpu <<< "$(cpu_per "$addr" /metrics "$@")"
  read -r b50 b99 bsize bsecs bcpu <<< "$(cpu_per "$addr" "$baseline" "$@")"
  printf "%-8s %s: /metrics p50 %s ms, p99 %s ms, %d bytes, %s us CPU per scrape; %s p50 %s ms, %s us CPU; rendering the metrics %d us\n" \
    "$name" "$label" "$p50" "$p99" "$size" "$cpu" "$baseline" "$b50" "$bcpu" "$((cpu - bcpu))"
}

echo "$(nproc) cores; $count AORs; $scrapes scrapes per round; tandem at $(git rev-parse --short HEAD), kamailio" \
  "$(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p') (xhttp_prom, usrloc in memory)"

form_cluster
measure tandem "no AOR" "$admin1" /health "${node_pid[1]}"
"$load" --accounts-only "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" "$count" 64 \
  2> /dev/null | sed 's/^/tandem   /'
"$load" --storm "$sip1" "$count" 0 "$password" 2> /dev/null | sed 's/^storm/tandem   registered/'
sleep 2
measure tandem "$count AORs" "$admin1" /health "${node_pid[1]}"
stop_nodes

kam="127.0.0.1:$(udp_port 127.0.0.1)"
http_port=$(port 127.0.0.1)
kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -l "tcp:127.0.0.1:$http_port" \
  -A BENCH_METRICS -A "BENCH_PASSWORD=\"$password\"" \
  -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
kpid=$!
sleep 2
kill -0 "$kpid" 2>/dev/null || { echo "Kamailio did not start:" >&2; cat "$work/kamailio.log" >&2; exit 1; }
read -r -a kpids <<< "$(echo $kpid $(pgrep -P $kpid || true))"
measure kamailio "no AOR" "127.0.0.1:$http_port" /health "${kpids[@]}"
"$load" --storm "$kam" "$count" 0 "$password" 2> /dev/null | sed 's/^storm/kamailio registered/'
sleep 2
measure kamailio "$count AORs" "127.0.0.1:$http_port" /health "${kpids[@]}"
kill "$kpid" 2>/dev/null || true
wait "$kpid" 2>/dev/null || true
