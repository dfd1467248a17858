#!/usr/bin/env bash
# OPTIONS served per second over UDP, Tandem against Kamailio (the reference peer) in the
# same run on the same machine, both driven by the same sipp scenario at the same offered
# load. Usage: ./ops/bench/options.sh [CALLS] [RATE]   (defaults 100000 and 20000/s)
# Prints one line per server and the ratio; copy them into BENCHMARKS.md with this command.
set -euo pipefail
cd "$(dirname "$0")/../.."
calls="${1:-100000}"
rate="${2:-20000}"
. ./ops/bench/build.sh
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

cat > "$work/tandem.toml" <<TOML
[node]
data_dir = "$work/data"
[sip]
udp = ["127.0.0.1:5080"]
tcp = []
[log]
filter = "warn"
TOML
"$TANDEM_BIN" run --config "$work/tandem.toml" 2> "$work/tandem.log" &
kamailio -f ops/bench/kamailio-options.cfg -l udp:127.0.0.1:5090 -DD -E -m 256 -M 16 \
  -P "$work/kamailio.pid" -Y "$work" 2> "$work/kamailio.log" &
sleep 2

# run NAME PORT: offers $calls OPTIONS at $rate/s, keeps at most 2000 outstanding, and
# prints completed calls per second of wall time and sipp's failure count.
run() {
  local name=$1 port=$2 start end ok failed
  start=$(date +%s.%N)
  sipp -sf ops/sipp/options.xml -t u1 -i 127.0.0.1 -p 0 -m "$calls" -r "$rate" -l 2000 \
    -nostdin -timeout 120s -recv_timeout 5000 127.0.0.1:"$port" > "$work/$name.out" 2>&1 || true
  end=$(date +%s.%N)
  ok=$(grep -E '^ +Successful call' "$work/$name.out" | awk -F'|' '{gsub(/ /,"",$3); print $3}')
  failed=$(grep -E '^ +Failed call' "$work/$name.out" | awk -F'|' '{gsub(/ /,"",$3); print $3}')
  awk -v n="$name" -v ok="${ok:-0}" -v f="${failed:-0}" -v s="$start" -v e="$end" \
    'BEGIN { printf "%-9s %8d ok %6d failed %9.0f OPTIONS/s\n", n, ok, f, ok / (e - s) }'
}
echo "offered: $calls OPTIONS at $rate/s, UDP, sipp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1), $(nproc) cores"
t=$(run tandem 5080)
k=$(run kamailio 5090)
echo "$t"
echo "$k"
awk -v t="$(echo "$t" | awk '{print $6}')" -v k="$(echo "$k" | awk '{print $6}')" \
  'BEGIN { printf "ratio tandem/kamailio: %.2f\n", t / k }'
