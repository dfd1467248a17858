#!/usr/bin/env bash
# The registration agent at scale, Tandem against Kamailio's uac module in the same run:
# COUNT provider accounts (default 10000) brought to registered and kept registered at the
# same registrar peer, one client after the other. The peer is Kamailio as a provider's
# registrar (failover-tests/fixtures/kamailio-provider.cfg: digest with qop=auth, nonce
# counts, bindings of at most 30 s, so every account refreshes every 15 to 24 s).
#  - Tandem: one node (a cluster of one), its accounts created through the admin API, then
#    the node restarted: "to registered" is the time from that start until the peer has
#    seen an authenticated REGISTER of every account from it. The node spreads its first
#    REGISTERs over registration_agent.start_spread_secs (10 s by default, kept here).
#  - Kamailio uac: its uacreg table in db_text, reg_timer_interval 1 s, started with the
#    table full; the same measure.
# Then, over a steady WINDOW seconds (default 60): refreshes (authenticated REGISTERs at
# the peer) per second and CPU time (user + system, every process of the client) per
# refresh; and memory per account: the client's proportional set size (PSS, so Kamailio's
# shared memory counts once) with every account registered, less the same client with no
# accounts, divided by COUNT.
# Usage: ./ops/bench/providers.sh [COUNT] [WINDOW]. TANDEM_BENCH_NO_BUILD=1 skips the build;
# KEEP_WORK=1 keeps the logs. Record the output in BENCHMARKS.md with the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-10000}"
window="${2:-60}"
. ./ops/bench/common.sh

pss_kib() {
  local p t=0
  for p in "$@"; do
    t=$(( t + $(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}
# registered_from ADDR FROM_LINE: distinct accounts the peer logged an authenticated
# REGISTER of from ADDR, in its log from line FROM_LINE on.
registered_from() {
  tail -n "+$2" "$work/registrar.log" | grep -o "REGISTER [^ ]* from $1" | sort -u | wc -l
}
# refreshes_from ADDR FROM_LINE: authenticated REGISTERs from ADDR since FROM_LINE.
refreshes_from() {
  tail -n "+$2" "$work/registrar.log" | grep -c "REGISTER [^ ]* from $1" || true
}
log_lines() { wc -l < "$work/registrar.log"; }
# wait_all ADDR FROM_LINE START_NS: waits until every account is registered; prints seconds.
wait_all() {
  local n=0
  while :; do
    n=$(registered_from "$1" "$2")
    if [ "$n" -ge "$count" ]; then break; fi
    if [ $(( ($(date +%s%N) - $3) / 1000000000 )) -gt 600 ]; then
      echo "only $n of $count registered after 600 s" >&2
      exit 1
    fi
    sleep 0.5
  done
  awk -v ns=$(( $(date +%s%N) - $3 )) 'BEGIN { printf "%.1f", ns / 1e9 }'
}
# steady ADDR PID…: refreshes per second and CPU µs per refresh over the window.
steady() {
  local addr=$1 from ticks0 ticks1 refreshes hz
  shift
  hz=$(getconf CLK_TCK)
  from=$(( $(log_lines) + 1 ))
  ticks0=$(cpu_ticks "$@")
  sleep "$window"
  ticks1=$(cpu_ticks "$@")
  refreshes=$(refreshes_from "$addr" "$from")
  awk -v r="$refreshes" -v t=$(( ticks1 - ticks0 )) -v hz="$hz" -v w="$window" \
    'BEGIN { printf "%.0f refreshes/s, %.0f µs CPU per refresh", r / w, (r ? t / hz * 1e6 / r : 0) }'
}

reg="127.0.0.1:$(udp_port 127.0.0.1)"
kamailio -f failover-tests/fixtures/kamailio-provider.cfg -l "udp:$reg" -DD -E -m 1024 -M 32 \
  -P "$work/registrar.pid" -Y "$work" > "$work/registrar.log" 2>&1 &
pids+=($!)
sleep 2
echo "$count provider accounts at one Kamailio registrar ($reg, 30 s bindings), $(nproc) cores shared"

# --- Tandem -----------------------------------------------------------------------------------
sip_port=$(udp_port 127.0.0.1)
admin="127.0.0.1:$(udp_port 127.0.0.1)"
mkdir -p "$work/tandem"
cat > "$work/tandem/tandem.toml" <<EOF
[node]
data_dir = "$work/tandem/data"
[sip]
udp = ["127.0.0.1:$sip_port"]
tcp = []
dns_servers = ["127.0.0.1:9"]
[admin]
listen = "$admin"
token_file = "$work/tandem/admin.token"
EOF
start_tandem() {
  "$TANDEM_BIN" run --config "$work/tandem/tandem.toml" >> "$work/tandem/node.log" 2>&1 &
  tandem_pid=$!
  node_pid=("$tandem_pid")
  until curl -sf "http://$admin/health" > /dev/null; do sleep 0.2; done
}
start_tandem
token=$(cat "$work/tandem/admin.token")
until curl -sf -H "Authorization: Bearer $token" "http://$admin/v1/cluster/status" \
  | grep -q '"feature_version":1'; do sleep 0.2; done
sleep 1
tandem_base=$(pss_kib "$tandem_pid")
curl -sf -X PUT -H "Authorization: Bearer $token" -d '{"name":"Bench"}' \
  "http://$admin/v1/customers/bench" > /dev/null
echo "creating $count provider accounts in Tandem ..." >&2
python3 - "$admin" "$token" "$count" "$reg" <<'PY'
import http.client, json, sys, threading
admin, token, count, reg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host, port = admin.split(":")
def work(start):
    c = http.client.HTTPConnection(host, int(port))
    for i in range(start, count, 8):
        body = json.dumps({"registrar": "kamailio.test", "outbound_proxy": reg,
                           "transport": "udp", "username": f"t{i}", "password": f"pw-t{i}",
                           "expires_secs": 60})
        c.request("PUT", f"/v1/providers/bench/t{i}", body,
                  {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status != 201:
            sys.exit(f"PUT t{i}: {r.status}")
threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
for t in threads: t.start()
for t in threads: t.join()
PY
# Restart: every account starts from nothing, as after an upgrade or a cluster restart.
kill -INT "$tandem_pid"; wait "$tandem_pid" 2>/dev/null || true
from=$(( $(log_lines) + 1 ))
t0=$(date +%s%N)
start_tandem
took=$(wait_all "127.0.0.1:$sip_port" "$from" "$t0")
sleep 5
tandem_pss=$(pss_kib "$tandem_pid")
echo "tandem   (1 node, start_spread_secs 10): all registered ${took} s after start; $(steady "127.0.0.1:$sip_port" "$tandem_pid"); $(( (tandem_pss - tandem_base) * 1024 / count )) bytes per account"
kill -INT "$tandem_pid"; wait "$tandem_pid" 2>/dev/null || true
node_pid=()

# --- Kamailio uac -----------------------------------------------------------------------------
kport=$(udp_port 127.0.0.1)
mkdir -p "$work/uac/db" "$work/uac/empty"
for d in db empty; do
  printf 'table_name(string) table_version(int)\nuacreg:5\n' > "$work/uac/$d/version"
  echo 'id(int,auto) l_uuid(string) l_username(string) l_domain(string) r_username(string) r_domain(string) realm(string) auth_username(string) auth_password(string) auth_ha1(string,null) auth_proxy(string) expires(int) flags(int) reg_delay(int) contact_addr(string,null) socket(string,null)' \
    > "$work/uac/$d/uacreg"
done
proxy="sip\\:${reg%:*}\\:${reg#*:}"
awk -v n="$count" -v p="$proxy" 'BEGIN { for (i = 0; i < n; i++)
  printf "%d:t%d:t%d:local.test:t%d:kamailio.test:kamailio.test:t%d:pw-t%d::%s:60:0:0::\n", i + 1, i, i, i, i, i, p }' \
  >> "$work/uac/db/uacreg"
start_uac() {
  cat > "$work/uac/uac.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=2
auto_aliases=no
disable_tcp=yes
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "db_text.so"
loadmodule "uac.so"
modparam("uac", "reg_db_url", "text://$work/uac/$1")
modparam("uac", "reg_contact_addr", "127.0.0.1:$kport")
modparam("uac", "reg_timer_interval", 1)
modparam("uac", "reg_retry_interval", 10)
modparam("uac", "auth_username_avp", "\$avp(auser)")
modparam("uac", "auth_password_avp", "\$avp(apass)")
modparam("uac", "auth_realm_avp", "\$avp(arealm)")
request_route {
    sl_send_reply("404", "Not Here");
}
EOF
  kamailio -f "$work/uac/uac.cfg" -l "udp:127.0.0.1:$kport" -DD -E -m 1024 -M 32 \
    -P "$work/uac/uac.pid" -Y "$work/uac" > "$work/uac/uac-$1.log" 2>&1 &
  uac_pid=$!
  pids+=("$uac_pid")
}
uac_pids() { echo "$uac_pid" $(pgrep -P "$uac_pid" || true); }
start_uac empty
sleep 3
uac_base=$(pss_kib $(uac_pids))
kill "$uac_pid"; wait "$uac_pid" 2>/dev/null || true
from=$(( $(log_lines) + 1 ))
t0=$(date +%s%N)
start_uac db
took=$(wait_all "127.0.0.1:$kport" "$from" "$t0")
sleep 5
uac_pss=$(pss_kib $(uac_pids))
echo "kamailio (uac, uacreg in db_text, reg_timer_interval 1): all registered ${took} s after start; $(steady "127.0.0.1:$kport" $(uac_pids)); $(( (uac_pss - uac_base) * 1024 / count )) bytes per account"
