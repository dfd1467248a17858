#!/usr/bin/env bash
# Legitimate phones under a scanner's flood: do they still register and call, how much
# slower, and what does the flood cost the server? A three-node Tandem cluster
# (127.0.0.1/.2/.3, formed by ops/bench/cluster.sh, SIP over UDP and TCP, every sip.flood_*
# key at its default: 100 requests/s per source address, burst 400, 60 s ban) with all the
# traffic sent to one node, then Kamailio with pike (ops/bench/kamailio-hostile.cfg: the
# registrar and proxy of kamailio-sip.cfg, plus a 60 s ban of any address above 100
# requests/s), in the same run on the same machine, facing the same legitimate load and
# the same offered flood. Each server runs two phases of PHASE_SECS:
#
#  baseline  the legitimate load alone;
#  flood     the same legitimate load while ops/bench/hostile-flood.py floods the same
#            server (it starts FLOOD_LEAD_SECS before the load and stops after it).
#
# Legitimate load: LEGIT_ADDRS "sites", site k at 127.0.1.k (never a cluster member's
# address: members are never limited; never a flood address). Each site runs two sipp
# instances: phone<k> registering (ops/sipp/bench-register.xml: REGISTER, 401, REGISTER
# with MD5 credentials, 200; a new Call-ID each time, same Contact) REG_RATE times a
# second, and caller<k> calling (ops/sipp/bench-uac-invite.xml: INVITE, 407, ACK, INVITE
# with credentials, 180, 200, ACK, CALL_HOLD_MS, BYE, 200) CALL_RATE times a second to
# "callee", one sipp at 127.0.1.100 (ops/sipp/bench-uas.xml) that registered first. So
# one site sends 2*REG_RATE + 3*CALL_RATE requests a second that a flood limit counts (ACK
# is never counted), plus 2*CALL_RATE ACKs: 35 (45) at the defaults, under both servers'
# 100/s. The caller accounts get max_concurrent_calls = 100, so Tandem's per-account call
# limit (4 by default) is not what is measured.
#
# Offered flood (ops/bench/hostile-flood.py; each kind from its own addresses, its rate
# split evenly over them):
#  (a) FLOOD_REGISTER_RATE/s REGISTERs guessing passwords from FLOOD_REGISTER_ADDRS
#      addresses (127.0.2.x), for the legitimate accounts and a few common names: after
#      the first challenge, every guess carries wrong credentials on the last nonce that
#      address got (as a guesser that keeps its nonce would);
#  (b) FLOOD_OPTIONS_RATE/s OPTIONS from FLOOD_OPTIONS_ADDRS addresses (127.0.4.1 on),
#      by default 1/s each: spread too thin for any per-address limit;
#  (c) FLOOD_INVITE_RATE/s INVITEs to random numbers from FLOOD_INVITE_ADDRS addresses
#      (127.0.3.x), never ACKed;
#  (d) FLOOD_SLOW_TCP TCP connections from FLOOD_SLOW_TCP_ADDRS addresses (127.0.12.x),
#      held open: half silent, half dripping a REGISTER one byte a second; reopened a
#      second after the server closes one.
# Every request carries User-Agent FLOOD_UA ("hostile.sh", which neither server refuses;
# FLOOD_UA=friendly-scanner measures the User-Agent filter instead). Beside the flood a
# TCP probe, a legitimate client at 127.0.1.200, sends one OPTIONS a second over a new
# connection and expects its 200 within 2 s: can a real client still connect? Only
# loopback addresses are used; hostile-flood.py refuses any other.
#
# Usage: ./ops/bench/hostile.sh [PHASE_SECS]   (default 60: about 5 minutes in all)
# Environment: LEGIT_ADDRS (4), REG_RATE (10, per site), CALL_RATE (5, per site),
# CALL_HOLD_MS (1000), FLOOD_LEAD_SECS (5), FLOOD_REGISTER_RATE (600),
# FLOOD_REGISTER_ADDRS (4), FLOOD_OPTIONS_RATE (1000), FLOOD_OPTIONS_ADDRS (1000),
# FLOOD_INVITE_RATE (800), FLOOD_INVITE_ADDRS (4), FLOOD_SLOW_TCP (1000),
# FLOOD_SLOW_TCP_ADDRS (4), FLOOD_UA (hostile.sh); BENCH_SERVERS ("tandem kamailio");
# BENCH_NODE (1: the node that takes all the traffic; node 1 is the leader); KEEP_WORK=1
# keeps the work directory (logs, sipp outputs, rtt traces, flood.json);
# TANDEM_BENCH_NO_BUILD=1 skips setup and build; BENCH_TANDEM_BIN benchmarks that binary;
# RUNTIME_THREADS, SIP_THREADS and NODE_ENV go to ops/bench/cluster.sh.
#
# What it prints, per server, one row per phase:
#  offered, ok, failed   legitimate registrations plus calls offered (sites x rate x
#                        PHASE_SECS each), sipp's successful and failed (a call sipp had
#                        not finished when it gave up counts as offered, not ok);
#  success %             ok / offered; the target is at least 99.9% under flood;
#  reg p50/p99           first REGISTER sent to its 200, ms, over every registration;
#  setup p50/p99         first INVITE sent to its 200, ms (two round trips and the
#                        callee's answer). sipp's clock moves in steps of about 4 ms: read
#                        0 and 4 as "under 5 ms". 500 or more means a retransmission;
#  CPU s, CPU % (srv)    user plus system CPU time over the legitimate load's wall time:
#                        of the loaded node (Tandem) or every Kamailio process, and % of
#                        one core (200% is both cores); CPU s (all): the three Tandem
#                        nodes (for Kamailio the same as srv);
#  mem MB                at the end of the phase: the loaded node's VmRSS; for Kamailio
#                        its processes' PSS summed (their RSS would count the shared
#                        memory once per process);
#  UDP drops             the kernel's receive-buffer drops at the server's UDP socket;
#  flood sent            UDP requests the flood sent, from its start (FLOOD_LEAD_SECS
#                        before the load) to the load's end.
# Then, per flood phase, what each kind of flood sent and got back (by status code;
# unanswered: dropped by a ban, a filter or the kernel), the slow TCP connections (as the
# generator saw them, and how many the server's kernel held established at the end of
# the load: a silent connection whose handshake met a full listen backlog is established
# only at the client's end), the TCP probe, the generator's own CPU, and for Tandem the
# loaded node's counters that moved in each phase. Last, one verdict line per server:
# success under flood against 99.9%, and the p99s under flood against the baseline's.
# Record the output in BENCHMARKS.md with the command. The machine has 2 cores shared by
# sipp, the flood generator and the servers: compare the two servers within one run.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
phase_secs="${1:-60}"
legit_addrs="${LEGIT_ADDRS:-4}"
reg_rate="${REG_RATE:-10}"
call_rate="${CALL_RATE:-5}"
hold_ms="${CALL_HOLD_MS:-1000}"
lead="${FLOOD_LEAD_SECS:-5}"
servers="${BENCH_SERVERS:-tandem kamailio}"
bench_node="${BENCH_NODE:-1}"
password="bench-pw-0123456789"
domain="example.com"
[ "$legit_addrs" -ge 1 ] && [ "$legit_addrs" -le 99 ] || { echo "LEGIT_ADDRS: 1 to 99" >&2; exit 2; }

. ./ops/bench/common.sh
. ./ops/bench/cluster.sh
site() { echo "127.0.1.$1"; }
callee_ip=127.0.1.100
probe_ip=127.0.1.200

# --- Measuring (the rest is in ops/bench/common.sh) ------------------------------------
# mem_kb: the loaded Tandem node's VmRSS, or Kamailio's PSS summed over its processes.
mem_kb() {
  local p t=0
  if [ "$server" = tandem ]; then
    awk '/^VmRSS:/ { print $2 }' "/proc/$srv_main/status"
  else
    for p in "${srv_all[@]}"; do
      t=$(( t + $(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0) ))
    done
    echo "$t"
  fi
}
# The loaded node's counters and gauges, for Tandem.
tandem_metrics() {
  curl -sf "http://${admin[$bench_node]}/metrics" | awk '
    /^tandem_sip_(requests_received|auth_failures|malformed_answered|malformed_dropped|scanners_dropped|flood_bans|flood_dropped|connections_refused)_total / ||
    /^tandem_sip_(flood_addresses|connections_open|transactions_held|transactions_active) / ||
    /^tandem_(auth_lockout_keys|auth_address_keys|proxy_dialogs|proxy_call_limit_refusals_total) / { print $1, $2 }' > "$1" || true
}

# --- The servers --------------------------------------------------------------------------
declare -A admin
# start_server NAME: sets srv_udp, srv_tcp, srv_main (the loaded process), srv_all.
start_server() {
  local i u
  if [ "$1" = tandem ]; then
    SIP_TCP=1 form_cluster
    for i in 1 2 3; do admin[$i]=$(listen_of "$work/node$i/tandem.toml" admin); done
    srv_udp=$(sed -n 's/^udp = \["\(.*\)"\]/\1/p' "$work/node$bench_node/tandem.toml")
    srv_tcp=$(sed -n 's/^tcp = \["\(.*\)"\]/\1/p' "$work/node$bench_node/tandem.toml")
    srv_main=${node_pid[$bench_node]}
    srv_cpu=("$srv_main")
    srv_all=("${node_pid[1]}" "${node_pid[2]}" "${node_pid[3]}")
    token=$(cat "$work/admin.token")
    api() { curl -sSf -o /dev/null -X PUT -H "Authorization: Bearer $token" -d "$2" "http://${admin[1]}$1"; }
    api /v1/customers/acme '{"name":"Acme"}'
    api "/v1/accounts/$domain/callee" "{\"password\":\"$password\",\"customer\":\"acme\"}"
    for ((u = 1; u <= legit_addrs; u++)); do
      api "/v1/accounts/$domain/phone$u" "{\"password\":\"$password\",\"customer\":\"acme\"}"
      api "/v1/accounts/$domain/caller$u" \
        "{\"password\":\"$password\",\"customer\":\"acme\",\"max_concurrent_calls\":100}"
    done
    for _ in $(seq 100); do
      curl -sf -o /dev/null -H "Authorization: Bearer $token" \
        "http://${admin[$bench_node]}/v1/accounts/$domain/caller$legit_addrs" && break
      sleep 0.1
    done
    role=$(curl -sf "http://${admin[$bench_node]}/metrics" \
      | awk '$1 == "tandem_raft_is_leader" { print ($2 == 1) ? "leader" : "follower" }')
    for i in 1 2 3; do wc -l < "$work/node$i.log" > "$work/node$i.lines"; done
  else
    srv_udp="127.0.0.1:$(udp_port 127.0.0.1)"
    srv_tcp="127.0.0.1:$(port 127.0.0.1)"
    kamailio -f ops/bench/kamailio-hostile.cfg -l "udp:$srv_udp" -l "tcp:$srv_tcp" \
      -A "BENCH_PASSWORD=\"$password\"" -DD -E -m 1024 -M 16 -P "$work/kamailio.pid" -Y "$work" \
      > "$work/kamailio.log" 2>&1 &
    srv_main=$!
    pids+=($!)
    sleep 2
    if ! kill -0 "$srv_main" 2>/dev/null; then
      echo "hostile.sh: Kamailio did not start:" >&2
      cat "$work/kamailio.log" >&2
      exit 1
    fi
    srv_all=("$srv_main" $(pgrep -P "$srv_main" || true))
    srv_cpu=("${srv_all[@]}")
    wc -l < "$work/kamailio.log" > "$work/kamailio.lines"
  fi
}
stop_server() {
  local p
  if [ "$1" = tandem ]; then
    for p in "${node_pid[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${node_pid[@]}"; do wait "$p" 2>/dev/null || true; done
    node_pid=()
  else
    kill "$srv_main" 2>/dev/null || true
    wait "$srv_main" 2>/dev/null || true
  fi
}

# --- Legitimate load -----------------------------------------------------------------------
sipp_common=(-nostdin -nd -recv_timeout 5000 -trace_err -trace_rtt -rtt_freq 1 -buff_size 4194304)
declare -a reg_ports
for ((u = 1; u <= legit_addrs; u++)); do reg_ports[u]=$(udp_port "$(site "$u")"); done
callee_port=$(udp_port "$callee_ip")
n_reg=$(( reg_rate * phase_secs ))
n_call=$(( call_rate * phase_secs ))
offered=$(( legit_addrs * (n_reg + n_call) ))

# callee_up: registers the callee with the server under test and answers calls there.
callee_up() {
  local dir="$work/$server-callee"
  mkdir -p "$dir"
  printf 'SEQUENTIAL\ncallee;%s\n' "$domain" > "$dir/callee.csv"
  (cd "$dir" && sipp -sf "$repo/ops/sipp/bench-register.xml" -inf callee.csv -au callee \
    -ap "$password" -i "$callee_ip" -p "$callee_port" -m 1 -nostdin -timeout 10s \
    -recv_timeout 3000 "$srv_udp" > register.out 2>&1) \
    || { echo "$server: the callee did not register:" >&2; cat "$dir/register.out" >&2; exit 1; }
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uas.xml" -i "$callee_ip" -p "$callee_port" \
    -nostdin -trace_err -buff_size 4194304 > uas.out 2>&1) &
  uas_pid=$!
  pids+=($uas_pid)
  sleep 0.5
}

# phase NAME: the legitimate load, with the flood around it if NAME is flood.
phase() {
  local ph=$1 run="$server.$1" dir="$work/$server-$1" u ps=() flood_pid="" t0 t1 c0 a0 d0
  mkdir -p "$dir"
  if [ "$ph" = flood ]; then
    local users=""
    for ((u = 1; u <= legit_addrs; u++)); do users+="phone$u,caller$u,"; done
    python3 ops/bench/hostile-flood.py --udp "$srv_udp" --tcp "$srv_tcp" --domain "$domain" \
      --users "${users}callee,100,1000,admin" --user-agent "${FLOOD_UA:-hostile.sh}" \
      --register-rate "${FLOOD_REGISTER_RATE:-600}" --register-addrs "${FLOOD_REGISTER_ADDRS:-4}" \
      --options-rate "${FLOOD_OPTIONS_RATE:-1000}" --options-addrs "${FLOOD_OPTIONS_ADDRS:-1000}" \
      --invite-rate "${FLOOD_INVITE_RATE:-800}" --invite-addrs "${FLOOD_INVITE_ADDRS:-4}" \
      --slow-tcp "${FLOOD_SLOW_TCP:-1000}" --slow-tcp-addrs "${FLOOD_SLOW_TCP_ADDRS:-4}" \
      --probe-addr "$probe_ip" --seconds "$(( lead + phase_secs + 120 ))" \
      --stats "$dir/flood.json" > "$dir/flood.out" 2>&1 &
    flood_pid=$!
    pids+=($flood_pid)
    sleep "$lead"
    kill -0 "$flood_pid" 2>/dev/null || { echo "hostile.sh: the flood generator died:" >&2; cat "$dir/flood.out" >&2; exit 1; }
  fi
  [ "$server" != tandem ] || tandem_metrics "$dir/metrics0"
  c0=$(cpu_ticks "${srv_cpu[@]}"); a0=$(cpu_ticks "${srv_all[@]}"); d0=$(socket_drops "$srv_udp")
  t0=$(date +%s.%N)
  for ((u = 1; u <= legit_addrs; u++)); do
    printf 'SEQUENTIAL\nphone%d;%s\n' "$u" "$domain" > "$dir/phone$u.csv"
    printf 'SEQUENTIAL\ncaller%d;%s;callee\n' "$u" "$domain" > "$dir/caller$u.csv"
    (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-register.xml" -inf "phone$u.csv" \
      -au "phone$u" -ap "$password" -i "$(site "$u")" -p "${reg_ports[u]}" -m "$n_reg" \
      -r "$reg_rate" -rp 1000 -l 200 -timeout "$(( phase_secs + 30 ))s" "${sipp_common[@]}" \
      "$srv_udp" > "phone$u.out" 2>&1) &
    ps+=($!); pids+=($!)
    (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uac-invite.xml" -inf "caller$u.csv" \
      -au "caller$u" -ap "$password" -i "$(site "$u")" -p 0 -m "$n_call" -r "$call_rate" \
      -rp 1000 -l 500 -d "$hold_ms" -timeout "$(( phase_secs + hold_ms / 1000 + 30 ))s" \
      "${sipp_common[@]}" "$srv_udp" > "caller$u.out" 2>&1) &
    ps+=($!); pids+=($!)
  done
  for u in "${ps[@]}"; do wait "$u" || true; done
  t1=$(date +%s.%N)
  local cpu all mem drops
  cpu=$(( $(cpu_ticks "${srv_cpu[@]}") - c0 )); all=$(( $(cpu_ticks "${srv_all[@]}") - a0 ))
  mem=$(mem_kb); drops=$(( $(socket_drops "$srv_udp") - d0 ))
  # TCP connections the server's kernel holds established (accepted or waiting to be).
  ss -tanH state established src "$srv_tcp" 2>/dev/null | wc -l > "$dir/tcp_held"
  [ "$server" != tandem ] || tandem_metrics "$dir/metrics1"
  if [ -n "$flood_pid" ]; then
    kill -TERM "$flood_pid" 2>/dev/null || true
    wait "$flood_pid" || true
  fi
  local ok=0 failed=0
  for ((u = 1; u <= legit_addrs; u++)); do
    ok=$(( ok + $(counter "$dir/phone$u.out" "Successful call") + $(counter "$dir/caller$u.out" "Successful call") ))
    failed=$(( failed + $(counter "$dir/phone$u.out" "Failed call") + $(counter "$dir/caller$u.out" "Failed call") ))
  done
  stats "$dir/reg.rtd" register "$dir"/bench-register_*_rtt.csv
  stats "$dir/setup.rtd" setup "$dir"/bench-uac-invite_*_rtt.csv
  local sent=0
  [ ! -f "$dir/flood.json" ] || sent=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sum(k['sent'] for k in d['udp'].values()))" "$dir/flood.json")
  echo "$ok $failed $cpu $all $t0 $t1 $mem $drops $sent" > "$work/$run.result"
}

# --- The run -------------------------------------------------------------------------------
hz=$(getconf CLK_TCK)
echo "hostile.sh: $(nproc) cores, sipp $(sipp -v 2>/dev/null | grep -o 'v[0-9.]*' | head -1)," \
  "Kamailio $(kamailio -v | sed -n 's/^version: kamailio \([^ ]*\).*/\1/p'), phases of ${phase_secs} s"
echo "legit: $legit_addrs sites (127.0.1.1-$legit_addrs), each $reg_rate reg/s + $call_rate calls/s" \
  "(held $hold_ms ms) = $(( 2 * reg_rate + 3 * call_rate )) requests/s per address counted by a" \
  "flood limit ($(( 2 * reg_rate + 5 * call_rate )) with ACKs); $offered registrations + calls offered per phase"
echo "flood: REGISTER guesses ${FLOOD_REGISTER_RATE:-600}/s from ${FLOOD_REGISTER_ADDRS:-4} addresses," \
  "OPTIONS ${FLOOD_OPTIONS_RATE:-1000}/s from ${FLOOD_OPTIONS_ADDRS:-1000}," \
  "INVITEs ${FLOOD_INVITE_RATE:-800}/s from ${FLOOD_INVITE_ADDRS:-4}," \
  "${FLOOD_SLOW_TCP:-1000} slow TCP connections from ${FLOOD_SLOW_TCP_ADDRS:-4};" \
  "User-Agent ${FLOOD_UA:-hostile.sh}; starts ${lead} s before the load"
for server in $servers; do
  start_server "$server"
  callee_up
  phase baseline
  phase flood
  kill "$uas_pid" 2>/dev/null || true
  wait "$uas_pid" 2>/dev/null || true
  # What the server logged during the phases (Tandem at warn, Kamailio at warn).
  if [ "$server" = tandem ]; then
    tail -n +"$(( $(cat "$work/node$bench_node.lines") + 1 ))" "$work/node$bench_node.log" > "$work/$server.logged"
    header="Tandem: node $bench_node of 3 (${role:-?}) takes everything; sip.flood_* at their defaults"
  else
    tail -n +"$(( $(cat "$work/kamailio.lines") + 1 ))" "$work/kamailio.log" > "$work/$server.logged"
    header="Kamailio with pike (>200 requests per 2 s bans an address for 60 s), $(sed -n 's/^children=//p' ops/bench/kamailio-hostile.cfg) UDP + $(sed -n 's/^tcp_children=//p' ops/bench/kamailio-hostile.cfg) TCP children"
  fi
  echo "$header" > "$work/$server.header"
  stop_server "$server"
done

# --- Report ----------------------------------------------------------------------------------
# sipp_events FILE: what a sipp -trace_err log says went wrong, by kind (as ops/bench/sip.sh).
sipp_events() {
  python3 "$repo/ops/bench/sipp-events.py" "$1" 6 4
}
fmt='%-9s %7s %6s %6s %8s %10s %10s %6s %6s %6s %6s %6s %6s\n'
for server in $servers; do
  echo
  cat "$work/$server.header"
  printf "$fmt" phase offered ok failed success reg setup "CPU s" "CPU %" "CPU s" mem UDP flood
  printf "$fmt" "" "" "" "" "%" "p50/p99" "p50/p99" srv srv all MB drops sent
  for ph in baseline flood; do
    read -r ok failed cpu all t0 t1 mem drops sent < "$work/$server.$ph.result"
    read -r _ _ r50 r99 < "$work/$server-$ph/reg.rtd"
    read -r _ _ s50 s99 < "$work/$server-$ph/setup.rtd"
    awk -v ph="$ph" -v off="$offered" -v ok="$ok" -v f="$failed" -v c="$cpu" -v a="$all" \
      -v hz="$hz" -v t0="$t0" -v t1="$t1" -v m="$mem" -v d="$drops" -v s="$sent" \
      -v reg="$r50/$r99" -v set="$s50/$s99" -v fmt="$fmt" 'BEGIN {
        w = t1 - t0
        printf fmt, ph, off, ok, f, sprintf("%.2f", int(ok * 10000 / off) / 100), reg, set,
          sprintf("%.1f", c / hz), sprintf("%.0f", c / hz / w * 100), sprintf("%.1f", a / hz),
          sprintf("%.0f", m / 1024), d, s }'
  done
  dir="$work/$server-flood"
  python3 - "$dir/flood.json" "$(cat "$dir/tcp_held")" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"flood phase: the generator ran {d['seconds']} s on {d['cpu_seconds']} s of CPU")
for name, k in d["udp"].items():
    if not k["addrs"]:
        continue
    ans = sum(k["answered"].values())
    codes = ", ".join(f"{c} {n}" for c, n in sorted(k["answered"].items()))
    per = k["rate"] / k["addrs"]
    print(f"  {name:8s} {k['sent']:7d} sent from {k['addrs']} addresses ({per:g}/s each)"
          + (f", {k['behind']} behind schedule" if k["behind"] else "")
          + f"; answered {ans} ({100 * ans / max(1, k['sent']):.1f}%){': ' + codes if codes else ''}")
t = d["slow_tcp"]
if t["target"]:
    print(f"  slow-tcp {t['target']} wanted: opened {t['opened']}, at most {t['open_max']} open at once, "
          f"{t['open_at_end']} open at the end, {t['closed_by_server']} closed by the server, "
          f"{t['failed']} connects failed; {sys.argv[2]} established at the server's end (the load's end)")
p = d["tcp_probe"]
print(f"  tcp probe (legit OPTIONS over a new connection each second): {p['ok']} ok, {p['failed']} failed"
      + (f", p50 {p['p50_ms']} ms, max {p['max_ms']} ms" if p["ok"] else "")
      + (f"; errors {p['errors']}" if p["errors"] else ""))
PY
  if [ "$server" = tandem ]; then
    for ph in baseline flood; do
      echo "  node $bench_node counters, $ph (moved during the load; gauges at its end):" \
        "$(awk 'NR == FNR { a[$1] = $2; next }
            { d = ($1 ~ /_total$/) ? $2 - a[$1] : $2
              if (d != 0) { n = $1; sub(/^tandem_/, "", n); sub(/_total$/, "", n); printf "%s%s=%d", sep, n, d; sep = " " } }
            END { print "" }' "$work/$server-$ph/metrics0" "$work/$server-$ph/metrics1")"
    done
  fi
  n=$(grep -c . "$work/$server.logged" || true)
  echo "  logged $n lines during the two phases$([ "$n" = 0 ] || echo ", most frequent (addresses masked):")"
  [ "$n" = 0 ] || sed -E 's/^[0-9TZ:.-]+ +//; s/127\.[0-9]+\.[0-9]+\.[0-9]+(:[0-9]+)?/127.x/g; s/\[[0-9]+\]//g' \
    "$work/$server.logged" | cut -c1-160 | sort | uniq -c | sort -rn | head -n 5 | sed 's/^/  /'
  for f in "$work/$server"-*/*_errors.log; do
    [ -s "$f" ] || continue
    echo "  sipp events in ${f#"$work/"} (by kind):"
    sipp_events "$f"
  done
done

echo
echo "Verdict (target: at least 99.9% of legitimate registrations and calls succeed under flood)"
for server in $servers; do
  read -r ok _ < "$work/$server.flood.result"
  read -r bok _ < "$work/$server.baseline.result"
  read -r _ _ _ br99 < "$work/$server-baseline/reg.rtd"; read -r _ _ _ fr99 < "$work/$server-flood/reg.rtd"
  read -r _ _ _ bs99 < "$work/$server-baseline/setup.rtd"; read -r _ _ _ fs99 < "$work/$server-flood/setup.rtd"
  awk -v s="$server" -v ok="$ok" -v bok="$bok" -v n="$offered" -v br="$br99" -v fr="$fr99" \
    -v bs="$bs99" -v fs="$fs99" 'BEGIN {
      pct = int(ok * 10000 / n) / 100
      printf "%-9s %s: %.2f%% under flood (%d of %d; baseline %.2f%%); p99 baseline -> flood: register %s -> %s ms, call setup %s -> %s ms\n",
        s, (ok * 1000 >= n * 999) ? "MET" : "MISSED", pct, ok, n, int(bok * 10000 / n) / 100, br, fr, bs, fs }'
done
