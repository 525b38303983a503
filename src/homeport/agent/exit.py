"""The exit node's dialer: resolve a destination, check every address, connect.

Why here and not in the core: resolving a name and connecting are I/O. The
rule itself is pure (:func:`homeport.policy.exitnet.check_address`) and is
applied to each *resolved* address before any connection is attempted, so a
name that resolves outside the advertised networks (or to loopback) is
refused exactly like the address would be. Failures are one line with a
code the opener sees (OPEN_FAILED) and the SOCKS client maps to a reply:

=================  ==============================================
code               meaning
=================  ==============================================
``not-allowed``    every address is outside the advertised networks
``no-such-host``   the name does not resolve (at the exit node)
``refused``        connection refused by the destination
``unreachable``    no route to the host or network
``timeout``        no answer within :data:`EXIT_CONNECT_TIMEOUT` (:data:`EXIT_DIAL_BUDGET` in all)
=================  ==============================================
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from homeport.policy import exitnet

#: Seconds to connect to one resolved address of an exit destination.
EXIT_CONNECT_TIMEOUT = 5.0
#: Seconds for all addresses together: below the server's wait for ACCEPT
#: (``proto.coord.OPEN_TIMEOUT``, 10 s), so the opener hears our reason, not a timeout.
EXIT_DIAL_BUDGET = 8.0
#: Most resolved addresses tried for one destination (a name with many records).
MAX_EXIT_ADDRESSES = 8


class ExitFailed(Exception):
    """The exit stream's destination could not be dialed: ``code`` and one line."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_allowed(
    host: str, port: int, nets: tuple[str, ...]
) -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    """The resolved addresses of ``host`` that the exit may dial, in resolver order.

    Raises:
        ExitFailed: the name does not resolve, or no address is allowed.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ExitFailed("no-such-host", f"cannot resolve {host}: {exc.strerror}") from None
    networks = exitnet.nets_untrusted(nets)
    allowed: list[tuple[socket.AddressFamily, tuple[str, int]]] = []
    refusal = ""
    seen: set[str] = set()
    for family, _, _, _, addr in infos:
        text = str(addr[0]).split("%", 1)[0]
        if text in seen:
            continue
        seen.add(text)
        check = exitnet.check_address(ipaddress.ip_address(text), networks)
        if check.allowed:
            allowed.append((family, (str(addr[0]), int(addr[1]))))
        elif not refusal:
            refusal = check.reason
    if not allowed:
        named = "" if exitnet.literal_address(host) is not None else f"{host} resolves to: "
        raise ExitFailed("not-allowed", f"{named}{refusal or 'not allowed'}")
    return allowed[:MAX_EXIT_ADDRESSES]


async def connect_exit(host: str, port: int, nets: tuple[str, ...]) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` through an allowed address.

    Raises:
        ExitFailed: one line and a code (see the module docstring).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXIT_DIAL_BUDGET
    last = ExitFailed("unreachable", f"cannot connect to {_where(host, port)}")
    for family, addr in await resolve_allowed(host, port, nets):
        left = deadline - loop.time()
        if left <= 0:
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), min(EXIT_CONNECT_TIMEOUT, left))
        except TimeoutError:
            sock.close()
            last = ExitFailed("timeout", f"timed out connecting to {_where(addr[0], port)}")
        except OSError as exc:
            sock.close()
            last = _failure(exc, _where(addr[0], port))
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    raise last


def _failure(exc: OSError, where: str) -> ExitFailed:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return ExitFailed("refused", f"connection refused by {where}")
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return ExitFailed("unreachable", f"no route to {where}")
    return ExitFailed("unreachable", f"cannot connect to {where}: {exc.strerror or exc}")
