#!/usr/bin/env bash
# A dialplan that loops for ever, beside everyone else's calls: does it slow them? A
# three-node Tandem cluster (127.0.0.1/.2/.3, Raft over mutual TLS, real fsyncs) as
# ops/bench/sip.sh forms it, all load on node 1.
#
# The measured calls go through the app server and its sandbox: account "caller" has the
# dialplan `dial("callee");`, and calls the number 0301234 (sipp,
# ops/sipp/bench-uac-invite.xml: INVITE, 407, INVITE with credentials, 100/180/200, ACK,
# CALL_HOLD_MS, BYE), CALLS calls at RATE per second; its dialplan rings the local account
# "callee", a sipp registered through node 1 (ops/sipp/bench-uas.xml). Two runs of them:
#   1. "quiet": nothing else;
#   2. "looping": beside them, account "looper", whose dialplan is `loop { }`, calls the
#      same number LOOP_RATE times per second (ops/sipp/bench-uac-refused.xml). Each of its
#      runs spins until a limit stops it and its caller gets 500 with a Reason, or, once
#      the account used its script time (dialplan.max_run_time_per_second_ms, 200 ms a
#      second), is refused with 503 before it runs. With the
#      default dialplan.max_operations (100,000) an empty loop reaches that limit within
#      milliseconds; node 1 runs with the highest allowed (100,000,000, MAX_OPERATIONS) so
#      that each run spins for its whole time limit (dialplan.max_run_time_ms, 100 ms): the
#      worst an operator's settings allow.
# A warm-up of 10 s of the measured calls comes first, not reported.
#
# The target: the looping run's setup p99 within 20% of the quiet run's, both runs meeting
# the step target of sip.sh (p99 under 100 ms, under 1% failed, at least 95% of the
# offered rate), and every looping call refused with 500 or 503 within the run time limit
# (the "refused" p99 a little over 100 ms).
#
# Usage: ./ops/bench/endless-script.sh [RATE] [CALLS] [LOOP_RATE]   (defaults 200 12000 2)
# Environment as for sip.sh (TANDEM_BENCH_NO_BUILD, KEEP_WORK, CALL_HOLD_MS);
# MAX_OPERATIONS sets node 1's dialplan.max_operations (default 100000000).
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
rate="${1:-200}"
calls="${2:-12000}"
loop_rate="${3:-2}"
hold_ms="${CALL_HOLD_MS:-1000}"
password="bench-pw-0123456789"
domain="example.com"

. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
form_cluster
token=$(cat "$work/admin.token")
api "$admin1" /v1/customers/acme '{"name":"Acme"}'
for u in callee caller looper; do
  api "$admin1" "/v1/accounts/$domain/$u" \
    "{\"password\":\"$password\",\"customer\":\"acme\",\"max_concurrent_calls\":0}"
done
api "$admin1" "/v1/accounts/$domain/caller/dialplan" '{"script":"dial(\"callee\");"}'
api "$admin1" "/v1/accounts/$domain/looper/dialplan" '{"script":"loop { }"}'
max_ops="${MAX_OPERATIONS:-100000000}"
kill -INT "${node_pid[1]}"
wait "${node_pid[1]}" 2>/dev/null || true
printf '[dialplan]\nmax_operations = %s\n' "$max_ops" >> "$work/node1/tandem.toml"
env ${NODE_ENV:-} "$TANDEM_BIN" run --config "$work/node1/tandem.toml" 2>> "$work/node1.log" &
node_pid[1]=$!
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://$admin1/health" && break
  sleep 0.1
done
sleep 2

sipp_common=(-i 127.0.0.1 -nostdin -nd -recv_timeout 5000 -trace_err -trace_rtt -rtt_freq 1
  -buff_size 4194304)
callee_port=$(udp_port 127.0.0.1)
# run NAME LOOPING: the measured calls and, if LOOPING is 1, the looper's beside them.
run() {
  local name=$1 looping=$2 dir="$work/$1" uas_pid loop_pid="" loops
  mkdir -p "$dir"
  printf 'SEQUENTIAL\ncaller;%s;0301234\n' "$domain" > "$dir/caller.csv"
  printf 'SEQUENTIAL\nlooper;%s;0301234\n' "$domain" > "$dir/looper.csv"
  start_callee "$name" "$dir" "$sip1" "$callee_port"
  cpu_ticks "${node_pid[1]}" > "$dir/cpu0"
  if [ "$looping" = 1 ]; then
    loops=$(( calls / rate * loop_rate ))
    (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-refused.xml" -inf looper.csv \
      -au looper -ap "$password" -p 0 -m "$loops" -r "$loop_rate" -l 50 \
      -timeout "$(( calls / rate + 60 ))s" "${sipp_common[@]}" "$sip1" > looper.out 2>&1) &
    loop_pid=$!
    pids+=($loop_pid)
  fi
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf caller.csv -au caller \
    -ap "$password" -p 0 -m "$calls" -r "$rate" -l "$(( rate * (hold_ms / 1000 + 5) ))" \
    -d "$hold_ms" -timeout "$(( calls / rate + hold_ms / 1000 + 60 ))s" "${sipp_common[@]}" \
    "$sip1" > uac.out 2>&1) || true
  [ -z "$loop_pid" ] || wait "$loop_pid" || true
  echo $(( $(cpu_ticks "${node_pid[1]}") - $(cat "$dir/cpu0") )) > "$work/$name.cpu"
  kill "$uas_pid" 2>/dev/null || true
  wait "$uas_pid" 2>/dev/null || true
  stats "$work/$name.rtd" setup "$dir"/bench-uac-invite_*_rtt.csv
  stats "$work/$name.bye" bye "$dir"/bench-uac-invite_*_rtt.csv
  echo "$(counter "$dir/uac.out" "Successful call") $(counter "$dir/uac.out" "Failed call")" \
    > "$work/$name.calls"
  if [ "$looping" = 1 ]; then
    stats "$work/$name.refused" refused "$dir"/bench-uac-refused_*_rtt.csv
    echo "$(counter "$dir/looper.out" "Successful call") $(counter "$dir/looper.out" "Failed call")" \
      > "$work/$name.loops"
  fi
}

calls_wanted=$calls
calls=$(( rate * 10 ))
run warmup 0
calls=$calls_wanted
run quiet 0
run looping 1

# --- Report --------------------------------------------------------------------------------
echo "Tandem: 3 nodes on 127.0.0.1-3 (UDP, Raft over mutual TLS, real fsyncs), calls to node 1;"
echo "sipp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1) on the same $(nproc) cores"
printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s  %s\n' run offered ok failed "calls/s" \
  "setup" "setup" "BYE" "node 1" "looping calls: refused, other, p50/p99 ms"
printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s\n' "" "/s" "" "" "" "p50 ms" "p99 ms" "p99 ms" "CPU s"
declare -A p99s
for name in quiet looping; do
  read -r ok failed < "$work/$name.calls"
  read -r _ last p50 p99 < "$work/$name.rtd"
  read -r _ _ _ b99 < "$work/$name.bye"
  done_rate=$(awk -v ok="$ok" -v l="$last" 'BEGIN { printf "%.0f", (l > 0) ? ok / (l / 1000) : 0 }')
  p99s[$name]=$p99
  cpu=$(awk -v t="$(cat "$work/$name.cpu")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz }')
  loops="-"
  if [ -f "$work/$name.loops" ]; then
    read -r lok lfailed < "$work/$name.loops"
    read -r _ _ l50 l99 < "$work/$name.refused"
    loops="$lok, $lfailed, $l50/$l99"
  fi
  printf '%-8s %7s %7s %6s %8s %7s %7s %7s %9s  %s\n' "$name" "$rate" "$ok" "$failed" \
    "$done_rate" "$p50" "$p99" "$b99" "$cpu" "$loops"
done
awk -v a="${p99s[looping]}" -v b="${p99s[quiet]}" 'BEGIN {
  # sipp measures in steps of about 4 ms: a p99 under 5 ms counts as 5 for the ratio.
  if (a < 5) a = 5; if (b < 5) b = 5
  printf "setup p99 looping/quiet: %.2f (target: at most 1.20)\n", a / b
}'
echo "node 1: dialplan.max_operations $max_ops; its log, by the limit that stopped the looper's runs:"
grep -o 'exceeded its [a-z ]* limit' "$work/node1.log" | sort | uniq -c || echo "   (none logged)"
read -r lok _ < "$work/looping.loops"
stopped=$(grep -c 'exceeded its [a-z ]* limit' "$work/node1.log" || true)
echo "looping calls refused before their run (503: the account's script time used up): $(( lok - stopped ))"
