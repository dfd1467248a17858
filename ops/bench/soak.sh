#!/usr/bin/env bash
# A soak: MINUTES of registrations and calls at once, Tandem and then Kamailio, each
# sampled every minute, to show that memory stays flat, no descriptor leaks and nothing
# fails when a server runs for a long time under a steady mix.
#
# The mix, all sent to Tandem's node 1 (of the three-node cluster of ops/bench/cluster.sh)
# or to Kamailio (ops/bench/kamailio-sip.cfg):
#  - refreshes: REG_USERS sipp instances (ops/sipp/bench-register.xml, one account each,
#    a new Call-ID and the same Contact every time: the path most REGISTERs take),
#    REG_RATE a second in all;
#  - written registrations: WRITE_AORS phones (aor-load --storm, accounts u0… of
#    bench.example) re-registering one after another from new flows with the Contact they
#    had, WRITE_RATE a second on schedule, round after round, so each is a replicated
#    write;
#  - calls: one caller sipp (ops/sipp/bench-uac-invite.xml: INVITE, 407, ACK, INVITE with
#    credentials, 100/180/200, ACK, a hold of CALL_HOLD_MS, BYE) at CALL_RATE a second to
#    one callee sipp that registered once.
# The soak runs at half the knee of this mix, measured in the same run: the mix comes in
# units (MIX_UNIT: 420 refreshes, 90 written registrations and 80 calls a second), and
# before soaking Tandem takes all three loads at once for PROBE_SECS at a rising number of
# units (MIX_STEPS, on the same cluster with the same sipp scenarios). The knee is the
# most units at which every load met the benchmarks' target (p99 under 100 ms, under 1%
# failed, at least 95% of the offered rate achieved, every one accounted for); the soak
# offers MIX_SHARE percent of it (50), to Tandem and then, at the same rates, to
# Kamailio. The loads are probed together because their costs do not add up: shares of
# each load's own knee (21%, 9% and 16% of them, 46% together) kept the two cores 83-95%
# busy. A machine's speed also differs between sittings by tens of percent, so rates
# fixed from another day's knee can overload it; then the soak measures the overload,
# not a long run. REG_RATE, WRITE_RATE and CALL_RATE, all three set, fix the rates
# instead (SOAK_SERVERS=kamailio alone needs them).
#
# Every minute it prints how busy the machine's cores were over that minute, and per
# Tandem node resident memory (VmRSS), open file descriptors and what its RocksDB
# instances hold by their own estimate (`tandem_store_memory_bytes`: memtables, table
# readers and block caches, part of the resident memory), or for Kamailio the
# proportional set size (Pss) and descriptors of all its processes together (they share
# one memory pool). At the end, per server and process:
# memory at minute 5, the lowest and highest after it and their spread around the minute-5
# figure (the target: flat within ±10% after the first five minutes), descriptors at the
# start and the end, and per load its completed and failed count and p99 (the target: no
# failures). Memory at a steady 10,000 registrations/s and after it is
# ops/bench/steady-memory.sh's.
#
# Usage: ./ops/bench/soak.sh [MINUTES]   (default 30, per server; at most 55, as the
#   callee registers once for an hour). Environment: REG_RATE, WRITE_RATE, CALL_RATE
#   (probed, above), MIX_UNIT ("420 90 80": refreshes, written registrations and calls a
#   second per unit; refreshes a multiple of REG_USERS), MIX_STEPS ("2 3 4 5 6 7 8 10 12":
#   a knee is known to one step, and the soak takes the step below it), MIX_SHARE (50),
#   PROBE_SECS (15), REG_USERS (20), WRITE_AORS (30000), CALL_HOLD_MS (1000),
#   SOAK_SERVERS ("tandem kamailio"; Kamailio soaks at Tandem's rates, so Tandem goes
#   first unless all three rates are set), KEEP_WORK, TANDEM_BENCH_NO_BUILD,
#   BENCH_TANDEM_BIN and NODE_ENV/NODE_TOML as in sip.sh. The probe takes about 30 s a
#   step.
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
minutes="${1:-30}"
reg_rate="${REG_RATE:-}"
reg_users="${REG_USERS:-20}"
write_rate="${WRITE_RATE:-}"
write_aors="${WRITE_AORS:-30000}"
call_rate="${CALL_RATE:-}"
hold_ms="${CALL_HOLD_MS:-1000}"
servers="${SOAK_SERVERS:-tandem kamailio}"
probe_secs="${PROBE_SECS:-15}"
read -r unit_reg unit_write unit_call <<< "${MIX_UNIT:-420 90 80}"
mix_steps="${MIX_STEPS:-2 3 4 5 6 7 8 10 12}"
mix_share="${MIX_SHARE:-50}"
# aor-load's accounts have this password; every other account gets it too, and Kamailio
# takes it as BENCH_PASSWORD.
password="bench-password-1"
domain="example.com"
. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
load="$CARGO_TARGET_DIR/debug/aor-load"
base=$work
trap 'work=$base; cleanup' EXIT
secs=$(( minutes * 60 ))
if [ "$minutes" -lt 1 ] || [ "$minutes" -gt 55 ]; then
  echo "soak.sh: MINUTES must be 1 to 55 (the callee registers once, for an hour)" >&2
  exit 2
fi
fixed="$reg_rate$write_rate$call_rate"
if [ -n "$fixed" ] && { [ -z "$reg_rate" ] || [ -z "$write_rate" ] || [ -z "$call_rate" ]; }; then
  echo "soak.sh: REG_RATE, WRITE_RATE and CALL_RATE fix the mix together: set all three or none" >&2
  exit 2
fi
if [ "${servers%% *}" != tandem ] && [ -z "$fixed" ]; then
  echo "soak.sh: the rates come from Tandem's knee, so SOAK_SERVERS must start with tandem unless REG_RATE, WRITE_RATE and CALL_RATE are all set" >&2
  exit 2
fi
if [ $(( unit_reg % reg_users )) -ne 0 ]; then
  echo "soak.sh: MIX_UNIT's refreshes ($unit_reg) must be a multiple of REG_USERS ($reg_users)" >&2
  exit 2
fi
# The same ports for the refreshers and the callee in the probe and the soak, so that the
# soak refreshes the bindings the probe made instead of adding to them.
reg_ports=()
for ((u = 0; u < reg_users; u++)); do reg_ports+=("$(udp_port 127.0.0.1)"); done
callee_port=$(udp_port 127.0.0.1)

# procs NAME: the processes sampled, as LABEL:PID words.
procs() {
  if [ "$1" = tandem ]; then
    echo "node1:${node_pid[1]} node2:${node_pid[2]} node3:${node_pid[3]}"
  else
    echo "kamailio:$kpid"
  fi
}
# mem_kib NAME PID: a Tandem node's VmRSS, or the summed Pss of Kamailio's processes.
mem_kib() {
  if [ "$1" = tandem ]; then
    awk '/^VmRSS:/ { print $2 }' "/proc/$2/status"
  else
    pss_kib "$2"
  fi
}
# fds NAME PID: open descriptors of the process (Kamailio: of all its processes).
fds() {
  local p t=0 all=$2
  [ "$1" = tandem ] || all="$2 $(pgrep -P "$2" || true)"
  for p in $all; do t=$(( t + $(ls "/proc/$p/fd" 2>/dev/null | wc -l) )); done
  echo "$t"
}
# store_mb nodeN: what node N's RocksDB instances hold by their own estimate (memtables,
# table readers, block caches), from its metrics, to tell their growth from the heap's.
store_mb() {
  curl -sf "http://$(listen_of "$work/${1}/tandem.toml" admin)/metrics" \
    | awk '$1 ~ /^tandem_store_memory_bytes/ { t += $2 } END { printf "%.1f", t / 1048576 }'
}
# busy_since_last: sets busy to the percent of the machine's CPU time spent busy since
# the last call ("-" the first time).
cpu_last=""
busy_since_last() {
  local now
  now=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  busy=-
  [ -z "$cpu_last" ] || busy=$(awk -v a="$cpu_last" -v b="$now" 'BEGIN {
      split(a, x, " "); split(b, y, " "); t = y[1] - x[1]
      printf "%.0f", t ? 100 * (1 - (y[2] - x[2]) / t) : 0 }')
  cpu_last=$now
}
sample() {
  local name=$1 minute=$2 w label pid line=""
  busy_since_last
  for w in $(procs "$name"); do
    label=${w%%:*}
    pid=${w#*:}
    echo "$minute $label $(mem_kib "$name" "$pid") $(fds "$name" "$pid")" >> "$work/samples"
    line+=$(printf '  %s %6.1f MB %4d fds' "$label" "$(awk -v k="$(mem_kib "$name" "$pid")" 'BEGIN { print k / 1024 }')" "$(fds "$name" "$pid")")
    [ "$name" != tandem ] || line+=$(printf ' (stores %5.1f MB)' "$(store_mb "$label")")
  done
  printf '%-8s minute %3d: cores %3s%% busy%s\n' "$name" "$minute" "$busy" "$line"
}

# passes OK FAILED OFFERED RATE ACHIEVED P99: "yes" only if some succeeded, under 1%
# failed, OK + FAILED is the OFFERED count, ACHIEVED per second is at least 95% of the
# offered RATE, and P99 is under 100 ms (the target of sip.sh and storm.sh).
passes() {
  awk -v ok="$1" -v f="$2" -v n0="$3" -v r="$4" -v d="$5" -v p="$6" 'BEGIN {
    good = ok > 0 && f / (ok + f) < 0.01 && ok + f == n0 && d * 100 >= r * 95
    if (p == "-" || p + 0 >= 100) good = 0
    print good ? "yes" : "no" }'
}
# unaccounted OK FAILED OFFERED: " (N unaccounted for)" if OK + FAILED falls short of
# OFFERED (or exceeds it), else nothing.
unaccounted() {
  [ $(( $1 + $2 )) -eq "$3" ] || printf ' (%d unaccounted for)' "$(( $3 - $1 - $2 ))"
}
# achieved OK LAST_MS: completed per second, to the last completion.
achieved() { awk -v ok="$1" -v l="$2" 'BEGIN { printf "%.0f", (l > 0) ? ok / (l / 1000) : 0 }'; }

# probe_refreshes ADDR RATE / probe_writes ADDR RATE / probe_calls ADDR RATE: that load
# alone for PROBE_SECS; each prints "OK FAILED OFFERED ACHIEVED P99".
probe_refreshes() {
  local dir="$work/probe-refreshes-$2" per ok failed last p99 u
  mkdir -p "$dir"
  per=$(( $2 * probe_secs / reg_users ))
  start_refreshers "$dir" "$1" "$2" "$per" "$(( probe_secs + 60 ))"
  for u in "${refreshers[@]}"; do wait "$u" || true; done
  read -r ok failed <<< "$(refreshers_counted "$dir")"
  stats "$dir/rtd" register "$dir"/bench-register_*_rtt.csv
  read -r _ last _ p99 < "$dir/rtd"
  echo "$ok $failed $(( per * reg_users )) $(achieved "$ok" "$last") $p99"
}
probe_writes() {
  local n=$(( $2 * probe_secs )) line
  [ "$n" -le "$write_aors" ] || n=$write_aors
  # "storm: OK of N registered in S s (R/s offered, A/s achieved), F failed, p50 X ms, p99 Y ms, …"
  line=$("$load" --storm "$1" "$n" "$2" "$password" 2> /dev/null | grep '^storm:' || true)
  awk -v n="$n" '{
      for (i = 1; i <= NF; i++) {
        if ($(i + 1) == "of") ok = $i
        if ($(i + 1) == "achieved),") { a = $i; sub(/^\(?/, "", a); sub(/\/s$/, "", a) }
        if ($(i + 1) == "failed,") f = $i
        if ($i == "p99") p = $(i + 1)
      }
    }
    END { if (ok == "") print 0, n, n, 0, "-"; else print ok, f, n, a, p }' <<< "$line"
}
probe_calls() {
  local dir="$work/probe-calls-$2" n=$(( $2 * probe_secs )) last p99
  mkdir -p "$dir"
  printf 'SEQUENTIAL\ncaller;%s;callee\n' "$domain" > "$dir/caller.csv"
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf caller.csv -au caller \
    -ap "$password" -i 127.0.0.1 -p 0 -m "$n" -r "$2" -l "$(( $2 * (hold_ms / 1000 + 5) ))" \
    -d "$hold_ms" -timeout "$(( probe_secs + hold_ms / 1000 + 60 ))s" -nostdin -nd \
    -recv_timeout 5000 -trace_rtt -rtt_freq 1 -buff_size 4194304 "$1" > uac.out 2>&1) || true
  stats "$dir/rtd" setup "$dir"/bench-uac-invite_*_rtt.csv
  read -r _ last _ p99 < "$dir/rtd"
  local ok failed
  ok=$(counter "$dir/uac.out" "Successful call")
  failed=$(counter "$dir/uac.out" "Failed call")
  echo "$ok $failed $n $(achieved "$ok" "$last") $p99"
}
# probe_mix ADDR UNITS: the three loads at once for PROBE_SECS at UNITS of the mix; prints
# a line per load and sets mix_met to yes if every load met the target.
probe_mix() {
  local addr=$1 k=$2 load_name rate ok failed offered done p99 verdict j
  local -A rates=([refreshes]=$(( k * unit_reg )) [writes]=$(( k * unit_write )) [calls]=$(( k * unit_call )))
  local running=()
  for load_name in refreshes writes calls; do
    "probe_$load_name" "$addr" "${rates[$load_name]}" > "$work/mix-$k-$load_name" &
    running+=($!)
  done
  for j in "${running[@]}"; do wait "$j" || true; done
  mix_met=yes
  for load_name in refreshes writes calls; do
    rate=${rates[$load_name]}
    read -r ok failed offered done p99 < "$work/mix-$k-$load_name"
    verdict=$(passes "$ok" "$failed" "$offered" "$rate" "$done" "$p99")
    printf 'probe    %2d units: %-9s at %5d/s: %d of %d completed, %d failed, %s/s achieved, p99 %s ms: %s\n' \
      "$k" "$load_name" "$rate" "$ok" "$offered" "$failed" "$done" "$p99" \
      "$([ "$verdict" = yes ] && echo met || echo missed)"
    [ "$verdict" = yes ] || mix_met=no
  done
}
# probe ADDR: unless the rates were given, finds the mix's knee (the most units at which
# every load met the target, one step at a time until one misses) and sets the rates to
# MIX_SHARE percent of it.
probe() {
  local addr=$1 k knee_units=0
  [ -z "$fixed" ] || return 0
  start_callee tandem "$work" "$addr" "$callee_port"
  for k in $mix_steps; do
    # What the last step left (queued writes, retransmissions) settles first.
    sleep 5
    probe_mix "$addr" "$k"
    [ "$mix_met" = yes ] || break
    knee_units=$k
  done
  [ "$mix_met" = no ] || echo "probe    the mix met the target at every step: its knee is higher"
  kill "$uas_pid" 2>/dev/null || true
  wait "$uas_pid" 2>/dev/null || true
  if [ "$knee_units" -eq 0 ]; then
    echo "soak.sh: the mix met the target at none of its steps; nothing to soak at" >&2
    exit 1
  fi
  # Half of the knee, in whole refreshers' shares.
  reg_rate=$(( knee_units * unit_reg * mix_share / 100 / reg_users * reg_users ))
  write_rate=$(( knee_units * unit_write * mix_share / 100 ))
  call_rate=$(( knee_units * unit_call * mix_share / 100 ))
  echo "probe    the mix's knee: $knee_units units ($(( knee_units * unit_reg )) refreshes/s," \
    "$(( knee_units * unit_write )) written registrations/s, $(( knee_units * unit_call )) calls/s);" \
    "the soak offers $mix_share% of it"
  # What the last steps left (completed transactions, Timer J: 32 s) goes before minute 0.
  sleep 40
}

# soak NAME SIP_ADDR: the three loads for MINUTES, sampled every minute.
soak() {
  local name=$1 addr=$2 u ps=() per writer m
  per=$(( reg_rate * secs / reg_users ))
  : > "$work/samples"
  cpu_last=""
  sample "$name" 0
  start_refreshers "$work" "$addr" "$reg_rate" "$per" "$(( secs + 120 ))"
  ps=("${refreshers[@]}")
  printf 'SEQUENTIAL\ncaller;%s;callee\n' "$domain" > "$work/caller.csv"
  # The callee registers once, for an hour (both servers' longest), so that it outlives the
  # soak: bench-register.xml's 300 s would lapse under the calls.
  sed 's/^\( *\)Expires: 300/\1Expires: 3600/' "$repo/ops/sipp/bench-register.xml" \
    > "$work/callee-register.xml"
  start_callee "$name" "$work" "$addr" "$callee_port" "$work/callee-register.xml"
  (cd "$work" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf caller.csv -au caller \
    -ap "$password" -i 127.0.0.1 -p 0 -m "$(( call_rate * secs ))" -r "$call_rate" \
    -l "$(( call_rate * (hold_ms / 1000 + 5) ))" -d "$hold_ms" -timeout "$(( secs + 120 ))s" \
    -nostdin -nd -recv_timeout 5000 -trace_rtt -rtt_freq 1 -trace_err -buff_size 4194304 \
    "$addr" > uac.out 2>&1) &
  ps+=($!)
  pids+=($!)
  # Round after round of written registrations until the time is up.
  (
    end=$(( $(date +%s) + secs ))
    while [ "$(date +%s)" -lt "$end" ]; do
      n=$(( (end - $(date +%s)) * write_rate ))
      [ "$n" -le "$write_aors" ] || n=$write_aors
      [ "$n" -gt 0 ] || break
      "$load" --storm "$addr" "$n" "$write_rate" "$password" 2> /dev/null
    done > "$work/writes.out"
  ) &
  writer=$!
  pids+=($writer)
  for ((m = 1; m <= minutes; m++)); do
    sleep 60
    sample "$name" "$m"
  done
  for u in "${ps[@]}" "$writer"; do wait "$u" || true; done
  kill "$uas_pid" 2>/dev/null || true
  wait "$uas_pid" 2>/dev/null || true
  local ok failed
  read -r ok failed <<< "$(refreshers_counted "$work")"
  stats "$work/refresh.rtd" register "$work"/bench-register_*_rtt.csv
  read -r _ _ _ p99 < "$work/refresh.rtd"
  # Every load's count is checked against what was offered: a load generator that could
  # not start or fell behind offered less, and the soak did not run at its rates.
  printf '%-8s refreshes: %d of %d completed, %d failed%s, p99 %s ms\n' "$name" "$ok" \
    "$(( per * reg_users ))" "$failed" "$(unaccounted "$ok" "$failed" "$(( per * reg_users ))")" "$p99"
  awk -v n="$name" '{
      for (i = 1; i <= NF; i++) {
        if ($i == "of") { ok += $(i - 1); offered += $(i + 1) }
        if ($i == "failed,") f += $(i - 1)
        if ($i == "p99") { p = $(i + 1) + 0; if (p > worst) worst = p }
      }
      rounds++
    }
    END { printf "%-8s written registrations: %d of %d completed, %d failed%s, in %d rounds, worst round p99 %s ms\n",
      n, ok, offered, f, (ok + f == offered) ? "" : sprintf(" (%d unaccounted for)", offered - ok - f),
      rounds, worst }' "$work/writes.out"
  stats "$work/setup.rtd" setup "$work"/bench-uac-invite_*_rtt.csv
  read -r _ _ _ p99 < "$work/setup.rtd"
  ok=$(counter "$work/uac.out" "Successful call")
  failed=$(counter "$work/uac.out" "Failed call")
  printf '%-8s calls: %d of %d completed, %d failed%s, setup p99 %s ms\n' "$name" "$ok" \
    "$(( call_rate * secs ))" "$failed" "$(unaccounted "$ok" "$failed" "$(( call_rate * secs ))")" "$p99"
  # Memory after the first five minutes, around its minute-5 figure; descriptors.
  awk -v n="$name" '
    { mem[$2, $1] = $3; fd[$2, $1] = $4; if (!($2 in seen)) { seen[$2] = 1; order[++k] = $2 } last = $1 }
    END {
      for (i = 1; i <= k; i++) {
        p = order[i]; b = mem[p, 5]; lo = b; hi = b
        for (m = 5; m <= last; m++) { if (mem[p, m] < lo) lo = mem[p, m]; if (mem[p, m] > hi) hi = mem[p, m] }
        spread = b ? 100 * ((hi - b > b - lo) ? hi - b : b - lo) / b : 0
        if (last < 5) {
          printf "%-8s %s: %.1f MB at minute 0, %.1f MB at minute %d (too short to judge flatness); descriptors %d at the start, %d at the end\n",
            n, p, mem[p, 0] / 1024, mem[p, last] / 1024, last, fd[p, 0], fd[p, last]
          continue
        }
        printf "%-8s %s: memory %.1f MB at minute 5, %.1f-%.1f MB after it (within %.1f%% of minute 5: %s); %.1f MB at minute 0; descriptors %d at the start, %d at the end\n",
          n, p, b / 1024, lo / 1024, hi / 1024, spread, spread <= 10 ? "flat" : "NOT flat",
          mem[p, 0] / 1024, fd[p, 0], fd[p, last]
      }
    }' "$work/samples"
}

echo "soak.sh: $minutes minutes per server: refreshes by $reg_users sipp instances," \
  "written registrations over $write_aors AORs, calls held ${hold_ms} ms, at" \
  "${reg_rate:-(probed)}, ${write_rate:-(probed)} and ${call_rate:-(probed)} a second;" \
  "$(nproc) cores shared; Tandem 3 nodes (load on node 1), Kamailio" \
  "$(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p')"
for name in $servers; do
  echo
  work="$base/$name"
  mkdir -p "$work"
  if [ "$name" = tandem ]; then
    form_cluster
    "$load" --accounts-only "$admin1" "$work/admin.token" "$sip1" "${node_pid[1]}" \
      "$write_aors" 64 > /dev/null 2>&1
    api "$admin1" /v1/customers/acme '{"name":"Acme"}'
    for u in callee caller $(seq -f 'bench%g' 0 $(( reg_users - 1 ))); do
      api "$admin1" "/v1/accounts/$domain/$u" "{\"password\":\"$password\",\"customer\":\"acme\"}"
    done
    # The one caller places every call: no per-account call limit for it.
    api "$admin1" "/v1/accounts/$domain/caller" '{"max_concurrent_calls":0}'
    # Every AOR registered once, so each soak round rewrites a binding that exists.
    "$load" --storm "$sip1" "$write_aors" 0 "$password" > /dev/null 2>&1
    probe "$sip1"
    echo "soak     $reg_rate refreshes/s, $write_rate written registrations/s, $call_rate calls/s"
    soak tandem "$sip1"
    stop_nodes
  else
    kam="127.0.0.1:$(udp_port 127.0.0.1)"
    kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -A "BENCH_PASSWORD=\"$password\"" \
      -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
    kpid=$!
    pids+=($kpid)
    sleep 2
    kill -0 "$kpid" 2>/dev/null || { echo "Kamailio did not start:" >&2; cat "$work/kamailio.log" >&2; exit 1; }
    "$load" --storm "$kam" "$write_aors" 0 "$password" > /dev/null 2>&1
    soak kamailio "$kam"
    kill "$kpid" 2>/dev/null || true
    wait "$kpid" 2>/dev/null || true
  fi
done
work=$base
echo
echo "Targets (issue #22): memory flat within ±10% after the first five minutes, and no failures (nothing unaccounted for)."
