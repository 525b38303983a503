"""``homeport nc [--state DIR] HOST PORT``: ssh's ProxyCommand.

Runs on every ``ssh`` through homeport, so it imports the standard library
only (no click, asyncio or cryptography; ``__main__`` dispatches here before
importing the CLI). It opens an end-to-end TLS stream to HOST's PORT (a port
number or a service name), writes HOST's sshd host keys as vouched for by the
server to ``<state>/known_hosts/<HOST>`` *before* ssh reads any byte, then
pumps stdin/stdout.

Exit status: 0 when the stream ended cleanly or ssh closed its side; 1 with one
line ``homeport nc: <host>: <reason>`` on stderr otherwise; 2 for usage errors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

USAGE = "usage: homeport nc [--state DIR] [--timeout SECONDS] HOST PORT"
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 10.0


class UsageError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class NcArgs:
    host: str
    service: str  # "22" or a service name
    state: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def parse_args(argv: list[str]) -> NcArgs:
    """Parse ``[--state DIR] [--timeout S] HOST PORT`` (options may come anywhere).

    Raises:
        UsageError: with the reason.
    """
    state: str | None = None
    timeout = DEFAULT_TIMEOUT
    positional: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise UsageError("help")
        if arg == "--":
            positional.extend(it)
            break
        name, eq, value = arg.partition("=")
        if name in ("--state", "--timeout"):
            if not eq:
                try:
                    value = next(it)
                except StopIteration:
                    raise UsageError(f"{name} needs a value") from None
            if name == "--state":
                state = value
            else:
                try:
                    timeout = float(value)
                except ValueError:
                    raise UsageError(f"--timeout {value!r} is not a number") from None
                if not 0 < timeout <= 3600:
                    raise UsageError("--timeout must be between 0 and 3600 seconds")
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("expected HOST and PORT")
    host, service = positional
    if not host:
        raise UsageError("empty HOST")
    if not service or not (
        service.isdigit() or service.replace("-", "").replace("_", "").isalnum()
    ):
        raise UsageError(f"bad PORT {service!r}")
    if service.isdigit() and not 0 < int(service) < 65536:
        raise UsageError(f"port {service} out of range")
    return NcArgs(host=host, service=service, state=state, timeout=timeout)


def format_error(host: str, reason: str) -> str:
    """The one line nc prints on failure (ssh shows it to the user verbatim)."""
    one_line = " ".join(reason.split())
    return f"homeport nc: {host}: {one_line}"


def _fail(host: str, reason: str) -> int:
    print(format_error(host, reason), file=sys.stderr, flush=True)
    return EXIT_FAIL


def _hangup_pipe() -> tuple[int, int]:
    """A pipe that becomes readable on SIGHUP/SIGTERM/SIGINT.

    ssh sends SIGHUP to its ProxyCommand when the session is over, usually
    before our stdin reaches EOF. Turning the signal into a pump cancel (with
    close_on_cancel) sends a close_notify, so the far agent logs a clean end
    instead of a truncated stream.
    """
    import os
    import signal

    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signo, _frame: None)
    return r, w


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        if str(exc) == "help":
            print(USAGE)
            return EXIT_OK
        print(f"homeport nc: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE

    from homeport.io.dial import DialError, open_stream
    from homeport.io.pump import PumpEnd, pump
    from homeport.node import state as node_state

    try:
        node_state.check_host_name(args.host)
    except ValueError as exc:
        return _fail(args.host, str(exc))
    try:
        state = node_state.load(node_state.resolve_dir(args.state))
    except node_state.StateError as exc:
        return _fail(args.host, str(exc))
    try:
        stream = open_stream(state, args.host, args.service, timeout=args.timeout)
    except DialError as exc:
        return _fail(args.host, exc.message)
    except OSError as exc:
        return _fail(args.host, f"connection failed: {exc}")
    peer = stream.opened.peer
    port = stream.opened.port or (int(args.service) if args.service.isdigit() else 22)
    try:
        node_state.write_known_hosts(state.dir, args.host, port, peer.host_keys)
    except (ValueError, OSError) as exc:
        stream.tls.close()
        return _fail(args.host, f"cannot write known_hosts for {peer.name}: {exc}")
    sys.stdout.flush()
    hangup_r, _hangup_w = _hangup_pipe()
    result = pump(
        stream.tls,
        sys.stdin.fileno(),
        sys.stdout.fileno(),
        cancel_fd=hangup_r,
        close_on_cancel=True,
    )
    if result.ok or result.end in (PumpEnd.LOCAL_ERROR, PumpEnd.CANCELLED):
        return EXIT_OK
    return _fail(args.host, result.reason)
