#!/usr/bin/env bash
# Authenticated registrations per second and calls per second over UDP, at p99 under 100 ms
# with under 1% failed, at least 95% of the offered rate achieved and every offered
# registration or call accounted for (the target, below): a three-node Tandem cluster
# (127.0.0.1/.2/.3, Raft over mutual TLS, real fsyncs) with all the load sent to one node,
# against Kamailio (the reference peer, ops/bench/kamailio-sip.cfg: registrar with digest
# auth, usrloc in memory, record-routing stateful proxy) in the same run on the same
# machine, both driven by the same sipp scenarios at the same offered loads.
#
#  1. Registrations (ops/sipp/bench-register.xml): REGISTER, 401, REGISTER with MD5
#     credentials (qop=auth), 200. REG_USERS sipp instances run side by side, each as its
#     own account bench0, bench1, … (sipp 3.6.1 authenticates as one user per instance),
#     each offering 1/REG_USERS of the rate from its own fixed port. Every REGISTER has a
#     new Call-ID and the same Contact, flow and interval as its account's binding: a
#     refresh, as from a phone that picks a new Call-ID each time. Tandem writes each
#     account's binding once, when it is new or its headroom runs low, and answers the
#     rest without a Raft write (node/src/agents/location/refreshes.rs). A binding written on every
#     REGISTER is measured by ops/bench/registrations.sh (first pass: new AORs; second
#     pass: a new contact for each).
#  2. Calls (ops/sipp/bench-uac-invite.xml): one caller account sends INVITE, gets 407, ACKs
#     it, sends the INVITE with credentials, gets 100/180/200, sends ACK, waits
#     CALL_HOLD_MS, sends BYE and gets 200; ACK and BYE follow the route set. The callee is
#     one sipp (ops/sipp/bench-uas.xml) that registered account "callee" from the same
#     port first, so the proxy looks up a real binding and relays over its flow.
#  3. Calls out through a provider (BENCH_PHASES=provider; not run by default): the same
#     caller dials the number 0301234. The provider is one sipp
#     (ops/sipp/bench-provider-uas.xml) that answers every call and the REGISTER of
#     Tandem's provider account. Tandem's app server takes the call as a B2BUA (no
#     dialplan: the customer's only provider account), answers the caller and places a
#     call of its own at the provider, with two CDRs per call; Kamailio (BENCH_PROVIDER)
#     authenticates the caller and proxies the INVITE to the same sipp, record-routed.
#     The work differs by design (a B2BUA keeps two dialogs, a proxy relays one): this
#     prices the B2BUA against the proxy a provider could put there instead.
#
# Usage: ./ops/bench/sip.sh [REG_CALLS] [REG_RATES] [CALLS] [CALL_RATES]
#   REG_CALLS, CALLS: registrations or calls per step (default 10000 each);
#   REG_RATES, CALL_RATES: offered rates per second, comma-separated, one step each, in
#   rising order (defaults 1000,2000,3000,4000,5000,6000,8000,10000 and 500,1000,1500,2000,2500,3000). At each step
#   Tandem runs, then Kamailio; a server that misses the target at a step skips the
#   higher ones. The defaults take five to eight minutes.
# The target: a step passes only if p99 is under 100 ms (for calls, both the setup's and
# the BYE's), under 1% of its calls failed, the completed-per-second figure (below) is at
# least 95% of the offered rate, and every offered registration or call is accounted for:
# sipp's successful plus failed equals the number offered at that step (REG_CALLS rounded
# up to a multiple of REG_USERS, or CALLS). A step that misses on the rate or the count
# gets a line under its table that says so.
# The cluster is formed by ops/bench/cluster.sh.
# Environment: REG_USERS (20); CALL_HOLD_MS (1000); BENCH_NODE (1: the node that takes all
# the load; node 1 forms the cluster and is its leader, 2 and 3 are followers);
# BENCH_PHASES ("register calls"; "provider" for phase 3); KEEP_WORK=1 keeps the work directory (server logs, sipp
# outputs, error logs and rtt traces); TANDEM_BENCH_NO_BUILD=1 skips setup and build;
# RUNTIME_THREADS, SIP_THREADS and NODE_ENV go to ops/bench/cluster.sh (the nodes' runtime
# and SIP threads, and their environment); BENCH_TANDEM_BIN benchmarks that binary instead
# of the build's.
#
# Per server and step it prints: sipp's successful and failed calls; completed per second,
# from the start to the last completed REGISTER or call setup (the wait for calls that time
# out is left out); p50 and p99 response times from sipp's rtt traces (sipp's clock moves
# in steps of about 4 ms: read 0 and 4 as "under 5 ms"); whether the step met the target
# (above); the servers' CPU time per completed call; the kernel's UDP receive-buffer drops;
# then each server's best completed rate over the steps that met the target and the ratio
# tandem/kamailio, which only means something if Kamailio missed a step (else it is
# bounded by the highest step offered).
# Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
reg_calls="${1:-10000}"
IFS=, read -r -a reg_rates <<< "${2:-1000,2000,3000,4000,5000,6000,8000,10000}"
calls="${3:-10000}"
IFS=, read -r -a call_rates <<< "${4:-500,1000,1500,2000,2500,3000}"
reg_users="${REG_USERS:-20}"
hold_ms="${CALL_HOLD_MS:-1000}"
bench_node="${BENCH_NODE:-1}"
phases="${BENCH_PHASES:-register calls}"
provider_phase=0
case " $phases " in *" provider "*) provider_phase=1 ;; esac
# Every bench account has this password; kamailio-sip.cfg gets it as BENCH_PASSWORD.
password="bench-pw-0123456789"
domain="example.com"

. ./ops/bench/common.sh

# --- Tandem: three nodes formed the operator's way ------------------------------------------
. ./ops/bench/cluster.sh
form_cluster
tandem_pids=("${node_pid[1]}" "${node_pid[2]}" "${node_pid[3]}")
token=$(cat "$work/admin.token")
declare -A sip admin
for i in 1 2 3; do
  sip[$i]=$(sed -n 's/^udp = \["\(.*\)"\]/\1/p' "$work/node$i/tandem.toml")
  admin[$i]=$(listen_of "$work/node$i/tandem.toml" admin)
done


# Accounts, through node 1's admin API: the callee, the caller, bench0 … bench<REG_USERS-1>.
api "${admin[1]}" /v1/customers/acme '{"name":"Acme"}'
users=(callee caller)
for ((u = 0; u < reg_users; u++)); do users+=("bench$u"); done
for u in "${users[@]}"; do
  api "${admin[1]}" "/v1/accounts/$domain/$u" "{\"password\":\"$password\",\"customer\":\"acme\"}"
done
# The one caller places every call of the call steps: no per-account call limit for it.
api "${admin[1]}" "/v1/accounts/$domain/caller" '{"max_concurrent_calls":0}'

# The loaded node has every account before any load starts.
for _ in $(seq 100); do
  curl -sf -o /dev/null -H "Authorization: Bearer $token" \
    "http://${admin[$bench_node]}/v1/accounts/$domain/${users[-1]}" && break
  sleep 0.1
done
role=$(curl -sf "http://${admin[$bench_node]}/metrics" \
  | awk '$1 == "tandem_raft_is_leader" { print ($2 == 1) ? "leader" : "follower" }')

# The provider phase's provider: one sipp for the whole run, which both servers call.
provider_args=()
if [ "$provider_phase" = 1 ]; then
  provider_port=$(udp_port 127.0.0.1)
  mkdir -p "$work/provider"
  (cd "$work/provider" && exec sipp -sf "$repo/ops/sipp/bench-provider-uas.xml" -i 127.0.0.1 \
    -p "$provider_port" -nostdin -trace_err > uas.out 2>&1) &
  pids+=($!)
  curl -sSf -o /dev/null -X PUT -H "Authorization: Bearer $token" \
    -d "{\"registrar\":\"127.0.0.1:$provider_port\",\"transport\":\"udp\",\"username\":\"bench\",\"password\":\"provider-pw\",\"expires_secs\":3600}" \
    "http://${admin[1]}/v1/providers/acme/p0"
  provider_args=(-A "BENCH_PROVIDER=\"sip:127.0.0.1:$provider_port\"")
fi

# --- Kamailio ----------------------------------------------------------------------------
kam="127.0.0.1:$(udp_port 127.0.0.1)"
kamailio -f ops/bench/kamailio-sip.cfg -l "udp:$kam" -A "BENCH_PASSWORD=\"$password\"" \
  "${provider_args[@]}" \
  -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" > "$work/kamailio.log" 2>&1 &
pids+=($!)
sleep 2
if ! kill -0 $! 2>/dev/null; then
  echo "sip.sh: Kamailio did not start (is it installed? ./ops/setup.sh):" >&2
  cat "$work/kamailio.log" >&2
  exit 1
fi
# Kamailio's main process and the children it forked.
kamailio_pids=($! $(pgrep -P $! || true))

# --- Measuring -----------------------------------------------------------------------------
# The kernel's UDP receive-buffer drops (all sockets: the servers' and sipp's).
rcvbuf_errors() { awk '/^Udp:/ { n++; if (n == 2) print $6 }' /proc/net/snmp; }
# tandem_counters FILE: the loaded node's /metrics counters this bench reports.
tandem_counters() {
  curl -sf "http://${admin[$bench_node]}/metrics" | awk '
    /^tandem_(raft_proposals_total|raft_proposal_batches_failed_total|log_wal_syncs_total) / ||
    /^tandem_sip_(auth_failures_total|calls_active|transactions_active) / ||
    /^tandem_sip_responses_total\{/ { print $1, $2 }' > "$1" || true
}
server_pids() { if [ "$1" = tandem ]; then echo "${tandem_pids[@]}"; else echo "${kamailio_pids[@]}"; fi; }
# Fixed sipp ports, the same at every step, so each step's REGISTERs replace the bindings
# of the step before (same Contact) instead of adding to them, and calls never fork to a
# callee sipp that has gone.
callee_port=$(udp_port 127.0.0.1)
reg_ports=()
for ((u = 0; u < reg_users; u++)); do reg_ports+=("$(udp_port 127.0.0.1)"); done
# Every load sipp: a call fails after 5 s without its answer; -nd, so that sipp does not
# follow a failed call with a BYE or CANCEL of its own (stray traffic a real caller would
# not send); every response time traced, each as it comes (sipp never writes a last batch
# smaller than -rtt_freq); 4 MiB socket buffers, the size Tandem asks for, because one
# sipp socket stands in for the sockets of thousands of phones, and with the default
# (net.core.rmem_default, 208 KiB here) the caller's socket overflowed whenever sipp lost
# the CPU for a few milliseconds (the kernel caps it at net.core.rmem_max).
sipp_common=(-i 127.0.0.1 -nostdin -nd -recv_timeout 5000 -trace_err -trace_rtt -rtt_freq 1
  -buff_size 4194304)

# before RUN ADDR / after RUN ADDR: counters around one load; RUN is NAME.PHASE.RATE.
before() {
  cpu_ticks $(server_pids "${1%%.*}") > "$work/$1.cpu0"
  rcvbuf_errors > "$work/$1.rcvbuf0"
  socket_drops "$2" > "$work/$1.sockdrops0"
  [ "${1%%.*}" != tandem ] || tandem_counters "$work/$1.metrics0"
}
after() {
  echo $(( $(cpu_ticks $(server_pids "${1%%.*}")) - $(cat "$work/$1.cpu0") )) > "$work/$1.cpu"
  echo $(( $(rcvbuf_errors) - $(cat "$work/$1.rcvbuf0") )) > "$work/$1.rcvbuf"
  echo $(( $(socket_drops "$2") - $(cat "$work/$1.sockdrops0") )) > "$work/$1.sockdrops"
  if [ "${1%%.*}" = tandem ]; then
    tandem_counters "$work/$1.metrics1"
    # Counters that moved (gauges as they are now), on one line.
    awk 'NR == FNR { a[$1] = $2; next }
         { d = ($1 ~ /_active$/) ? $2 : $2 - a[$1]
           if (d != 0) { n = $1; sub(/^tandem_/, "", n); sub(/_total/, "", n)
             gsub(/responses\{code="/, "", n); gsub(/"\}/, "", n); printf "%s%s=%d", sep, n, d; sep = " " } }
         END { print "" }' "$work/$1.metrics0" "$work/$1.metrics1" > "$work/$1.metrics"
  fi
}

# registrations NAME ADDR RATE: REG_USERS sipp instances side by side, one account each,
# REG_CALLS registrations in all. Writes NAME.register.RATE.{calls,rtd,…}.
registrations() {
  local name=$1 addr=$2 run="$1.register.$3" dir="$work/$1/register-$3" u n per rate limit
  local ok=0 failed=0 ps=()
  mkdir -p "$dir"
  per=$(( (reg_calls + reg_users - 1) / reg_users ))
  # RATE / REG_USERS per second each: RATE calls every REG_USERS seconds (sipp -r/-rp).
  rate=$3
  limit=$(( rate / reg_users > 50 ? rate / reg_users : 50 ))
  before "$run" "$addr"
  for ((u = 0; u < reg_users; u++)); do
    printf 'SEQUENTIAL\nbench%d;%s\n' "$u" "$domain" > "$dir/bench$u.csv"
    (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-register.xml" -inf "bench$u.csv" \
      -au "bench$u" -ap "$password" -p "${reg_ports[$u]}" -m "$per" \
      -r "$rate" -rp "$(( reg_users * 1000 ))" -l "$limit" \
      -timeout "$(( reg_calls / rate + 60 ))s" "${sipp_common[@]}" "$addr" > "bench$u.out" 2>&1) &
    ps+=($!)
    pids+=($!)
  done
  for n in "${ps[@]}"; do wait "$n" || true; done
  after "$run" "$addr"
  for ((u = 0; u < reg_users; u++)); do
    ok=$(( ok + $(counter "$dir/bench$u.out" "Successful call") ))
    failed=$(( failed + $(counter "$dir/bench$u.out" "Failed call") ))
  done
  stats "$work/$run.rtd" register "$dir"/*_rtt.csv
  echo "$ok $failed" > "$work/$run.calls"
  echo $(( per * reg_users )) > "$work/$run.offered"
}

# calls NAME ADDR RATE [PHASE]: registers the callee from its port, answers there, and
# makes CALLS calls to it; with PHASE "provider", calls the number 0301234 instead, which
# the provider sipp answers. Writes NAME.PHASE.RATE.{calls,rtd,bye,…}.
calls() {
  local name=$1 addr=$2 rate=$3 phase=${4:-calls} uas_pid="" limit
  local run="$1.$phase.$3" dir="$work/$1/$phase-$3"
  mkdir -p "$dir"
  if [ "$phase" = provider ]; then
    printf 'SEQUENTIAL\ncaller;%s;0301234\n' "$domain" > "$dir/caller.csv"
  else
    printf 'SEQUENTIAL\ncaller;%s;callee\n' "$domain" > "$dir/caller.csv"
    start_callee "$name" "$dir" "$addr" "$callee_port"
  fi
  limit=$(( rate * (hold_ms / 1000 + 5) ))
  before "$run" "$addr"
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf caller.csv -au caller \
    -ap "$password" -p 0 -m "$calls" -r "$rate" -l "$limit" -d "$hold_ms" \
    -timeout "$(( calls / rate + hold_ms / 1000 + 60 ))s" "${sipp_common[@]}" "$addr" \
    > uac.out 2>&1) || true
  after "$run" "$addr"
  if [ -n "$uas_pid" ]; then
    kill "$uas_pid" 2>/dev/null || true
    wait "$uas_pid" 2>/dev/null || true
  fi
  stats "$work/$run.rtd" setup "$dir"/bench-uac-invite_*_rtt.csv
  stats "$work/$run.bye" bye "$dir"/bench-uac-invite_*_rtt.csv
  echo "$(counter "$dir/uac.out" "Successful call") $(counter "$dir/uac.out" "Failed call")" \
    > "$work/$run.calls"
  echo "$calls" > "$work/$run.offered"
}

# achieved_rate RUN: completed per second, from the start to the last completed REGISTER or
# call setup (the reg/s or calls/s column).
achieved_rate() {
  local ok last
  read -r ok _ < "$work/$1.calls"
  read -r _ last _ _ < "$work/$1.rtd"
  awk -v ok="$ok" -v l="$last" 'BEGIN { printf "%.0f", (l > 0) ? ok / (l / 1000) : 0 }'
}
# verdict OK FAILED OFFERED RATE DONE P99…: "yes" only if some succeeded, under 1% failed,
# ok + failed is the OFFERED count (no call lost), DONE per second is at least 95% of the
# offered RATE, and every P99 is under 100 ms.
verdict() {
  local ok=$1 failed=$2 offered=$3 rate=$4 done=$5
  shift 5
  awk -v ok="$ok" -v f="$failed" -v n0="$offered" -v r="$rate" -v d="$done" -v p="$*" 'BEGIN {
    n = split(p, v, " "); good = ok > 0 && f / (ok + f) < 0.01
    if (ok + f != n0 || d * 100 < r * 95) good = 0
    for (i = 1; i <= n; i++) if (v[i] == "-" || v[i] + 0 >= 100) good = 0
    print good ? "yes" : "no" }'
}
# met RUN: whether that run met the target. RUN is NAME.PHASE.RATE.
met() {
  local ok failed b99="" p99
  read -r ok failed < "$work/$1.calls"
  read -r _ _ _ p99 < "$work/$1.rtd"
  [ ! -f "$work/$1.bye" ] || read -r _ _ _ b99 < "$work/$1.bye"
  verdict "$ok" "$failed" "$(cat "$work/$1.offered")" "${1##*.}" "$(achieved_rate "$1")" \
    "$p99" ${b99:+"$b99"}
}
# shortfall RUN: why that run missed on the achieved rate or on the count, if it did (the
# p99 and failed columns show the rest); empty if neither.
shortfall() {
  local ok failed
  read -r ok failed < "$work/$1.calls"
  awk -v ok="$ok" -v f="$failed" -v n0="$(cat "$work/$1.offered")" -v r="${1##*.}" \
    -v d="$(achieved_rate "$1")" 'BEGIN {
    if (d * 100 < r * 95) {
      printf "%scompleted %d/s, %.1f%% of the offered %d/s (at least 95%% needed)", s, d, int(d * 1000 / r) / 10, r
      s = "; "
    }
    if (ok + f != n0)
      printf "%sok + failed = %d for %d offered (%d %s)", s, ok + f, n0,
        (n0 > ok + f) ? n0 - ok - f : ok + f - n0, (n0 > ok + f) ? "not accounted for" : "more than offered"
  }'
}

# Only what the servers log from here on counts (forming the cluster logs Raft chatter).
for f in node1 node2 node3 kamailio; do wc -l < "$work/$f.log" > "$work/$f.lines"; done
since() { tail -n +"$(( $(cat "$work/$1.lines") + 1 ))" "$work/$1.log"; }

echo "Tandem: 3 nodes on 127.0.0.1-3 (UDP, Raft over mutual TLS, real fsyncs)," \
  "all load to node $bench_node ($role)"
echo "Kamailio $(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p'):" \
  "$(sed -n 's/^children=//p' ops/bench/kamailio-sip.cfg) UDP children, usrloc in memory"
echo "sipp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1) on the same $(nproc) cores"

# Each phase steps through its rates, Tandem then Kamailio at each; a server that misses the
# target at one rate is not loaded at the higher ones.
declare -A missed
for phase in $phases; do
  if [ "$phase" = register ]; then rates=("${reg_rates[@]}"); else rates=("${call_rates[@]}"); fi
  for rate in "${rates[@]}"; do
    for s in "tandem ${sip[$bench_node]}" "kamailio $kam"; do
      set -- $s
      [ -z "${missed[$1.$phase]:-}" ] || continue
      case $phase in
        register) registrations "$1" "$2" "$rate" ;;
        *) calls "$1" "$2" "$rate" "$phase" ;;
      esac
      [ "$(met "$1.$phase.$rate")" = yes ] || missed[$1.$phase]=$rate
    done
  done
done

# report PHASE TITLE UNIT: one table, one row per server and rate, then the highest offered
# rate at which each met the target.
report() {
  local phase=$1 unit=$3 n rate ok failed count last p50 p99 b99 done_rate cpu drops fmt best why
  local -A top
  local notes=()
  echo
  echo "$2"
  fmt='%-9s %7s %7s %6s %8s %7s %7s %7s  %-6s %7s  %s\n'
  if [ "$phase" != register ]; then
    printf "$fmt" server offered ok failed "$unit" setup setup BYE target server "UDP drops"
    printf "$fmt" "" "/s" "" "" "" "p50 ms" "p99 ms" "p99 ms" met "CPU/op" "socket/all"
    rates=("${call_rates[@]}")
  else
    printf "$fmt" server offered ok failed "$unit" "p50 ms" "p99 ms" "" target server "UDP drops"
    printf "$fmt" "" "/s" "" "" "" "" "" "" met "CPU/op" "socket/all"
    rates=("${reg_rates[@]}")
  fi
  for rate in "${rates[@]}"; do
    for n in tandem kamailio; do
      run="$n.$phase.$rate"
      if [ ! -f "$work/$run.calls" ]; then
        printf "$fmt" "$n" "$rate" "" "" "" "" "" "" "(not run: missed at ${missed[$n.$phase]}/s)" "" ""
        continue
      fi
      read -r ok failed < "$work/$run.calls"
      read -r count last p50 p99 < "$work/$run.rtd"
      b99=""
      [ ! -f "$work/$run.bye" ] || read -r _ _ _ b99 < "$work/$run.bye"
      done_rate=$(achieved_rate "$run")
      # Server CPU time (every Tandem node, or every Kamailio process) per completed call.
      cpu=$(awk -v t="$(cat "$work/$run.cpu")" -v ok="$ok" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (ok > 0) printf "%.0f us", t / hz * 1e6 / ok; else print "-" }')
      drops="$(cat "$work/$run.sockdrops")/$(cat "$work/$run.rcvbuf")"
      printf "$fmt" "$n" "$rate" "$ok" "$failed" "$done_rate" "$p50" "$p99" "$b99" \
        "$(met "$run")" "$cpu" "$drops"
      why=$(shortfall "$run")
      [ -z "$why" ] || notes+=("$n at $rate/s missed the target: $why")
      # The best completed rate over the steps that met the target: on a noisy machine a
      # higher step can pass with fewer completions per second than a lower one.
      if [ "$(met "$run")" = yes ] && [ "$done_rate" -gt "${top[$n]:-0}" ]; then top[$n]=$done_rate; fi
    done
  done
  for why in "${notes[@]}"; do echo "$why"; done
  for rate in "${rates[@]}"; do
    [ ! -f "$work/tandem.$phase.$rate.metrics" ] \
      || echo "tandem node $bench_node counters at $rate/s: $(cat "$work/tandem.$phase.$rate.metrics")"
  done
  echo "best rate that met the target: tandem ${top[tandem]:-none} $unit, kamailio ${top[kamailio]:-none} $unit"
  awk -v t="${top[tandem]:-0}" -v k="${top[kamailio]:-0}" \
    'BEGIN { if (k > 0) printf "ratio tandem/kamailio: %.2f\n", t / k; else print "ratio tandem/kamailio: -" }'
}
case " $phases " in *" register "*)
  report register "Registrations: $reg_calls per step by $reg_users sipp instances, one account each, a new
Call-ID every time: REGISTER, 401, REGISTER with credentials, 200" "reg/s" ;;
esac
case " $phases " in *" provider "*)
  report provider "Calls out through a provider: $calls per step, one caller, to a number, held ${hold_ms} ms:
INVITE, 407, ACK, INVITE with credentials, 100, 180, 200, ACK, BYE, 200; Tandem's app server
answers as a B2BUA and calls the provider sipp; Kamailio proxies to the same sipp" "calls/s" ;;
esac
case " $phases " in *" calls "*)
  report calls "Calls: $calls per step, one caller, one callee, held ${hold_ms} ms: INVITE, 407, ACK,
INVITE with credentials, 100, 180, 200, ACK, BYE, 200 (setup: first INVITE to its 200)" \
    "calls/s" ;;
esac
echo
echo "reg/s and calls/s: completed per second from the start to the last completed REGISTER or call"
echo "setup; target met: p99 under 100 ms, under 1% failed, reg/s or calls/s at least 95% of the"
echo "offered rate, and ok + failed equal to the number offered (none unaccounted for); server"
echo "CPU/op: user plus system CPU time of every Tandem node, or every Kamailio process, per"
echo "completed call (at low rates mostly idle work: timers, Raft heartbeats); UDP drops: the"
echo "kernel's receive-buffer drops at the server's socket / at every socket (sipp's too)."

# What the servers logged under load (Tandem logs at warn, Kamailio at debug=0: warnings
# and worse), and why sipp calls failed, if any did.
echo
for f in node1 node2 node3 kamailio; do
  n=$(since "$f" | grep -c . || true)
  echo "${f/node/tandem node } logged $n lines under load"
  # The first few, with the time stamps cut so that repeats collapse.
  [ "$n" = 0 ] || since "$f" | sed -E 's/^[0-9TZ:.-]+ +//' | sort | uniq -c | sort -rn | head -n 5
done
for f in "$work"/*/*/*_errors.log; do
  [ -s "$f" ] || continue
  echo "sipp errors in ${f#"$work/"} (by kind):"
  python3 "$repo/ops/bench/sipp-events.py" "$f" 8 2
done
