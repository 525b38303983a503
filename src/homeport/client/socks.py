"""``homeport socks [--listen 127.0.0.1:1080] --via NODE``: a local SOCKS5 proxy out of NODE.

Each accepted connection speaks SOCKS5 (the sans-I/O :mod:`homeport.wire.socks5`
machine: no authentication, CONNECT only), then opens its own end-to-end
stream to NODE carrying the destination ``host:port`` (an *exit stream*,
docs/exit-nodes.md). NODE resolves the name, checks the address against the
networks it advertises and dials it; the server and NODE both decide whether
this node may use NODE as an exit at all (the policy). A refusal becomes the
matching SOCKS reply (not allowed, connection refused, host unreachable) and
one line on the terminal.

Why loopback only by default: anyone who can connect to the proxy uses
NODE's network as this node; on loopback that is only local users, who could
run ``homeport nc`` anyway. Listening elsewhere needs ``--allow-remote``.
"""

from __future__ import annotations

import ipaddress
import socket

from homeport.client.forward import Forwarder, ForwardSpec
from homeport.io.dial import DialError, open_stream
from homeport.io.pump import pump
from homeport.node.state import NodeState
from homeport.wire import socks5
from homeport.wire.errors import WireError

#: Seconds a client has to send its greeting and request.
HANDSHAKE_TIMEOUT = 10.0
#: Bytes read per recv during the SOCKS handshake.
HANDSHAKE_READ = 4096
#: The default listen address.
DEFAULT_LISTEN = "127.0.0.1:1080"

#: OPEN_FAILED / REJECT codes (server, exit node, local dialer) as SOCKS5 replies.
REPLY_FOR_CODE = {
    "not-allowed": socks5.REP_NOT_ALLOWED,
    "policy": socks5.REP_NOT_ALLOWED,
    "not-exit": socks5.REP_NOT_ALLOWED,
    "refused": socks5.REP_CONNECTION_REFUSED,
    "unreachable": socks5.REP_HOST_UNREACHABLE,
    "no-such-host": socks5.REP_HOST_UNREACHABLE,
    "timeout": socks5.REP_HOST_UNREACHABLE,
    "offline": socks5.REP_NETWORK_UNREACHABLE,
    "bad-request": socks5.REP_ADDRESS_NOT_SUPPORTED,
}


def reply_for(code: str) -> int:
    """The SOCKS5 reply for a stream failure ``code`` (general failure if unknown)."""
    return REPLY_FOR_CODE.get(code, socks5.REP_GENERAL_FAILURE)


def parse_listen(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) to listen on; non-loopback only with ``allow_remote``.

    Raises:
        ValueError: with a user-facing message.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"--listen {text[:80]!r}: expected HOST:PORT, e.g. 127.0.0.1:1080")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"--listen {text[:80]!r}: port out of range")
    if host != "localhost" and not allow_remote:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"refusing to listen on {host}: whoever reaches it would use the exit node's "
                "network as you; listen on 127.0.0.1 (or add --allow-remote)"
            )
    return host, port


class SocksProxy(Forwarder):
    """A SOCKS5 listener whose connections leave from ``via`` (an exit node)."""

    def __init__(self, state: NodeState, via: str, bind: str, port: int, **kwargs: object) -> None:
        super().__init__(state, ForwardSpec(via, ""), bind, port, **kwargs)  # type: ignore[arg-type]
        self.via = via

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        src = f"{peer[0]}:{peer[1]}"
        try:
            self._serve(conn, src)
        except OSError as exc:
            self.report({"event": "failed", "from": src, "to": self.via, "reason": str(exc)})
        finally:
            conn.close()
            self._forget()

    def _serve(self, conn: socket.socket, src: str) -> None:
        machine = socks5.Socks5Server()
        conn.settimeout(HANDSHAKE_TIMEOUT)
        request: socks5.ConnectRequest | None = None
        while request is None:
            try:
                data = conn.recv(HANDSHAKE_READ)
            except TimeoutError:
                self.report({"event": "failed", "from": src, "reason": "SOCKS handshake timeout"})
                return
            if not data:
                return
            try:
                event = machine.receive_untrusted(data)
            except WireError as exc:
                self.report({"event": "failed", "from": src, "reason": str(exc)})
                return
            out = machine.data_to_send()
            if out:
                conn.sendall(out)
            if isinstance(event, socks5.Refused):
                self.report({"event": "failed", "from": src, "reason": event.why})
                return
            request = event
        dst = f"{self.via}:{request.destination}"
        try:
            stream = open_stream(
                self.state, self.via, "", timeout=self.timeout, exit=request.destination
            )
        except DialError as exc:
            machine.reply(reply_for(exc.code))
            conn.sendall(machine.data_to_send())
            self.report({"event": "failed", "from": src, "to": dst, "reason": exc.message})
            return
        try:
            machine.reply(socks5.REP_SUCCEEDED)
            conn.sendall(machine.data_to_send())
            conn.settimeout(None)
            if machine.leftover:
                stream.tls.send_blocking(machine.leftover)
            self.report({"event": "open", "from": src, "to": dst, "peer": self.via})
            res = pump(stream.tls, conn.fileno(), conn.fileno(), cancel_fd=self._cancel_r)
        finally:
            stream.tls.close()
        self.report(
            {
                "event": "closed",
                "from": src,
                "to": dst,
                "ok": res.ok,
                "reason": res.reason,
                "sent": res.sent,
                "received": res.received,
            }
        )
