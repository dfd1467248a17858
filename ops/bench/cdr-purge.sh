#!/usr/bin/env bash
# Purging a million old call records while calls run: does the purge slow the calls or the
# Raft writes beside it? A three-node Tandem cluster (127.0.0.1/.2/.3, Raft over mutual
# TLS, real fsyncs) as ops/bench/sip.sh forms it. The customer keeps its records 3650
# days. Node 1 is stopped, `tandem cdr seed` writes RECORDS records 400 days old into its
# CDR store (and compacts it), and node 1 starts again.
#
# Two runs of the same load against node 1, each CALLS calls at RATE per second (sipp,
# ops/sipp/bench-uac-invite.xml: INVITE, 407, INVITE with credentials, 100/180/200, ACK,
# CALL_HOLD_MS, BYE; the callee a sipp registered through node 1, as in sip.sh) and, beside
# them, 20 s of Raft writes from 16 proposers inside node 1 (POST /v1/cluster/write-check:
# the path every binding write node 1 makes takes, forwarded to the leader if node 1 is
# not it; node 1 stops once, so the leader is usually another node):
#   0. a warm-up of 10 s of the same calls, not reported, once node 1 answers again;
#   1. "quiet": nothing to purge;
#   2. "purging": the customer's retention set to the default (90 days) just before, so
#      node 1's writer thread purges the records meanwhile, in steps of cdr.purge_batch
#      (1,000) every cdr.purge_every_ms (100 ms), about 100 s for a million (the purged
#      count before and after shows how much of the purge the run overlapped).
# Both follow the same restart and warm-up (the first calls after a node starts are slower:
# without the warm-up, the first run's p99 was 28 ms against 4 ms, whichever it was).
# The calls go through the proxy (local phones): app server calls would add CDR writes of
# their own to both runs; this measures what the purge takes from everything else.
#
# The target: the purging run's setup p99 within 20% of the quiet run's, its write-check
# p99 likewise, and both runs meeting the step target of sip.sh (p99 under 100 ms, under 1%
# failed, at least 95% of the offered rate).
#
# Usage: ./ops/bench/cdr-purge.sh [RECORDS] [RATE] [CALLS]   (defaults 1000000 200 12000)
# Environment as for sip.sh (TANDEM_BENCH_NO_BUILD, KEEP_WORK, CALL_HOLD_MS); PURGE_BATCH and
# PURGE_EVERY_MS set node 1's cdr.purge_batch and cdr.purge_every_ms (defaults 1000, 100).
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
records="${1:-1000000}"
rate="${2:-200}"
calls="${3:-12000}"
hold_ms="${CALL_HOLD_MS:-1000}"
password="bench-pw-0123456789"
domain="example.com"

. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
form_cluster
token=$(cat "$work/admin.token")
api "$admin1" /v1/customers/acme '{"name":"Acme"}'
api "$admin1" /v1/customers/acme/settings '{"cdr_retention_days":3650}'
for u in callee caller; do
  api "$admin1" "/v1/accounts/$domain/$u" "{\"password\":\"$password\",\"customer\":\"acme\"}"
done
api "$admin1" "/v1/accounts/$domain/caller" '{"max_concurrent_calls":0}'
metric() {
  curl -sf "http://$admin1/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

# --- Seed node 1 ---------------------------------------------------------------------------
kill -INT "${node_pid[1]}"
wait "${node_pid[1]}" 2>/dev/null || true
purge_batch="${PURGE_BATCH:-1000}"
purge_every="${PURGE_EVERY_MS:-100}"
printf '[cdr]\npurge_batch = %s\npurge_every_ms = %s\n' "$purge_batch" "$purge_every" \
  >> "$work/node1/tandem.toml"
seeded_at=$(date +%s.%N)
"$TANDEM_BIN" cdr seed --config "$work/node1/tandem.toml" --customer acme --count "$records" \
  --age-days 400 2> "$work/seed.err" > /dev/null
seed_secs=$(awk -v a="$seeded_at" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
du_cdr=$(du -sm "$work/node1/data/cdr" | cut -f1)
env ${NODE_ENV:-} "$TANDEM_BIN" run --config "$work/node1/tandem.toml" 2>> "$work/node1.log" &
node_pid[1]=$!
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://$admin1/health" && break
  sleep 0.1
done
sleep 2

# --- The load ------------------------------------------------------------------------------
sipp_common=(-i 127.0.0.1 -nostdin -nd -recv_timeout 5000 -trace_err -trace_rtt -rtt_freq 1
  -buff_size 4194304)
callee_port=$(udp_port 127.0.0.1)
# run NAME: the calls and, beside them, the write check; NAME.{calls,rtd,bye,writes,purged}.
run() {
  local name=$1 dir="$work/$1" uas_pid wc_pid p0 p1
  mkdir -p "$dir"
  printf 'SEQUENTIAL\ncaller;%s;callee\n' "$domain" > "$dir/caller.csv"
  start_callee "$name" "$dir" "$sip1" "$callee_port"
  p0=$(metric tandem_cdr_purged_total)
  cpu_ticks "${node_pid[1]}" > "$dir/cpu0"
  curl -sS --max-time 60 -H "Authorization: Bearer $token" \
    -d '{"proposers": 16, "seconds": 20, "command_bytes": 300}' \
    "http://$admin1/v1/cluster/write-check" > "$dir/writes.json" &
  wc_pid=$!
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf caller.csv -au caller \
    -ap "$password" -p 0 -m "$calls" -r "$rate" -l "$(( rate * (hold_ms / 1000 + 5) ))" \
    -d "$hold_ms" -timeout "$(( calls / rate + hold_ms / 1000 + 60 ))s" "${sipp_common[@]}" \
    "$sip1" > uac.out 2>&1) || true
  wait "$wc_pid" || true
  p1=$(metric tandem_cdr_purged_total)
  echo $(( $(cpu_ticks "${node_pid[1]}") - $(cat "$dir/cpu0") )) > "$work/$name.cpu"
  kill "$uas_pid" 2>/dev/null || true
  wait "$uas_pid" 2>/dev/null || true
  stats "$work/$name.rtd" setup "$dir"/bench-uac-invite_*_rtt.csv
  stats "$work/$name.bye" bye "$dir"/bench-uac-invite_*_rtt.csv
  echo "$(counter "$dir/uac.out" "Successful call") $(counter "$dir/uac.out" "Failed call")" \
    > "$work/$name.calls"
  echo "${p0:-0} ${p1:-0}" > "$work/$name.purged"
}

calls_wanted=$calls
calls=$(( rate * 10 ))
run warmup
calls=$calls_wanted
run quiet
api "$admin1" /v1/customers/acme/settings '{"cdr_retention_days":0}'
purge_start=$(date +%s.%N)
run purging
for _ in $(seq 600); do
  [ "$(metric tandem_cdr_purged_total)" -ge "$records" ] && break
  sleep 1
done
purge_secs=$(awk -v a="$purge_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
purged_total=$(metric tandem_cdr_purged_total)

# --- Report --------------------------------------------------------------------------------
echo "Tandem: 3 nodes on 127.0.0.1-3 (UDP, Raft over mutual TLS, real fsyncs), calls to node 1;"
echo "sipp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1) on the same $(nproc) cores"
echo "seeded $records records (400 days old) into node 1 in ${seed_secs} s, ${du_cdr} MB on disk;" \
  "purged $purged_total in ${purge_secs} s from when the retention fell" \
  "(cdr.purge_batch $purge_batch every $purge_every ms)"
printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s %9s %9s %9s %s\n' run offered ok failed "calls/s" \
  "setup" "setup" "BYE" "writes/s" "write" "write" "node 1" "purged during"
printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s %9s %9s %9s %s\n' "" "/s" "" "" "" "p50 ms" \
  "p99 ms" "p99 ms" "" "p50 ms" "p99 ms" "CPU s" "the run"
declare -A p99s wp99s
for name in quiet purging; do
  read -r ok failed < "$work/$name.calls"
  read -r _ last p50 p99 < "$work/$name.rtd"
  read -r _ _ _ b99 < "$work/$name.bye"
  read -r a b < "$work/$name.purged"
  done_rate=$(awk -v ok="$ok" -v l="$last" 'BEGIN { printf "%.0f", (l > 0) ? ok / (l / 1000) : 0 }')
  read -r wps w50 w99 < <(python3 -c '
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(round(s["writes_per_s"]), s["p50_ms"], s["p99_ms"])
except Exception:
    print("- - -")
' "$work/$name/writes.json")
  p99s[$name]=$p99
  wp99s[$name]=$w99
  cpu=$(awk -v t="$(cat "$work/$name.cpu")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz }')
  printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s %9s %9s %9s %s\n' "$name" "$rate" "$ok" "$failed" \
    "$done_rate" "$p50" "$p99" "$b99" "$wps" "$w50" "$w99" "$cpu" "$(( b - a ))"
done
awk -v a="${p99s[purging]}" -v b="${p99s[quiet]}" -v c="${wp99s[purging]}" -v d="${wp99s[quiet]}" 'BEGIN {
  # sipp measures in steps of about 4 ms: a p99 under 5 ms counts as 5 for the ratio.
  if (a < 5) a = 5; if (b < 5) b = 5
  printf "setup p99 purging/quiet: %.2f (target: at most 1.20)\n", a / b
  if (c + 0 > 0 && d + 0 > 0) printf "write p99 purging/quiet: %.2f (target: at most 1.20)\n", c / d
}'
