"""Endpoint discovery from the direct port: whoami x2, local addresses, a router mapping.

Blocking and bounded; the decisions (NAT kind, candidates) are the pure
functions of :mod:`homeport.proto.natcheck` applied to what this gathers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

from homeport.io.portmap import PortMapFailure, request_mapping
from homeport.io.punch import DirectPort
from homeport.proto.natcheck import Observations
from homeport.wire import probe
from homeport.wire.errors import WireError

#: Seconds one whoami may take (connect + answer).
WHOAMI_TIMEOUT = 2.0


def whoami(
    port: DirectPort, server: tuple[str, int], timeout: float = WHOAMI_TIMEOUT
) -> tuple[str, int]:
    """The ``(ip, port)`` ``server`` sees for a connection from the direct port.

    Raises OSError (incl. TimeoutError) or WireError.
    """
    end = time.monotonic() + timeout
    nonce = probe.new_nonce()
    with port.connect_from(server, timeout) as sock:
        sock.sendall(probe.encode_request(nonce))
        buf = b""
        while not probe.answer_complete(buf):
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("whoami answer timed out")
            sock.settimeout(left)
            chunk = sock.recv(probe.MAX_ANSWER_LEN - len(buf))
            if not chunk:
                raise WireError("server closed before a whoami answer")
            buf += chunk
            if len(buf) >= probe.MAX_ANSWER_LEN:
                break
        answer = probe.parse_answer_untrusted(buf, nonce)
        # Let the server close first: TIME_WAIT then sits on its side, not on a
        # (direct port, server) tuple we may want to use again.
        with contextlib.suppress(OSError):
            sock.settimeout(max(0.0, end - time.monotonic()))
            sock.recv(1)
        return answer


def local_addresses(towards: str | None = None) -> tuple[str, ...]:
    """Non-loopback, non-link-local interface addresses (IPv4 and IPv6), without sending.

    Reads ``ip -j addr``; without iproute2, falls back to the source address the
    kernel would pick towards ``towards`` (a UDP ``connect`` sends nothing).
    """
    out: list[str] = []
    ip = shutil.which("ip")
    if ip is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            proc = subprocess.run(
                [ip, "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
            )
            for iface in json.loads(proc.stdout):
                for info in iface.get("addr_info", []):
                    addr = info.get("local")
                    scope = info.get("scope")
                    if isinstance(addr, str) and scope == "global" and addr not in out:
                        out.append(addr)
    if not out and towards is not None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((towards, 9))
            out.append(s.getsockname()[0])
    return tuple(out)


def netcheck(
    port: DirectPort,
    main: tuple[str, int],
    probe_addr: tuple[str, int] | None,
    *,
    portmap: bool = True,
    timeout: float = WHOAMI_TIMEOUT,
    portmap_timeouts: Sequence[float] = (0.25, 0.5, 1.0),
) -> Observations:
    """Gather every observation discovery makes from ``port``.

    ``probe_addr`` None means the server has no probe port (the NAT kind then
    stays unknown).
    """
    main_obs: tuple[str, int] | None = None
    probe_obs: tuple[str, int] | None = None
    main_err = probe_err = ""
    rtt_ms: float | None = None
    t0 = time.monotonic()
    try:
        main_obs = whoami(port, main, timeout)
        rtt_ms = (time.monotonic() - t0) * 1000
    except (OSError, WireError) as exc:
        main_err = str(exc) or type(exc).__name__
    if probe_addr is None:
        probe_err = "the server has no probe port"
    else:
        try:
            probe_obs = whoami(port, probe_addr, timeout)
        except (OSError, WireError) as exc:
            probe_err = str(exc) or type(exc).__name__
    mapping = None
    mapping_err = ""
    if portmap:
        got = request_mapping(port.port, timeouts=portmap_timeouts)
        if isinstance(got, PortMapFailure):
            mapping_err = got.reason
        else:
            mapping = got
    return Observations(
        direct_port=port.port,
        local_addrs=local_addresses(towards=main[0]),
        main=main_obs,
        main_error=main_err,
        probe=probe_obs,
        probe_error=probe_err,
        mapping=mapping,
        mapping_error=mapping_err,
        rtt_ms=rtt_ms,
    )
