#!/usr/bin/env python3
"""The scanner of ops/bench/hostile.sh: hostile SIP traffic at fixed rates against one
server, from many loopback source addresses (Linux answers on all of 127.0.0.0/8 with no
setup), until SIGTERM or --seconds. Four kinds, each from its own pool of addresses, the
rate of each split evenly over its pool (round robin):

  register  password guessing: REGISTER for one of --users; the first from an address has
            no credentials, every later one carries MD5 (or SHA-256, as challenged)
            credentials with a wrong password on the last nonce that address was sent,
            nonce-count rising, as a guesser that keeps one nonce would;
  options   OPTIONS to the server itself, from a large pool (by default each address far
            under any per-address limit: the flood a per-address limit cannot see);
  invite    INVITEs to random numbers at the served domain or at the server's address,
            half claiming a local caller, half a foreign one; never ACKed;
  slow-tcp  TCP connections opened and held: half send nothing, half drip a REGISTER one
            byte every --drip-secs; one that the server closes is opened again a second
            later.

Beside the flood, a TCP probe (a legitimate client) connects from --probe-addr every
--probe-secs, sends one OPTIONS and waits up to 2 s for its 200: does a legitimate TCP
client still get in while the slow connections are held?

Every address used, sources and target, must be in 127.0.0.0/8: anything else is refused.
On exit it writes JSON to --stats: per kind what was sent, from how many addresses, and
the responses received by status code; for slow-tcp the connections opened, failed,
closed by the server and open at the end; for the probe, ok, failed and the latencies.
"""

import argparse
import hashlib
import ipaddress
import json
import os
import random
import resource
import selectors
import signal
import socket
import threading
import time
from collections import Counter

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def loopback(addr):
    if ipaddress.ip_address(addr) not in LOOPBACK:
        raise SystemExit(f"hostile-flood: {addr} is not a loopback address; refusing")
    return addr


def pool(start, n):
    """n addresses from start on, skipping those ending in .0 and .255."""
    out, x = [], int(ipaddress.IPv4Address(loopback(start)))
    while len(out) < n:
        if x & 0xFF not in (0, 255):
            out.append(loopback(str(ipaddress.IPv4Address(x))))
        x += 1
    return out


def hostport(s):
    host, port = s.rsplit(":", 1)
    return loopback(host), int(port)


def rand_token(n=10):
    return "%0*x" % (n, random.getrandbits(4 * n))


def status_of(data):
    # "SIP/2.0 401 Unauthorized" -> "401"; anything else (a request to us) -> "req"
    if data.startswith(b"SIP/2.0 "):
        return data[8:11].decode("ascii", "replace")
    return "req"


def header_param(header, name):
    i = header.find(name + "=")
    while i > 0 and header[i - 1] not in " ,":
        i = header.find(name + "=", i + 1)
    if i < 0:
        return None
    v = header[i + len(name) + 1 :]
    if v.startswith('"'):
        return v[1 : v.find('"', 1)]
    for sep in (",", " ", "\r"):
        j = v.find(sep)
        if j >= 0:
            v = v[:j]
    return v


class Kind:
    def __init__(self, name, rate, addrs):
        self.name, self.rate, self.addrs = name, rate, addrs
        self.socks = []
        self.state = {}  # register: fd -> challenge
        self.sent = 0
        self.behind = 0  # sends skipped because the generator fell more than 0.2 s behind
        self.answered = Counter()
        self.next = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--udp", required=True, help="server UDP address, host:port")
    ap.add_argument("--tcp", help="server TCP address, host:port (slow-tcp and the probe)")
    ap.add_argument("--domain", default="example.com")
    ap.add_argument("--users", default="100,1000,admin", help="accounts the guesser tries")
    ap.add_argument("--user-agent", default="hostile.sh")
    ap.add_argument("--register-rate", type=float, default=600)
    ap.add_argument("--register-addrs", type=int, default=4)
    ap.add_argument("--register-from", default="127.0.2.1")
    ap.add_argument("--options-rate", type=float, default=1000)
    ap.add_argument("--options-addrs", type=int, default=1000)
    ap.add_argument("--options-from", default="127.0.4.1")
    ap.add_argument("--invite-rate", type=float, default=800)
    ap.add_argument("--invite-addrs", type=int, default=4)
    ap.add_argument("--invite-from", default="127.0.3.1")
    ap.add_argument("--slow-tcp", type=int, default=1000, help="connections held")
    ap.add_argument("--slow-tcp-addrs", type=int, default=4)
    ap.add_argument("--slow-tcp-from", default="127.0.12.1")
    ap.add_argument("--drip-secs", type=float, default=1.0)
    ap.add_argument("--tcp-open-rate", type=float, default=500,
                    help="new connections a second at most (a faster burst overflows a listen backlog of 128)")
    ap.add_argument("--probe-addr", default="127.0.1.200")
    ap.add_argument("--probe-secs", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=600, help="stop after this long at most")
    ap.add_argument("--stats", required=True)
    a = ap.parse_args()

    udp_target = hostport(a.udp)
    tcp_target = hostport(a.tcp) if a.tcp else None
    users = a.users.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    sel = selectors.DefaultSelector()
    kinds = [
        Kind("register", a.register_rate, pool(a.register_from, a.register_addrs) if a.register_rate > 0 else []),
        Kind("options", a.options_rate, pool(a.options_from, a.options_addrs) if a.options_rate > 0 else []),
        Kind("invite", a.invite_rate, pool(a.invite_from, a.invite_addrs) if a.invite_rate > 0 else []),
    ]
    for k in kinds:
        for addr in k.addrs:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((addr, 0))
            s.setblocking(False)
            k.socks.append(s)
            sel.register(s, selectors.EVENT_READ, ("udp", k, s))

    target_uri = "%s:%d" % udp_target

    def register_msg(s, k):
        ip, port = s.getsockname()
        user = random.choice(users)
        ch = k.state.get(s.fileno())
        auth = ""
        if ch:
            ch["nc"] += 1
            alg = ch.get("algorithm") or "MD5"
            h = hashlib.sha256 if alg.upper().startswith("SHA-256") else hashlib.md5
            H = lambda x: h(x.encode()).hexdigest()
            uri = "sip:" + a.domain
            cnonce = rand_token(8)
            nc = "%08x" % ch["nc"]
            ha1 = H("%s:%s:%s" % (user, ch["realm"], "guess-" + rand_token(6)))
            ha2 = H("REGISTER:" + uri)
            resp = H(":".join([ha1, ch["nonce"], nc, cnonce, "auth", ha2]))
            auth = (
                'Authorization: Digest username="%s", realm="%s", nonce="%s", uri="%s", '
                'response="%s", algorithm=%s, cnonce="%s", qop=auth, nc=%s%s\r\n'
                % (user, ch["realm"], ch["nonce"], uri, resp, alg, cnonce, nc,
                   ', opaque="%s"' % ch["opaque"] if ch.get("opaque") else "")
            )
        return (
            "REGISTER sip:{d} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{b};rport\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:{u}@{d}>;tag={t}\r\n"
            "To: <sip:{u}@{d}>\r\n"
            "Call-ID: {c}@{ip}\r\n"
            "CSeq: 1 REGISTER\r\n"
            "Contact: <sip:{u}@{ip}:{port}>\r\n"
            "{auth}"
            "Expires: 300\r\n"
            "User-Agent: {ua}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).format(d=a.domain, ip=ip, port=port, b=rand_token(), u=user, t=rand_token(8),
                 c=rand_token(16), auth=auth, ua=a.user_agent).encode()

    def options_msg(s, k):
        ip, port = s.getsockname()
        return (
            "OPTIONS sip:{tg} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{b};rport\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:scan@{ip}>;tag={t}\r\n"
            "To: <sip:{tg}>\r\n"
            "Call-ID: {c}@{ip}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Accept: application/sdp\r\n"
            "User-Agent: {ua}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).format(tg=target_uri, ip=ip, port=port, b=rand_token(), t=rand_token(8),
                 c=rand_token(16), ua=a.user_agent).encode()

    def invite_msg(s, k):
        ip, port = s.getsockname()
        n = random.getrandbits(32)
        number = ("00" if n & 1 else "9011") + "".join(random.choice("0123456789") for _ in range(10))
        host = a.domain if n & 2 else target_uri
        caller = ("%d@%s" % (100 + n % 900, a.domain)) if n & 4 else ("%d@scanner.invalid" % (n % 1000))
        sdp = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
               "m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").format(ip=ip)
        return (
            "INVITE sip:{num}@{h} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{b};rport\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:{caller}>;tag={t}\r\n"
            "To: <sip:{num}@{h}>\r\n"
            "Call-ID: {c}@{ip}\r\n"
            "CSeq: 1 INVITE\r\n"
            "Contact: <sip:{cu}@{ip}:{port}>\r\n"
            "User-Agent: {ua}\r\n"
            "Content-Type: application/sdp\r\n"
            "Content-Length: {n}\r\n\r\n{sdp}"
        ).format(num=number, h=host, ip=ip, port=port, b=rand_token(), caller=caller,
                 cu=caller.split("@")[0], t=rand_token(8), c=rand_token(16),
                 ua=a.user_agent, n=len(sdp), sdp=sdp).encode()

    builders = {"register": register_msg, "options": options_msg, "invite": invite_msg}

    # --- slow TCP ---------------------------------------------------------------------
    tcp = {"target": a.slow_tcp if tcp_target else 0, "attempts": 0, "opened": 0, "failed": 0,
           "closed_by_server": 0, "open_max": 0, "bytes_dripped": 0}
    drip_text = (
        "REGISTER sip:%s SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKslow\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:slow@%s>;tag=slow\r\nTo: <sip:slow@%s>\r\n"
        "Call-ID: slow\r\nCSeq: 1 REGISTER\r\nUser-Agent: %s\r\nContent-Length: 0\r\n\r\n"
        % (a.domain, a.domain, a.domain, a.user_agent)).encode()
    slots = []  # per slot: dict(addr, sock, state, drip, pos, reopen_at)
    if tcp_target and a.slow_tcp > 0:
        addrs = pool(a.slow_tcp_from, a.slow_tcp_addrs)
        for i in range(a.slow_tcp):
            slots.append({"addr": addrs[i % len(addrs)], "sock": None, "state": "idle",
                          "drip": i % 2 == 1, "pos": 0, "reopen_at": 0.0})

    def tcp_close(slot, by_server):
        s = slot["sock"]
        if s is not None:
            try:
                sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        if by_server:
            tcp["closed_by_server"] += 1
        slot["sock"], slot["state"], slot["pos"] = None, "idle", 0
        slot["reopen_at"] = time.monotonic() + 1.0

    def tcp_open(slot):
        tcp["attempts"] += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((slot["addr"], 0))
            err = s.connect_ex(tcp_target)
        except OSError:
            s.close()
            tcp["failed"] += 1
            slot["reopen_at"] = time.monotonic() + 1.0
            return
        if err not in (0, 115):  # EINPROGRESS
            s.close()
            tcp["failed"] += 1
            slot["reopen_at"] = time.monotonic() + 1.0
            return
        slot["sock"], slot["state"] = s, "connecting"
        sel.register(s, selectors.EVENT_WRITE, ("tcp", slot, s))

    # --- the TCP probe (a legitimate client), in its own thread -------------------------
    probe = {"ok": 0, "failed": 0, "ms": [], "errors": Counter()}

    def prober():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(2.0)
                    s.bind((loopback(a.probe_addr), 0))
                    s.connect(tcp_target)
                    ip, port = s.getsockname()
                    s.sendall((
                        "OPTIONS sip:{tg} SIP/2.0\r\nVia: SIP/2.0/TCP {ip}:{port};branch=z9hG4bK{b}\r\n"
                        "Max-Forwards: 70\r\nFrom: <sip:probe@{ip}>;tag={t}\r\nTo: <sip:{tg}>\r\n"
                        "Call-ID: {c}@{ip}\r\nCSeq: 1 OPTIONS\r\nUser-Agent: probe\r\n"
                        "Content-Length: 0\r\n\r\n").format(
                            tg="%s:%d" % tcp_target, ip=ip, port=port, b=rand_token(),
                            t=rand_token(8), c=rand_token(16)).encode())
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        d = s.recv(4096)
                        if not d:
                            raise ConnectionError("closed")
                        buf += d
                    if buf.startswith(b"SIP/2.0 200"):
                        probe["ok"] += 1
                        probe["ms"].append((time.monotonic() - t0) * 1000)
                    else:
                        probe["failed"] += 1
                        probe["errors"][status_of(buf)] += 1
            except Exception as e:  # noqa: BLE001 - every failure is a failed probe
                probe["failed"] += 1
                probe["errors"][type(e).__name__] += 1
            stop.wait(max(0.0, a.probe_secs - (time.monotonic() - t0)))

    threads = []
    if tcp_target and a.probe_secs > 0:
        threads.append(threading.Thread(target=prober, daemon=True))
    for t in threads:
        t.start()

    # --- the loop ---------------------------------------------------------------------
    t0 = time.monotonic()
    next_drip = t0 + a.drip_secs
    cpu0 = os.times()
    while not stop.is_set():
        now = time.monotonic()
        if now - t0 > a.seconds:
            break
        for key, _ in sel.select(0.002):
            what, obj, s = key.data
            if what == "udp":
                k = obj
                while True:
                    try:
                        data = s.recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    code = status_of(data)
                    k.answered[code] += 1
                    if k.name == "register" and code in ("401", "407"):
                        text = data.decode("latin-1")
                        for line in text.split("\r\n"):
                            if line.lower().startswith(("www-authenticate:", "proxy-authenticate:")):
                                nonce = header_param(line, "nonce")
                                if nonce:
                                    k.state[s.fileno()] = {
                                        "nonce": nonce, "nc": 0,
                                        "realm": header_param(line, "realm") or a.domain,
                                        "opaque": header_param(line, "opaque"),
                                        "algorithm": header_param(line, "algorithm"),
                                    }
                                break
            else:
                slot = obj
                if slot["state"] == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        tcp["failed"] += 1
                        tcp_close(slot, False)
                        continue
                    slot["state"] = "open"
                    tcp["opened"] += 1
                    sel.modify(s, selectors.EVENT_READ, key.data)
                else:
                    try:
                        d = s.recv(65535)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        d = b""
                    if not d:
                        tcp_close(slot, True)
        now = time.monotonic()
        # UDP sends due, each kind round robin over its addresses.
        for k in kinds:
            if not k.socks:
                continue
            due = int(k.rate * (now - t0)) - k.sent - k.behind
            cap = max(1, int(k.rate * 0.2))
            if due > cap:
                k.behind += due - cap
                due = cap
            build = builders[k.name]
            for _ in range(due):
                s = k.socks[k.next]
                k.next = (k.next + 1) % len(k.socks)
                try:
                    s.sendto(build(s, k), udp_target)
                except (BlockingIOError, InterruptedError):
                    k.behind += 1
                    continue
                except OSError:
                    k.behind += 1
                    continue
                k.sent += 1
        # Slow TCP: open idle slots (at most 100 at a time), drip.
        if slots:
            allowed = int(a.tcp_open_rate * (now - t0)) + 1 - tcp["attempts"]
            for slot in slots:
                if allowed <= 0:
                    break
                if slot["state"] == "idle" and slot["reopen_at"] <= now:
                    tcp_open(slot)
                    allowed -= 1
            if now >= next_drip:
                next_drip += a.drip_secs
                for slot in slots:
                    if slot["drip"] and slot["state"] == "open":
                        b = drip_text[slot["pos"] % len(drip_text)]
                        try:
                            slot["sock"].send(bytes([b]))
                            slot["pos"] += 1
                            tcp["bytes_dripped"] += 1
                        except (BlockingIOError, InterruptedError):
                            pass
                        except OSError:
                            tcp_close(slot, True)
            tcp["open_max"] = max(tcp["open_max"], sum(1 for x in slots if x["state"] == "open"))

    elapsed = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(timeout=3)
    cpu1 = os.times()
    tcp["open_at_end"] = sum(1 for x in slots if x["state"] == "open")
    ms = sorted(probe["ms"])
    q = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None
    out = {
        "seconds": round(elapsed, 2),
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
        "udp": {k.name: {"rate": k.rate, "addrs": len(k.addrs), "sent": k.sent, "behind": k.behind,
                         "answered": dict(k.answered)} for k in kinds},
        "slow_tcp": tcp,
        "tcp_probe": {"ok": probe["ok"], "failed": probe["failed"], "p50_ms": q(0.5),
                      "max_ms": round(ms[-1], 1) if ms else None, "errors": dict(probe["errors"])},
    }
    with open(a.stats, "w") as f:
        json.dump(out, f)
    for slot in slots:
        if slot["sock"] is not None:
            slot["sock"].close()


if __name__ == "__main__":
    main()
