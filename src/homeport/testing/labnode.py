"""Programs the NAT lab runs inside its namespaces (``python -m homeport.testing.labnode``).

A test process cannot open sockets in another network namespace, so each lab
role runs as a small process there:

* ``whoami PORT [PORT...]`` — a test-only whoami responder (the "server" on two
  ports); prints ``ready`` once listening.
* ``natpmp-gw --ext-ip IP --lan-if IF`` — a stand-in NAT-PMP gateway for a lab
  router: answers public-address and TCP map requests by adding an iptables DNAT
  rule (answers PCP with NAT-PMP "unsupported version", exercising the fallback).
* ``stun IP1 IP2 PORT1 PORT2`` — a classic STUN responder (RFC 3489 CHANGE-REQUEST),
  which miniupnpd uses to accept a TEST-NET WAN address as public.
* ``discover --port P --main IP:PORT [--probe IP:PORT] [--no-portmap]`` — run
  :func:`homeport.io.netcheck.netcheck` from P; prints JSON observations,
  verdict and candidates.
* ``punch --port P --cands JSON --deadline S --name N`` — punch, then exchange
  names over the winner; prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time

from homeport.io.netcheck import netcheck
from homeport.io.punch import DirectPort, PunchFailure, punch
from homeport.proto.natcheck import Candidate, candidates, classify_nat
from homeport.wire import natpmp, probe
from homeport.wire.errors import WireError

#: Seconds a whoami connection may stay open (the design's 5 s limit).
WHOAMI_CONN_TIMEOUT = 5.0


def _serve_whoami(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.settimeout(WHOAMI_CONN_TIMEOUT)
        buf = b""
        try:
            while len(buf) < probe.REQUEST_LEN:
                chunk = conn.recv(probe.REQUEST_LEN - len(buf))
                if not chunk:
                    return
                buf += chunk
            nonce = probe.parse_request_untrusted(buf)
            conn.sendall(probe.encode_answer(nonce, peer[0], peer[1]))
        except (OSError, WireError):
            return


def _whoami(ports: list[int]) -> None:
    listeners = []
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen(64)
        listeners.append(s)

    def loop(s: socket.socket) -> None:
        while True:
            conn, peer = s.accept()
            threading.Thread(target=_serve_whoami, args=(conn, peer), daemon=True).start()

    for s in listeners[1:]:
        threading.Thread(target=loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    loop(listeners[0])


def _natpmp_gw(ext_ip: str, lan_ip: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((lan_ip, natpmp.SERVER_PORT))
    epoch0 = time.monotonic()
    print("ready", flush=True)
    while True:
        data, src = sock.recvfrom(natpmp.MAX_DATAGRAM)
        epoch = int(time.monotonic() - epoch0)
        if data[:1] == bytes([natpmp.PCP_VERSION]):
            # NAT-PMP-only gateway: "unsupported version" in NAT-PMP format (RFC 6887 §9).
            sock.sendto(
                natpmp.natpmp_map_response(
                    natpmp.NatPmpResult.UNSUPPORTED_VERSION,
                    epoch,
                    0,
                    internal=0,
                    external=0,
                    lifetime=0,
                )[:8],
                src,
            )
            continue
        try:
            req = natpmp.natpmp_parse_request_untrusted(data)
        except WireError:
            continue
        if req is None:
            sock.sendto(natpmp.natpmp_public_address_response(0, epoch, ext_ip), src)
            continue
        op, internal, external, lifetime = req
        ext = external or internal
        proto = "tcp" if op == 2 else "udp"
        rule = [
            *("-t", "nat", "-A", "PREROUTING", "-d", ext_ip, "-p", proto),
            *("--dport", str(ext), "-j", "DNAT", "--to-destination", f"{src[0]}:{internal}"),
        ]
        ok = subprocess.run(["iptables", "-w", "5", *rule], check=False).returncode == 0
        result = natpmp.NatPmpResult.SUCCESS if ok else natpmp.NatPmpResult.OUT_OF_RESOURCES
        sock.sendto(
            natpmp.natpmp_map_response(
                result, epoch, op, internal=internal, external=ext, lifetime=lifetime
            ),
            src,
        )


#: STUN (RFC 5389 framing, RFC 3489 CHANGE-REQUEST) constants for the lab responder.
_STUN_BINDING = 0x0001
_STUN_CHANGE_REQUEST = 0x0003
_STUN_CHANGE_IP = 0x04
_STUN_CHANGE_PORT = 0x02


def _stun(ip1: str, ip2: str, port1: int, port2: int) -> None:
    """A minimal classic STUN responder on 2 addresses x 2 ports (for miniupnpd's STUN check).

    miniupnpd 2.3.1 learns its public address and whether it may map ports by
    STUN with CHANGE-REQUEST (RFC 3489 tests). Lab only: answers Binding
    requests with MAPPED-ADDRESS from the socket the CHANGE-REQUEST flags ask for.
    """
    socks = {}
    for ip in (ip1, ip2):
        for port in (port1, port2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, port))
            socks[ip, port] = s
    main_sock = socks[ip1, port1]
    print("ready", flush=True)
    while True:
        data, src = main_sock.recvfrom(2048)
        if len(data) < 20 or int.from_bytes(data[:2], "big") != _STUN_BINDING:
            continue
        flags = 0
        off = 20
        while off + 4 <= len(data):
            atype = int.from_bytes(data[off : off + 2], "big")
            alen = int.from_bytes(data[off + 2 : off + 4], "big")
            if atype == _STUN_CHANGE_REQUEST and alen == 4:
                flags = data[off + 7]
            off += 4 + alen + (-alen % 4)
        mapped = b"\x00\x01" + src[1].to_bytes(2, "big") + socket.inet_aton(src[0])
        attr = (1).to_bytes(2, "big") + len(mapped).to_bytes(2, "big") + mapped
        reply = b"\x01\x01" + len(attr).to_bytes(2, "big") + data[4:20] + attr
        ip = ip2 if flags & _STUN_CHANGE_IP else ip1
        port = port2 if flags & _STUN_CHANGE_PORT else port1
        socks[ip, port].sendto(reply, src)


def _cand_json(c: Candidate) -> dict[str, object]:
    return {"kind": c.kind, "host": c.host, "port": c.port}


def _discover(port: int, main: str, probe_addr: str | None, portmap: bool) -> None:
    with DirectPort(port) as dport:
        obs = netcheck(
            dport,
            probe.parse_addr_untrusted(main),
            probe.parse_addr_untrusted(probe_addr) if probe_addr else None,
            portmap=portmap,
            timeout=1.0,
        )
    verdict = classify_nat(obs)
    out = {
        "observations": dataclasses.asdict(obs),
        "kind": verdict.kind.value,
        "code": verdict.code,
        "reason": verdict.reason,
        "candidates": [_cand_json(c) for c in candidates(obs, verdict)],
    }
    print(json.dumps(out), flush=True)


def _punch(port: int, cands_json: str, deadline: float, name: str) -> None:
    cands = [Candidate(c["kind"], c["host"], int(c["port"])) for c in json.loads(cands_json)]
    with DirectPort(port) as dport:
        print("ready", flush=True)
        sys.stdin.readline()  # "go": both sides start at about the same moment
        res = punch(dport, cands, deadline)
        if isinstance(res, PunchFailure):
            print(json.dumps({"ok": False, "code": res.code, "reason": res.reason}), flush=True)
            return
        with res.sock as sock:
            sock.settimeout(3.0)
            sock.sendall(name.encode() + b"\n")
            got = b""
            try:
                while not got.endswith(b"\n"):
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
        out = {
            "ok": True,
            "kind": res.kind,
            "endpoint": res.endpoint,
            "via": res.via,
            "elapsed": res.elapsed,
            "peer_said": got.decode(errors="replace").strip(),
        }
        print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="labnode")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("whoami")
    w.add_argument("ports", nargs="+", type=int)
    g = sub.add_parser("natpmp-gw")
    g.add_argument("--ext-ip", required=True)
    g.add_argument("--lan-ip", required=True)
    st = sub.add_parser("stun")
    st.add_argument("ip1")
    st.add_argument("ip2")
    st.add_argument("port1", type=int)
    st.add_argument("port2", type=int)
    d = sub.add_parser("discover")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--main", required=True)
    d.add_argument("--probe")
    d.add_argument("--no-portmap", action="store_true")
    p = sub.add_parser("punch")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cands", required=True)
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "whoami":
        _whoami(args.ports)
    elif args.cmd == "natpmp-gw":
        _natpmp_gw(args.ext_ip, args.lan_ip)
    elif args.cmd == "stun":
        _stun(args.ip1, args.ip2, args.port1, args.port2)
    elif args.cmd == "discover":
        _discover(args.port, args.main, args.probe, not args.no_portmap)
    else:
        _punch(args.port, args.cands, args.deadline, args.name)


if __name__ == "__main__":
    main()
