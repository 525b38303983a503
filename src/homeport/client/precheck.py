"""Say why ssh to a node cannot work *before* ssh starts, in one line (issue 9, A7).

Why: under ``ProxyUseFdpass`` a failing ProxyCommand is followed by two lines of
OpenSSH noise (``mm_receive_fd: recvmsg: expected received 1 got 0`` and
``proxy dialer did not pass back a connection``) that bury homeport's own
reason. ssh prints them at its ERROR/FATAL log levels, which only ``LogLevel
QUIET`` silences, and a ProxyCommand cannot change ssh's log level once it
runs. So the check runs earlier:

* ``homeport ssh NAME`` asks before it execs ssh (no ssh at all for a typo);
* ``ssh-config`` writes ``Match host NAMES !exec "<nc> --check %h %p"`` ahead of
  the Host block: ssh runs the check while it reads its config; when it fails
  (it has printed its one line on stderr, which ssh leaves alone) the Match
  block applies ``LogLevel QUIET`` and a ProxyCommand that just fails, so ssh
  exits 255 without a word of its own.

The check is asked of the local agent (its peer map: the same facts the server
decides an OPEN on, held warm), so it costs one interpreter start and a
unix-socket round trip. It fails only on a definite answer — no such node,
offline, service not exposed — and passes whenever it cannot tell (no agent,
an older agent, not connected yet): then the real open decides and the noise
remains for that case. Standard library only, no ``json`` (nc's flat reader).

The decision itself (:func:`verdict`) is pure: the agent's flat reply in, a
one-line reason (or None) out.
"""

import os

#: Exit status of ``nc --check`` when the target cannot be reached (ssh's ``!exec`` matches).
CHECK_FAIL = 1
CHECK_PASS = 0
#: Same as ``homeport.io.localapi.SOCKET_NAME`` / ``MAX_REPLY`` (not imported: start-up time).
AGENT_SOCKET = "agent.sock"
MAX_REPLY = 4 * 1024
#: Seconds the check waits for the agent (it answers from memory; past this we pass).
CHECK_TIMEOUT = 1.0


def ago(seconds: float) -> str:
    """The server's wording for a duration (``proto.coord._ago``), so both answers match."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} days"


def exposes(services: str, service: str) -> bool:
    """Whether ``services`` (``"ssh/22,web/8888"``) offers ``service`` (a name or a port)."""
    for item in services.split(","):
        name, _, port = item.partition("/")
        if item and service in (name, port):
            return True
    return False


def verdict(
    reply: "Mapping[str, object] | None", host: str, service: str, now: float
) -> str | None:
    """Why ``host``'s ``service`` cannot be reached now (one line), or None: go ahead.

    ``reply`` is the agent's answer to ``{"op": "check", "dst": host}``: ``ok``,
    ``ready`` (connected, holding a current peer map), ``known``, ``online``,
    ``last_seen``, ``services`` (``"name/port,…"``). Anything unexpected passes.
    """
    if not reply or reply.get("ok") is not True or reply.get("ready") is not True:
        return None
    if reply.get("known") is not True:
        return f"no node named {host!r} that this node can reach (see: homeport status)"
    if reply.get("online") is not True:
        last = reply.get("last_seen")
        seen = (
            f"last seen {ago(now - last)} ago"
            if isinstance(last, int | float) and not isinstance(last, bool) and last > 0
            else "never seen"
        )
        return f"{host} is offline ({seen}); is 'homeport up' running there?"
    services = reply.get("services")
    if isinstance(services, str) and not exposes(services, service):
        shown = services.replace(",", ", ") or "nothing"
        return f"{host} does not expose {service!r} (exposed: {shown})"
    return None


def ask_agent(
    state_dir: str,
    host: str,
    parse_reply: "Callable[[str], dict[str, object]]",
    timeout: float = CHECK_TIMEOUT,
) -> "dict[str, object] | None":
    """The local agent's check answer for ``host``, or None when it cannot answer.

    ``host`` passed ``names.host_name_problem`` (no character JSON would escape);
    ``parse_reply`` is nc's flat JSON reader (passed in: nc imports this module).
    """
    import _socket

    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        sock.connect(os.path.join(state_dir, AGENT_SOCKET))
        sock.sendall(f'{{"op":"check","dst":"{host}","timeout":{timeout!r}}}\n'.encode())
        buf = b""
        while b"\n" not in buf and len(buf) <= MAX_REPLY:
            chunk = sock.recv(MAX_REPLY)
            if not chunk:
                break
            buf += chunk
        return parse_reply(buf.split(b"\n", 1)[0].decode())
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


TYPE_CHECKING = False  # mypy reads this name as True; importing typing costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
