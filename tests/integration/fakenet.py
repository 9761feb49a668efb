"""Servers of the fake internet, run as root inside the lab's "inet" namespace.

Subcommands (all bind everything first, then create the --ready file):

  dns --listen ADDR... --records FILE --log FILE --ready FILE [--rogue-a ADDR]
      Fake DNS server on UDP+TCP 53.  Without --rogue-a it answers from the
      JSON records file (re-read on every query; the lab replaces it with an
      atomic rename, so a reader never sees a half-written file).  With
      --rogue-a it answers every A query with that address (the "rogue
      resolver" the agent's resolv.conf points at).

  echo --log FILE --ready FILE [--tcp-port P...] [--udp-port P...]
      Line echo on TCP ports (dual stack), datagram echo on UDP ports.

Records file format:
  {"name.": [["A", "203.0.113.5", 60], ["CNAME", "x.test.", 60], ...],
   "__tc__": ["name.", ...],          # UDP answers get TC=1 and no records
   "__servfail__": ["name.", ...],    # answer SERVFAIL
   "__drop__": ["name.", ...],        # never answer (upstream timeout)
   "__delay__": {"name.": 1.5}}       # answer after a delay (seconds)
Names are case-insensitive; the trailing dot is optional.

Every received DNS query is appended to the log as one JSON line; so is
every accepted TCP connection / received UDP datagram of the echo server.
Uses dnslib (test venv); never run as the agent.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

ZONE_SOA = SOA("ns1.fake-root.", "hostmaster.fake-root.", (2024010101, 3600, 600, 86400, 30))
SOA_OWNER = "."
SOA_TTL = 30
MAX_CNAME_HOPS = 8


class JsonLog:
    """Append-only JSON-lines log; one write() per line so readers never see interleaving."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()


def norm(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def plain_ip(addr: str) -> str:
    """'::ffff:1.2.3.4' (dual-stack socket) -> '1.2.3.4'."""
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


# --------------------------------------------------------------------------- DNS


class Records:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        # Re-read on every query: the file is tiny and this makes lab.dns.set()
        # take effect for the very next query without any cache invalidation.
        try:
            raw = json.loads(Path(self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {}
        out: dict[str, Any] = {"__tc__": set(), "__servfail__": set(), "__drop__": set()}
        out["__delay__"] = {norm(k): float(v) for k, v in raw.get("__delay__", {}).items()}
        for flag in ("__tc__", "__servfail__", "__drop__"):
            out[flag] = {norm(n) for n in raw.get(flag, [])}
        recs: dict[str, list[list[Any]]] = {}
        for name, rrs in raw.items():
            if name.startswith("__"):
                continue
            recs.setdefault(norm(name), []).extend(rrs)
        out["records"] = recs
        return out


def make_rr(name: str, rtype: str, value: Any, ttl: int) -> RR:
    rtype = rtype.upper()
    if rtype == "TXT":
        return RR(name, QTYPE.TXT, ttl=int(ttl), rdata=TXT(str(value)))
    # dnslib's zone parser knows A/AAAA/CNAME/MX/NS/SRV/... in master-file syntax.
    return RR.fromZone(f"{name} {int(ttl)} IN {rtype} {value}")[0]


class DnsLogic:
    def __init__(self, records: Records | None, rogue_a: str | None, log: JsonLog) -> None:
        self.records = records
        self.rogue_a = rogue_a
        self.log = log

    def handle(self, data: bytes, transport: str, src: tuple[Any, ...], dst: str) -> bytes | None:
        entry: dict[str, Any] = {
            "transport": transport,
            "src": plain_ip(src[0]),
            "sport": src[1],
            "dst": dst,
            "ts": time.time(),
            "size": len(data),
        }
        try:
            req = DNSRecord.parse(data)
        except Exception as exc:  # malformed input is a legitimate test case
            entry.update(
                qname=None,
                qtype=None,
                error=f"parse: {exc}",
                has_edns=False,
                arcount=None,
                edns_options=[],
            )
            self.log.write(entry)
            return None
        opt = [rr for rr in req.ar if rr.rtype == QTYPE.OPT]
        entry.update(
            id=req.header.id,
            rd=bool(req.header.rd),
            qname=str(req.q.qname).lower() if req.questions else None,
            qtype=QTYPE.get(req.q.qtype) if req.questions else None,
            qdcount=len(req.questions),
            has_edns=bool(opt),
            arcount=len(req.ar),
            edns_udp_size=opt[0].rclass if opt else None,
            edns_do=bool(opt and (opt[0].ttl & 0x8000)),
            edns_options=[[o.code, o.data.hex()] for o in opt[0].rdata] if opt else [],
        )
        self.log.write(entry)
        if not req.questions:
            reply = req.reply()
            reply.header.rcode = RCODE.FORMERR
            return bytes(reply.pack())
        if self.rogue_a is not None:
            reply = self._rogue(req)
        else:
            assert self.records is not None
            db = self.records.load()
            qn = norm(str(req.q.qname))
            if qn in db["__drop__"]:
                return None
            if qn in db["__delay__"]:
                time.sleep(db["__delay__"][qn])
            if qn in db["__tc__"] and transport == "udp":
                reply = req.reply()
                reply.header.tc = 1
                if opt:
                    reply.add_ar(EDNS0(udp_len=1232))
                return bytes(reply.pack())
            if qn in db["__servfail__"]:
                reply = req.reply()
                reply.header.rcode = RCODE.SERVFAIL
            else:
                reply = self._auth(req, db["records"])
        if opt:
            reply.add_ar(EDNS0(udp_len=1232))
        wire: bytes = reply.pack()
        if transport == "udp":
            limit = max(512, opt[0].rclass) if opt else 512
            if len(wire) > limit:
                # Like a real server: drop the records, set TC, let the client retry over TCP.
                trunc = req.reply()
                trunc.header.tc = 1
                if opt:
                    trunc.add_ar(EDNS0(udp_len=1232))
                wire = trunc.pack()
        return wire

    def _rogue(self, req: DNSRecord) -> DNSRecord:
        reply = req.reply()
        if req.q.qtype == QTYPE.A:
            reply.add_answer(RR(req.q.qname, QTYPE.A, ttl=60, rdata=A(self.rogue_a or "")))
        else:
            reply.add_auth(RR(SOA_OWNER, QTYPE.SOA, ttl=SOA_TTL, rdata=ZONE_SOA))
        return reply

    def _auth(self, req: DNSRecord, recs: dict[str, list[list[Any]]]) -> DNSRecord:
        reply = req.reply()
        reply.header.ra = 1  # egressd treats us as a recursive upstream
        qtype = QTYPE.get(req.q.qtype)
        name = norm(str(req.q.qname))
        owner: Any = req.q.qname  # first owner keeps the query's spelling
        for _ in range(MAX_CNAME_HOPS):
            rrs = recs.get(name)
            if rrs is None:
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(RR(SOA_OWNER, QTYPE.SOA, ttl=SOA_TTL, rdata=ZONE_SOA))
                return reply
            cname = [r for r in rrs if r[0].upper() == "CNAME"]
            if cname and qtype != "CNAME":
                target = norm(str(cname[0][1]))
                reply.add_answer(make_rr(str(owner), "CNAME", target, cname[0][2]))
                name = owner = target
                continue
            matching = [r for r in rrs if qtype == "ANY" or r[0].upper() == qtype]
            for rtype, value, ttl in matching:
                reply.add_answer(make_rr(str(owner), rtype, value, ttl))
            if not matching:
                reply.add_auth(RR(SOA_OWNER, QTYPE.SOA, ttl=SOA_TTL, rdata=ZONE_SOA))
            return reply
        reply.header.rcode = RCODE.SERVFAIL  # CNAME loop
        return reply


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve_dns(args: argparse.Namespace) -> list[socketserver.BaseServer]:
    log = JsonLog(args.log)
    logic = DnsLogic(Records(args.records) if args.records else None, args.rogue_a, log)
    return [srv for addr in args.listen for srv in _dns_servers(addr, args.port, logic)]


def _dns_servers(addr: str, port: int, logic: DnsLogic) -> list[socketserver.BaseServer]:
    """UDP+TCP servers for one address (a function, so handlers close over *this* addr)."""
    fam = family_of(addr)
    dst = addr

    class Udp(socketserver.ThreadingUDPServer):
        address_family = fam
        allow_reuse_address = True
        daemon_threads = True

    class Tcp(socketserver.ThreadingTCPServer):
        address_family = fam
        allow_reuse_address = True
        daemon_threads = True

    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = logic.handle(data, "udp", self.client_address, dst)
            if out is not None:
                sock.sendto(out, self.client_address)

    class TcpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            conn.settimeout(15)
            try:
                while True:  # several queries per connection are allowed
                    hdr = _recv_exact(conn, 2)
                    if hdr is None:
                        return
                    msg = _recv_exact(conn, struct.unpack("!H", hdr)[0])
                    if msg is None:
                        return
                    out = logic.handle(msg, "tcp", self.client_address, dst)
                    if out is None:
                        return
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return

    return [Udp((addr, port), UdpHandler), Tcp((addr, port), TcpHandler)]


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# --------------------------------------------------------------------------- echo

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def serve_echo(args: argparse.Namespace) -> list[threading.Thread]:
    log = JsonLog(args.log)
    threads: list[threading.Thread] = []
    for port in args.tcp_port:
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # One dual-stack listener on [::] also takes IPv4 (seen as ::ffff:a.b.c.d).
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", port))
        ls.listen(512)
        threads.append(threading.Thread(target=_tcp_accept_loop, args=(ls, log), daemon=True))
    for port in args.udp_port:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s4.bind(("0.0.0.0", port))
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        # IPv6 refuses an IPV6_PKTINFO source that is only "local" through the AnyIP
        # route (EINVAL) unless the socket is freebind.
        s6.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        s6.bind(("::", port))
        for s in (s4, s6):
            threads.append(threading.Thread(target=_udp_loop, args=(s, log), daemon=True))
    return threads


def _tcp_accept_loop(ls: socket.socket, log: JsonLog) -> None:
    while True:
        conn, peer = ls.accept()
        threading.Thread(target=_tcp_echo, args=(conn, peer, log), daemon=True).start()


def _tcp_echo(conn: socket.socket, peer: tuple[Any, ...], log: JsonLog) -> None:
    local = conn.getsockname()
    log.write(
        {
            "event": "accept",
            "proto": "tcp",
            "src": plain_ip(peer[0]),
            "sport": peer[1],
            "dst": plain_ip(local[0]),
            "dport": local[1],
            "ts": time.time(),
        }
    )
    # Keep the connection open until the client closes it (hold tests rely on this).
    with conn, conn.makefile("rb") as rf:
        try:
            for line in rf:
                conn.sendall(line)
        except OSError:
            pass


def _udp_loop(s: socket.socket, log: JsonLog) -> None:
    v6 = s.family == socket.AF_INET6
    while True:
        data, anc, _flags, peer = s.recvmsg(65535, 256)
        dst = None
        for level, ctype, cdata in anc:
            if not v6 and level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                dst = socket.inet_ntop(socket.AF_INET, cdata[8:12])  # in_pktinfo.ipi_addr
            elif v6 and level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO:
                dst = socket.inet_ntop(socket.AF_INET6, cdata[:16])
        log.write(
            {
                "event": "datagram",
                "proto": "udp",
                "src": plain_ip(peer[0]),
                "sport": peer[1],
                "dst": dst,
                "dport": s.getsockname()[1],
                "size": len(data),
                "ts": time.time(),
            }
        )
        # Reply from the exact address the client targeted (AnyIP ranges), else a
        # connected client socket would discard the echo.
        anc_out = []
        if dst is not None and not v6:
            anc_out = [
                (
                    socket.IPPROTO_IP,
                    IP_PKTINFO,
                    struct.pack("=i4s4s", 0, socket.inet_pton(socket.AF_INET, dst), b"\0" * 4),
                )
            ]
        elif dst is not None:
            anc_out = [
                (
                    socket.IPPROTO_IPV6,
                    socket.IPV6_PKTINFO,
                    socket.inet_pton(socket.AF_INET6, dst) + struct.pack("=I", 0),
                )
            ]
        try:
            s.sendmsg([data], anc_out, 0, peer)
        except OSError as exc:
            print(f"udp echo reply to {peer} failed: {exc!r}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dns")
    d.add_argument("--listen", action="append", required=True)
    d.add_argument("--port", type=int, default=53)
    d.add_argument("--records")
    d.add_argument("--rogue-a")
    d.add_argument("--log", required=True)
    d.add_argument("--ready", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--tcp-port", type=int, action="append", default=[])
    e.add_argument("--udp-port", type=int, action="append", default=[])
    e.add_argument("--log", required=True)
    e.add_argument("--ready", required=True)
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.cmd == "dns":
        servers = serve_dns(args)
        for srv in servers:
            threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
            ).start()
    else:
        for t in serve_echo(args):
            t.start()
    Path(args.ready).write_text(str(os.getpid()))
    while True:  # threads do the work; stay alive until SIGTERM/SIGKILL
        select.select([], [], [], 3600)


if __name__ == "__main__":
    main()
