"""The "AI agent" side of the integration lab.

Runs as the unprivileged agent uid inside the lab's host namespace, as
``/usr/bin/python3 -I -c <this source> COMMAND ARGS...`` — stdlib only, and it
must not need to read any file (the agent uid cannot read /root or pytest's
temp dirs).  Prints exactly one JSON object on stdout.

Commands (optional ``--key=value`` flags may appear anywhere):
  resolve NAME [4|6|any]
  dnsq SERVER PORT NAME TYPE udp|tcp [--edns] [--do] [--opt=CODE:HEX]... [--timeout=S]
  dnsraw SERVER PORT HEX udp|tcp [--timeout=S]
  connect IP PORT [TIMEOUT]
  hold IP PORT SECONDS [TIMEOUT]
  udp IP PORT [TIMEOUT]
  udpfrom SPORT IP PORT PAYLOAD [TIMEOUT]   (a datagram from a fixed source port)
  serve PORT SECONDS                        (TCP server greeting each client "hello")
  many JSON_LIST|- [--port=80] [--timeout=3] [--workers=16] [--family=4|6]
  probe SECONDS PORT IP [IP...] [--interval=0.02] [--timeout=0.5]
  tcphold SERVER PORT IDLE TRICKLE NAME [--settle=1] [--timeout=1]
      (hold IDLE + TRICKLE TCP connections, then one timed TCP query for NAME)
  udpflood SERVER PORT RATE SECONDS SUFFIX   (random-label A queries, replies counted)
  udpbench SERVER PORT SECONDS NAME [NAME...] [--interval=0.05] [--timeout=1]
      (one UDP query at a time, names in turn; latencies in ms)
  whoami

Failures are reported as {"ok": false, "error": KIND, "errno": N|None,
"errname": "ECONNREFUSED"|None, "text": str(exc), "elapsed": s} with KIND one
of refused / reset / timeout / unreachable / other.  A locally dropped packet
(iptables OUTPUT DROP) shows up as errname EPERM with kind "other".
"""

import concurrent.futures
import contextlib
import errno
import json
import os
import random
import socket
import struct
import sys
import time

TYPES = {
    "A": 1,
    "NS": 2,
    "CNAME": 5,
    "SOA": 6,
    "PTR": 12,
    "MX": 15,
    "TXT": 16,
    "AAAA": 28,
    "SRV": 33,
    "OPT": 41,
    "SVCB": 64,
    "HTTPS": 65,
    "ANY": 255,
}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
RCODES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    16: "BADVERS",
}


def type_name(code):
    return TYPE_NAMES.get(code, f"TYPE{code}")


def rcode_name(code):
    return RCODES.get(code, f"RCODE{code}")


KIND_BY_ERRNO = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EACCES: "unreachable",  # ICMPv6 "administratively prohibited"
}


def error(exc, start, **extra):
    if isinstance(exc, (socket.timeout, TimeoutError)) and not getattr(exc, "errno", None):
        kind, num = "timeout", None
    else:
        num = getattr(exc, "errno", None)
        kind = KIND_BY_ERRNO.get(num, "other")
    out = {
        "ok": False,
        "error": kind,
        "errno": num,
        "errname": errno.errorcode.get(num) if num else None,
        "text": f"{type(exc).__name__}: {exc}",
        "elapsed": round(time.monotonic() - start, 4),
    }
    out.update(extra)
    return out


def split_flags(argv):
    pos, flags = [], {}
    for a in argv:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            flags.setdefault(k, []).append(v)
        else:
            pos.append(a)
    return pos, flags


def flag(flags, name, default):
    return flags[name][-1] if name in flags else default


def family_of(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


# --------------------------------------------------------------------------- resolve

GAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def cmd_resolve(name, fam="any"):
    fam = fam.removeprefix("family")  # "family4" == "4"
    family = {
        "4": socket.AF_INET,
        "inet": socket.AF_INET,
        "6": socket.AF_INET6,
        "inet6": socket.AF_INET6,
        "any": socket.AF_UNSPEC,
    }[fam]
    start = time.monotonic()
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return {
            "ok": False,
            "addrs": [],
            "gaierror": GAI_NAMES.get(exc.errno, str(exc.errno)),
            "errno": exc.errno,
            "text": str(exc),
            "elapsed": round(time.monotonic() - start, 4),
        }
    addrs = []
    for info in infos:
        if info[4][0] not in addrs:
            addrs.append(info[4][0])
    return {
        "ok": bool(addrs),
        "addrs": addrs,
        "gaierror": None,
        "elapsed": round(time.monotonic() - start, 4),
    }


# --------------------------------------------------------------------------- DNS wire


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("idna" if not label.isascii() else "ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def build_query(name, qtype, edns=False, do=False, options=()):
    qid = random.randint(0, 0xFFFF)
    qt = TYPES[qtype.upper()] if not qtype.isdigit() else int(qtype)
    arcount = 1 if (edns or do or options) else 0
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, arcount)  # RD=1
    msg += encode_name(name) + struct.pack("!HH", qt, 1)
    if arcount:
        rdata = b"".join(struct.pack("!HH", c, len(d)) + d for c, d in options)
        msg += b"\0" + struct.pack("!HHIH", 41, 1232, 0x8000 if do else 0, len(rdata)) + rdata
    return qid, msg


def decode_name(msg, off):
    labels, jumped, end, hops = [], False, off, 0
    while True:
        n = msg[off]
        if n & 0xC0 == 0xC0:
            ptr = struct.unpack("!H", msg[off : off + 2])[0] & 0x3FFF
            if not jumped:
                end = off + 2
            jumped, off, hops = True, ptr, hops + 1
            if hops > 64:
                raise ValueError("compression loop")
            continue
        off += 1
        if n == 0:
            break
        labels.append(msg[off : off + n].decode("ascii", "replace"))
        off += n
    return ".".join(labels) + ".", (end if jumped else off)


def decode_rdata(msg, rtype, off, rdlen):
    rd = msg[off : off + rdlen]
    if rtype == 1 and rdlen == 4:
        return socket.inet_ntop(socket.AF_INET, rd)
    if rtype == 28 and rdlen == 16:
        return socket.inet_ntop(socket.AF_INET6, rd)
    if rtype in (2, 5, 12, 39):
        return decode_name(msg, off)[0]
    if rtype == 15:
        return f"{struct.unpack('!H', rd[:2])[0]} {decode_name(msg, off + 2)[0]}"
    if rtype == 16:
        parts, i = [], 0
        while i < len(rd):
            parts.append(rd[i + 1 : i + 1 + rd[i]].decode("utf-8", "replace"))
            i += 1 + rd[i]
        return "".join(parts)
    if rtype == 6:
        mname, o = decode_name(msg, off)
        rname, o = decode_name(msg, o)
        nums = struct.unpack("!IIIII", msg[o : o + 20])
        return " ".join([mname, rname] + [str(x) for x in nums])
    return rd.hex()


def parse_response(msg):
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    questions = []
    for _ in range(qd):
        name, off = decode_name(msg, off)
        qt, _qc = struct.unpack("!HH", msg[off : off + 4])
        off += 4
        questions.append([name, type_name(qt)])
    sections = {"answers": [], "authority": [], "additional": []}
    edns = None
    for sect, count in (("answers", an), ("authority", ns), ("additional", ar)):
        for _ in range(count):
            name, off = decode_name(msg, off)
            rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", msg[off : off + 10])
            off += 10
            if rtype == 41:
                opts, i, rd = [], 0, msg[off : off + rdlen]
                while i + 4 <= len(rd):
                    code, olen = struct.unpack("!HH", rd[i : i + 4])
                    opts.append((code, rd[i + 4 : i + 4 + olen]))
                    i += 4 + olen
                edns = {
                    "udp_size": rclass,
                    "ext_rcode": ttl >> 24,
                    "version": (ttl >> 16) & 0xFF,
                    "do": bool(ttl & 0x8000),
                    "options": opts,
                }
            else:
                sections[sect].append(
                    [name, type_name(rtype), decode_rdata(msg, rtype, off, rdlen), ttl]
                )
            off += rdlen
    rcode = (flags & 0xF) | ((edns["ext_rcode"] << 4) if edns else 0)
    ede = []
    if edns:
        for code, data in edns["options"]:
            if code == 15 and len(data) >= 2:  # RFC 8914 Extended DNS Error
                ede.append([struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8", "replace")])
    out = {
        "id": qid,
        "rcode": rcode_name(rcode),
        "rcode_num": rcode,
        "qr": bool(flags & 0x8000),
        "aa": bool(flags & 0x0400),
        "tc": bool(flags & 0x0200),
        "rd": bool(flags & 0x0100),
        "ra": bool(flags & 0x0080),
        "questions": questions,
        "ede": ede,
        "edns": None,
    }
    out.update(sections)
    if edns:
        out["edns"] = {
            "udp_size": edns["udp_size"],
            "version": edns["version"],
            "do": edns["do"],
            "options": [[c, d.hex()] for c, d in edns["options"]],
        }
    return out


def exchange(server, port, wire, proto, timeout, sport=0):
    """Send one DNS message, return the raw response (raises OSError/timeout).

    sport: a fixed UDP source port (bound with SO_REUSEADDR), e.g. the port of a flow
    somebody else opened.
    """
    fam = family_of(server)
    if proto == "udp":
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            if sport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
            s.connect((server, port))  # connected: ICMP errors surface as exceptions
            s.send(wire)
            return s.recv(65535)
    with socket.create_connection((server, port), timeout=timeout) as s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        hdr = recv_exact(s, 2)
        return recv_exact(s, struct.unpack("!H", hdr)[0])


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed mid-message")
        buf += chunk
    return buf


def cmd_dnsq(server, port, name, qtype, proto, flags):
    timeout = float(flag(flags, "timeout", "5"))
    options = []
    for o in flags.get("opt", []):
        code, _, hexdata = o.partition(":")
        options.append((int(code), bytes.fromhex(hexdata)))
    qid, wire = build_query(name, qtype, "edns" in flags, "do" in flags, options)
    start = time.monotonic()
    try:
        resp = exchange(server, int(port), wire, proto, timeout, int(flag(flags, "sport", "0")))
    except (TimeoutError, OSError) as exc:
        return error(exc, start, transport=proto)
    elapsed = round(time.monotonic() - start, 4)
    try:
        out = parse_response(resp)
    except Exception as exc:  # noqa: BLE001 - report garbage instead of crashing
        return {
            "ok": False,
            "error": "other",
            "errno": None,
            "errname": None,
            "text": f"unparsable response: {exc!r}",
            "response_hex": resp.hex(),
            "elapsed": elapsed,
        }
    out.update(ok=True, id_match=out["id"] == qid, transport=proto, elapsed=elapsed)
    return out


def cmd_dnsraw(server, port, hexwire, proto, flags):
    timeout = float(flag(flags, "timeout", "5"))
    start = time.monotonic()
    try:
        resp = exchange(server, int(port), bytes.fromhex(hexwire), proto, timeout)
    except (TimeoutError, OSError) as exc:
        return error(exc, start, transport=proto)
    out = {
        "ok": True,
        "response_hex": resp.hex(),
        "elapsed": round(time.monotonic() - start, 4),
        "rcode": None,
        "rcode_num": None,
        "tc": None,
    }
    if len(resp) >= 12:
        fl = struct.unpack("!H", resp[2:4])[0]
        out.update(
            rcode=rcode_name(fl & 0xF),
            rcode_num=fl & 0xF,
            tc=bool(fl & 0x0200),
            id=struct.unpack("!H", resp[:2])[0],
        )
    return out


# --------------------------------------------------------------------------- TCP / UDP


def readline(s, limit=4096):
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed before echo")
        buf += chunk
    return buf


def cmd_connect(ip, port, timeout="5"):
    start = time.monotonic()
    try:
        with socket.create_connection((ip, int(port)), timeout=float(timeout)) as s:
            connected = round(time.monotonic() - start, 4)
            s.sendall(b"ping\n")
            echo = readline(s)
    except (TimeoutError, OSError) as exc:
        return error(exc, start)
    return {
        "ok": echo == b"ping\n",
        "echo": echo.decode("utf-8", "replace"),
        "connect_elapsed": connected,
        "elapsed": round(time.monotonic() - start, 4),
    }


def cmd_hold(ip, port, seconds, timeout="5"):
    start = time.monotonic()
    stage = "connect"
    try:
        with socket.create_connection((ip, int(port)), timeout=float(timeout)) as s:
            stage = "ping1"
            s.sendall(b"ping1\n")
            if readline(s) != b"ping1\n":
                raise OSError("bad echo for ping1")
            time.sleep(float(seconds))
            stage = "ping2"
            s.sendall(b"ping2\n")
            if readline(s) != b"ping2\n":
                raise OSError("bad echo for ping2")
    except (TimeoutError, OSError) as exc:
        return error(exc, start, stage=stage)
    return {"ok": True, "stage": "done", "elapsed": round(time.monotonic() - start, 4)}


def cmd_udp(ip, port, timeout="3"):
    start = time.monotonic()
    payload = b"udp-ping-%d" % random.randint(0, 1 << 30)
    try:
        with socket.socket(family_of(ip), socket.SOCK_DGRAM) as s:
            s.settimeout(float(timeout))
            s.connect((ip, int(port)))
            s.send(payload)
            data = s.recv(65535)
    except (TimeoutError, OSError) as exc:
        return error(exc, start)
    return {"ok": data == payload, "elapsed": round(time.monotonic() - start, 4)}


def cmd_udpfrom(sport, ip, port, payload, timeout="2"):
    """One datagram from a fixed source port (SO_REUSEADDR), then wait for a reply."""
    start = time.monotonic()
    fam = family_of(ip)
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sport)))
            s.settimeout(float(timeout))
            s.connect((ip, int(port)))
            s.send(payload.encode())
            data = s.recv(65535)
    except (TimeoutError, OSError) as exc:
        return error(exc, start)
    return {"ok": data == payload.encode(), "elapsed": round(time.monotonic() - start, 4)}


def cmd_serve(port, seconds, ready_file="-"):
    """Listen on TCP PORT (IPv4 and IPv6) for SECONDS; greet each client with b"hello\\n"."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(port)))
    s.listen(16)
    s.settimeout(0.2)
    sys.stderr.write("listening\n")
    sys.stderr.flush()
    accepted, sent = [], []
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        try:
            conn, peer = s.accept()
        except TimeoutError:
            continue
        accepted.append(peer[0])
        try:
            conn.settimeout(1)
            conn.sendall(b"hello\n")
            sent.append(peer[0])
        except OSError:
            pass
        finally:
            conn.close()
    s.close()
    return {"ok": True, "accepted": accepted, "sent": sent}


# --------------------------------------------------------------------------- many


def one_of_many(name, port, timeout, family):
    start = time.monotonic()
    res = cmd_resolve(name, family)
    out = {
        "name": name,
        "resolve_ok": res["ok"],
        "addrs": res["addrs"],
        "gaierror": res.get("gaierror"),
        "resolve_elapsed": res["elapsed"],
    }
    if not res["ok"]:
        out.update(ok=False, connect=None, elapsed=round(time.monotonic() - start, 4))
        return out
    # Connect immediately: this is the race egressd must win (ipset filled
    # before the DNS answer is released to the agent).
    conn = cmd_connect(res["addrs"][0], port, timeout)
    out.update(ok=conn["ok"], connect=conn, elapsed=round(time.monotonic() - start, 4))
    return out


def cmd_many(source, flags):
    names = json.loads(sys.stdin.read() if source == "-" else source)
    port = flag(flags, "port", "80")
    timeout = flag(flags, "timeout", "3")
    workers = int(flag(flags, "workers", "16"))
    family = flag(flags, "family", "4")
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda n: one_of_many(n, port, timeout, family), names))
    n_ok = sum(1 for r in results if r["ok"])
    return {
        "ok": n_ok == len(results),
        "n_ok": n_ok,
        "n_fail": len(results) - n_ok,
        "results": results,
        "elapsed": round(time.monotonic() - start, 4),
    }


# --------------------------------------------------------------------------- probe


def cmd_probe(seconds, port, ips, flags):
    """Connect to each IP in turn, every `interval`, for `seconds`: when did one get through?

    One process for the whole run, so a probe costs a connect(), not a Python start.
    """
    interval = float(flag(flags, "interval", "0.02"))
    timeout = float(flag(flags, "timeout", "0.5"))
    start = time.time()
    deadline = time.monotonic() + float(seconds)
    successes, errors, attempts = [], {}, 0
    while time.monotonic() < deadline:
        for ip in ips:
            attempts += 1
            t = time.time()
            try:
                with socket.create_connection((ip, int(port)), timeout=timeout):
                    successes.append([ip, round(t, 4)])
            except (TimeoutError, OSError) as exc:
                kind = error(exc, time.monotonic())["error"]
                errors[kind] = errors.get(kind, 0) + 1
        time.sleep(interval)
    return {
        "ok": True,
        "attempts": attempts,
        "successes": successes,
        "errors": errors,
        "started": round(start, 4),
        "ended": round(time.time(), 4),
    }


# --------------------------------------------------------------------------- starvation


def server_closed(s):
    """True when the server has closed this connection (EOF or reset); never blocks."""
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def cmd_tcphold(server, port, n_idle, n_trickle, name, flags):
    """Open idle and trickling TCP connections, count the ones still open, then time a query.

    A trickling connection announces a 512-byte message and sends one byte of it every
    0.2 s (a slot held by a client that is never quite idle).
    """
    settle = float(flag(flags, "settle", "1"))
    timeout = float(flag(flags, "timeout", "1"))
    conns, trickling, failed = [], [], {}
    start = time.monotonic()
    for i in range(int(n_idle) + int(n_trickle)):
        try:
            s = socket.create_connection((server, int(port)), timeout=5)
        except OSError as exc:
            kind = error(exc, start)["error"]
            failed[kind] = failed.get(kind, 0) + 1
            continue
        s.setblocking(False)
        conns.append(s)
        if i >= int(n_idle):
            s.send(struct.pack("!H", 512))
            trickling.append(s)
    opened = time.monotonic() - start

    def trickle(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for s in trickling:
                with contextlib.suppress(OSError):
                    s.send(b"\0")
            time.sleep(0.2)

    trickle(settle)  # the server accepts (and evicts) at its pace; then count
    open_before = [i for i, s in enumerate(conns) if not server_closed(s)]
    qid, wire = build_query(name, "A")
    t = time.monotonic()
    try:
        resp = exchange(server, int(port), wire, "tcp", timeout)
        query = parse_response(resp)
        query.update(ok=True, id_match=query["id"] == qid)
    except (TimeoutError, OSError) as exc:
        query = error(exc, t)
    query["elapsed"] = round(time.monotonic() - t, 4)
    trickle(0.3)
    open_after = [i for i, s in enumerate(conns) if not server_closed(s)]
    for s in conns:
        s.close()
    return {
        "ok": True,
        "connected": len(conns),
        "connect_failed": failed,
        "open_seconds": round(opened, 3),
        "open_before": len(open_before),
        "first_open_before": open_before[0] if open_before else None,
        "open_after": len(open_after),
        "query": query,
    }


def cmd_udpflood(server, port, rate, seconds, suffix):
    """A-queries for random names under SUFFIX at RATE per second from one socket."""
    rate, seconds = float(rate), float(seconds)
    tail = encode_name(suffix)
    s = socket.socket(family_of(server), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.connect((server, int(port)))
    s.setblocking(False)
    sent = got = send_errors = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int((now - start) * rate), int(rate * seconds))
        while sent < due:
            label = b"%012x" % random.getrandbits(48)
            head = struct.pack("!HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0)
            try:
                s.send(head + bytes([len(label)]) + label + tail + b"\0\x01\0\x01")
            except BlockingIOError:
                send_errors += 1
            sent += 1
        try:
            while True:
                s.recv(4096)
                got += 1
        except BlockingIOError:
            pass
        except OSError:
            send_errors += 1
        time.sleep(0.001)
    time.sleep(0.3)  # the last replies
    try:
        while True:
            s.recv(4096)
            got += 1
    except OSError:
        pass
    s.close()
    elapsed = time.monotonic() - start
    return {
        "ok": True,
        "sent": sent,
        "answered": got,
        "send_errors": send_errors,
        "seconds": round(elapsed, 3),
        "rate_sent": round(sent / seconds),
    }


def cmd_udpbench(server, port, seconds, names, flags):
    """One UDP query at a time for `seconds`; a lost or late reply counts as `timeout` ms."""
    interval = float(flag(flags, "interval", "0.05"))
    timeout = float(flag(flags, "timeout", "1"))
    lat, lost, rcodes = [], 0, {}
    end = time.monotonic() + float(seconds)
    i = 0
    # One socket (one source port, one flow) for the whole run, as stub resolvers that keep
    # a socket do. A new random port per query could land on a port another user's flow
    # to the same server used moments ago: egressd then (rightly) rejects it as that
    # user's flow, which is not what this probe measures.
    s = socket.socket(family_of(server), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((server, int(port)))
    while time.monotonic() < end:
        name = names[i % len(names)]
        i += 1
        qid, wire = build_query(name, "A")
        t = time.monotonic()
        try:
            s.send(wire)
            while True:  # skip a stray reply (a late one to an earlier query)
                resp = s.recv(65535)
                if struct.unpack("!H", resp[:2])[0] == qid:
                    break
            rc = rcode_name(struct.unpack("!H", resp[2:4])[0] & 0xF)
            rcodes[rc] = rcodes.get(rc, 0) + 1
            lat.append(round((time.monotonic() - t) * 1000, 2))
        except (TimeoutError, OSError):
            lost += 1
            lat.append(round(timeout * 1000, 2))
        time.sleep(interval)
    s.close()
    ordered = sorted(lat)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

    return {
        "ok": True,
        "n": len(lat),
        "lost": lost,
        "rcodes": rcodes,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] if ordered else None,
    }


def main(argv):
    pos, flags = split_flags(argv)
    if not pos:
        raise SystemExit("usage: agent COMMAND ARGS...")
    cmd, args = pos[0], pos[1:]
    if cmd == "resolve":
        out = cmd_resolve(*args)
    elif cmd == "dnsq":
        out = cmd_dnsq(*args, flags=flags)
    elif cmd == "dnsraw":
        out = cmd_dnsraw(*args, flags=flags)
    elif cmd == "connect":
        out = cmd_connect(*args)
    elif cmd == "hold":
        out = cmd_hold(*args)
    elif cmd == "udp":
        out = cmd_udp(*args)
    elif cmd == "udpfrom":
        out = cmd_udpfrom(*args)
    elif cmd == "serve":
        out = cmd_serve(*args)
    elif cmd == "many":
        out = cmd_many(args[0], flags)
    elif cmd == "probe":
        out = cmd_probe(args[0], args[1], args[2:], flags)
    elif cmd == "tcphold":
        out = cmd_tcphold(*args, flags=flags)
    elif cmd == "udpflood":
        out = cmd_udpflood(*args)
    elif cmd == "udpbench":
        out = cmd_udpbench(args[0], args[1], args[2], args[3:], flags)
    elif cmd == "whoami":
        with open("/proc/self/status") as fh:
            caps = dict(line.split(":\t", 1) for line in fh if line.startswith("Cap"))
        out = {
            "ok": True,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "groups": os.getgroups(),
            "euid": os.geteuid(),
            "capeff": caps["CapEff"].strip(),
            "capprm": caps["CapPrm"].strip(),
        }
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
