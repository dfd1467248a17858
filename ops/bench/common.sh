# Shared by the SIP benchmarks (sip.sh, hostile.sh, cdr-purge.sh, endless-script.sh); sourced from the
# repository root. It sets up, builds and picks the tandem binary (ops/bench/build.sh:
# the release profile's, or BENCH_TANDEM_BIN's), makes the work directory $work, and installs the cleanup that
# stops every process the script started: Tandem nodes in node_pid with SIGINT (the fast
# stop: on SIGTERM a node would wait up to 32 s for transactions that calls failed under
# load leave open), everything else in pids or among the shell's jobs with SIGTERM. The
# work directory goes too, unless KEEP_WORK=1. Then the measuring helpers both use.

. ./ops/bench/build.sh

work=$(mktemp -d)
pids=()
node_pid=()
cleanup() {
  local p
  for p in "${node_pid[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}" $(jobs -p); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free UDP port on an address, for the sipp instances and Kamailio: below the kernel's
# ephemeral range, so that no socket bound to port 0 (the load generators open thousands,
# one per flow) can take it between now and its use, and never one given out before in
# this run. A port the kernel picked itself could be taken meanwhile: a sipp instance
# that then failed to bind sent nothing, and the load it stood for went missing.
udp_port() {
  python3 - "$1" "$work/ports-given" << 'EOF'
import random, socket, sys
addr, given_path = sys.argv[1], sys.argv[2]
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
try:
    given = set(open(given_path).read().split())
except OSError:
    given = set()
for _ in range(1000):
    port = random.randrange(10000, low)
    if str(port) in given:
        continue
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((addr, port))
    except OSError:
        continue
    finally:
        s.close()
    with open(given_path, "a") as f:
        f.write("%d\n" % port)
    print(port)
    break
else:
    sys.exit("udp_port: no free UDP port on %s below the ephemeral range" % addr)
EOF
}
# stats OUT TAG FILES…: completions, time of the last one (ms since its sipp started) and
# the p50 and p99 response times (ms) of the rtd TAG over sipp rtt traces; "-" if none.
stats() {
  local out=$1 tag=$2
  shift 2
  cat "$@" 2>/dev/null | awk -F';' -v t="$tag" '$3 == t { print $2, $1 }' | sort -n \
    | awk '{ v[NR] = $1; if ($2 + 0 > last) last = $2 + 0 }
        function q(x,  i) { i = int(x * NR + 0.999999); if (i < 1) i = 1; return v[i] }
        END { if (NR == 0) print 0, 0, "-", "-"; else print NR, last, q(0.5), q(0.99) }' > "$out"
}
# counter FILE NAME: sipp's cumulative count of "Successful call" or "Failed call" (0 if
# sipp printed none).
counter() {
  awk -F'|' -v n="$2" '$1 ~ "^ +" n " " { gsub(/ /, "", $3); v = $3 } END { print v + 0 }' "$1" \
    2>/dev/null || echo 0
}
# cpu_ticks PID…: user plus system CPU time of those processes, in clock ticks.
cpu_ticks() {
  local p t=0
  for p in "$@"; do
    t=$(( t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}
# Drops at one UDP socket (ss's skmem d counter), by local address.
socket_drops() {
  local d
  d=$(ss -uanmH src "$1" 2>/dev/null | grep -o 'd[0-9]*)' | tr -dc '0-9' || true)
  echo "${d:-0}"
}

# start_refreshers DIR ADDR RATE PER TIMEOUT_SECS: REG_USERS ($reg_users) sipp instances
# in DIR, instance u as account bench<u> (password $password, domain $domain), RATE
# registrations a second in all and PER each (ops/sipp/bench-register.xml: REGISTER, 401,
# REGISTER with credentials, 200; a new Call-ID and the same Contact every time, the
# refresh path), every response time traced. Instance u sends from port reg_ports[u] if
# the script set that array (so that a later run refreshes the same bindings), else from
# any. Their pids are in refreshers (and pids).
start_refreshers() {
  local dir=$1 addr=$2 rate=$3 per=$4 timeout=$5 u
  refreshers=()
  for ((u = 0; u < reg_users; u++)); do
    printf 'SEQUENTIAL\nbench%d;%s\n' "$u" "$domain" > "$dir/bench$u.csv"
    (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-register.xml" -inf "bench$u.csv" \
      -au "bench$u" -ap "$password" -i 127.0.0.1 -p "${reg_ports[$u]:-0}" -m "$per" \
      -r "$rate" -rp "$(( reg_users * 1000 ))" -l "$(( rate / reg_users * 5 + 50 ))" \
      -timeout "${timeout}s" -nostdin -nd -recv_timeout 5000 -trace_rtt \
      -rtt_freq 1 -buff_size 4194304 "$addr" > "bench$u.out" 2>&1) &
    refreshers+=($!)
    pids+=($!)
  done
}
# refreshers_counted DIR: the successful and failed registrations of start_refreshers'
# instances in DIR, once they have ended.
refreshers_counted() {
  local u ok=0 failed=0
  for ((u = 0; u < reg_users; u++)); do
    ok=$(( ok + $(counter "$1/bench$u.out" "Successful call") ))
    failed=$(( failed + $(counter "$1/bench$u.out" "Failed call") ))
  done
  echo "$ok $failed"
}
# pss_kib PID: the proportional set size of a process and its children together, in KiB
# (Kamailio's processes share one memory pool, so adding their RSS would count it once
# per process).
pss_kib() {
  local p t=0
  for p in "$1" $(pgrep -P "$1" || true); do
    t=$(( t + $(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}

# start_callee NAME DIR ADDR PORT [SCENARIO]: registers account "callee" (password
# $password, domain $domain) from 127.0.0.1:PORT through ADDR with SCENARIO (default
# ops/sipp/bench-register.xml, which asks for 300 s), then answers calls there with
# ops/sipp/bench-uas.xml in the background; its pid is in $uas_pid (and in pids). NAME
# labels the error if the registration fails, which ends the script.
start_callee() {
  local name=$1 dir=$2 addr=$3 port=$4 scenario=${5:-$repo/ops/sipp/bench-register.xml}
  printf 'SEQUENTIAL\ncallee;%s\n' "$domain" > "$dir/callee.csv"
  (cd "$dir" && sipp -sf "$scenario" -inf callee.csv -au callee \
    -ap "$password" -i 127.0.0.1 -p "$port" -m 1 -nostdin -timeout 10s \
    -recv_timeout 3000 "$addr" > callee-register.out 2>&1) \
    || { echo "$name: the callee did not register:" >&2; cat "$dir/callee-register.out" >&2; exit 1; }
  (cd "$dir" && exec sipp -sf "$repo/ops/sipp/bench-uas.xml" -i 127.0.0.1 -p "$port" \
    -nostdin -trace_err > uas.out 2>&1) &
  uas_pid=$!
  pids+=($uas_pid)
  sleep 0.5
}
