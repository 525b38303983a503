"""``homeport nc [--state DIR] [--timeout S] [--fdpass] HOST PORT``: ssh's ProxyCommand.

Runs on every ``ssh`` through homeport, so its start-up time is the product.
Two paths:

* **Warm (a local agent runs).** nc connects to ``<state>/agent.sock``
  (:mod:`homeport.io.localapi`), asks the agent to open the stream over the
  control connection it already holds, and receives a connected unix socket
  that carries the stream's plain bytes (the agent keeps the end-to-end TLS and
  the pump). This path imports only ``_socket``, ``_json``, ``_thread`` and
  the import-free :mod:`homeport.wire.names` — no ``ssl``, ``dataclasses``,
  ``pathlib`` or other homeport modules; that is why this module has no
  ``from __future__ import annotations`` and no dataclass, and why the client
  side of the local API is written here rather than imported.
* **Direct (no agent, or the agent asks us to).** nc opens the stream itself
  (:func:`homeport.io.dial.open_stream`: control TLS, OPEN, data connection,
  end-to-end TLS) with the standard library only.

Either way HOST's sshd host keys, as vouched for by the server, are checked
against the pin for HOST (:func:`homeport.node.hostkeys.admit`: the node id and
keys first seen; a different node or changed keys are refused until
``homeport trust reset HOST``) and written to ``<state>/known_hosts/<HOST>``
before ssh reads a byte. Then:

* with ``--fdpass`` and stdout an ``AF_UNIX`` stream socket (ssh's
  ``ProxyUseFdpass yes``: ssh hands its ProxyCommand one end of a socketpair
  and waits for a connected descriptor on it), nc passes the stream's
  descriptor to ssh and exits, and ssh talks to it directly. On the direct path
  a forked child keeps the TLS stream and pumps it to the passed socketpair,
  because ssh waits for its ProxyCommand to exit before it starts talking;
* otherwise nc copies between stdin/stdout and the stream.

``--fdpass`` is explicit rather than guessed from stdout alone: programs that
give a child a socketpair for stdio (libuv does) must not receive a stray
descriptor; with the flag but a pipe for stdout, nc just copies.

Exit status: 0 when the stream ended cleanly, ssh closed its side, or the
descriptor went to ssh; 1 with one line ``homeport nc: <host>: <reason>`` on
stderr otherwise; 2 for usage errors. An error answer from the agent (unknown
node, not exposed …) is final: it is the answer a direct dial would get.
"""

import os
import sys

from homeport.wire import names  # import-free: the one table of name rules

USAGE = "Usage: homeport nc [OPTIONS] HOST PORT"
#: ``homeport nc --help``, laid out like click's help for the other commands (nc parses its
#: own arguments: click costs start-up time on every ssh).
HELP = f"""{USAGE}

  ssh ProxyCommand: open a stream to HOST's PORT (a port number or a service
  name) through homeport and connect it to ssh. HOST is a node name, or
  NAME.PROFILE for a node of another profile (PROFILE wins over --profile).

Options:
  --state DIR        state directory (env HOMEPORT_STATE, default
                     ~/.local/state/homeport)
  --profile NAME     which homeport network (env HOMEPORT_PROFILE)
  --timeout SECONDS  stream setup timeout  [default: 10]
  --fdpass           hand ssh a connected socket (with ProxyUseFdpass yes)
  --check            only check that HOST can be reached now (ssh-config's
                     Match exec); exit 1 with the reason if not
  -h, --help         Show this message and exit."""
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 10.0
#: Same as ``homeport.node.state`` (not imported: pathlib/dataclasses cost start-up).
ENV_STATE = "HOMEPORT_STATE"
DEFAULT_STATE = "~/.local/state/homeport"
ENV_PROFILE = "HOMEPORT_PROFILE"
#: Same as ``homeport.io.localapi.SOCKET_NAME`` and ``MAX_REPLY``.
AGENT_SOCKET = "agent.sock"
MAX_REPLY = 4 * 1024
#: Seconds to connect to the agent and send the request; past this we dial ourselves.
AGENT_CONNECT_TIMEOUT = 1.0
#: The agent's first line once it admitted an open (``localapi.ACCEPTED``, compact JSON).
ACCEPTED_LINE = b'{"accepted":true}'
#: Seconds the agent may take beyond the stream timeout before we dial ourselves.
AGENT_REPLY_MARGIN = 1.0
#: Descriptors we make room for in one reply (exactly one is expected; extras are closed).
MAX_FDS = 4
#: Bytes per read when copying between stdin/stdout and the agent's socket.
COPY_SIZE = 128 * 1024
_INT_SIZE = 4  # C int, the unit of SCM_RIGHTS data on every platform Python supports


class UsageError(Exception):
    pass


class NcArgs:
    """Parsed arguments (a plain class: ``dataclasses`` costs ~10 ms to import)."""

    __slots__ = ("fdpass", "host", "service", "state", "timeout")

    def __init__(
        self,
        host: str,
        service: str,  # "22" or a service name
        state: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        fdpass: bool = False,
    ) -> None:
        self.host = host
        self.service = service
        self.state = state
        self.timeout = timeout
        self.fdpass = fdpass

    def _key(self) -> tuple[str, str, str | None, float, bool]:
        return (self.host, self.service, self.state, self.timeout, self.fdpass)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NcArgs) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        host, service, state, timeout, fdpass = self._key()
        return f"NcArgs({host=!r}, {service=!r}, {state=!r}, {timeout=!r}, {fdpass=!r})"


def parse_args(argv: list[str]) -> NcArgs:
    """Parse ``[--state DIR] [--timeout S] [--fdpass] HOST PORT`` (options may come anywhere).

    Raises:
        UsageError: with the reason.
    """
    state: str | None = None
    timeout = DEFAULT_TIMEOUT
    fdpass = False
    positional: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise UsageError("help")
        if arg == "--":
            positional.extend(it)
            break
        if arg == "--fdpass":
            fdpass = True
            continue
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
    problem = names.service_ref_problem(service)
    if problem is not None:
        raise UsageError(problem)
    return NcArgs(host=host, service=service, state=state, timeout=timeout, fdpass=fdpass)


def format_error(host: str, reason: str) -> str:
    """The one line nc prints on failure (ssh shows it to the user verbatim).

    The reason comes from the server or the agent: control characters are
    escaped (no terminal sequences from a compromised server), and a reason
    that already starts with the node's name does not get it twice.
    """
    from homeport.client.term import printable

    one_line = printable(" ".join(reason.split()))
    if one_line.startswith(host + " "):
        return f"homeport nc: {one_line}"
    return f"homeport nc: {printable(host)}: {one_line}"


def _usage_error(reason: str) -> int:
    """A usage error the way click reports one (the other commands' style)."""
    print(f"{USAGE}\nTry 'homeport nc --help' for help.\n\nError: {reason}", file=sys.stderr)
    return EXIT_USAGE


#: How this run names HOST in its error lines: ``{"labpc": "labpc.work"}`` once a profile
#: suffix was taken off (:func:`use_profile_suffix`), and ``{"labpc.wrk": hint}`` for a
#: dotted name that only looks like NAME.PROFILE. A one-shot process's own bookkeeping.
_SHOWN: dict[str, str] = {}
_HINTS: dict[str, str] = {}


def _fail(host: str, reason: str) -> int:
    if reason.startswith("no node named") and host in _HINTS:
        reason += _HINTS[host]
    print(format_error(_SHOWN.get(host, host), reason), file=sys.stderr, flush=True)
    return EXIT_FAIL


def main(argv: list[str]) -> int:
    if "--profile" in argv[:-1]:  # the network (node.state profiles); via env for every path
        i = argv.index("--profile")
        os.environ[ENV_PROFILE] = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    if "--check" in argv:  # ssh-config's Match exec: say why not, before ssh starts
        return check_main([a for a in argv if a != "--check"])
    try:
        args = parse_args(argv)
    except UsageError as exc:
        if str(exc) == "help":
            print(HELP)
            return EXIT_OK
        return _usage_error(str(exc))
    use_profile_suffix(args)
    handoff = _fdpass_socket() if args.fdpass or _ssh_wants_fd() else None
    if names.host_name_problem(args.host) is None:  # else the direct path reports it
        code = _agent_open(args, handoff)
        if code is not None:
            return code
    return _direct(args, handoff)


def check_main(argv: list[str]) -> int:
    """``nc --check [--state DIR] HOST PORT``: exit 1 with one line if HOST cannot work now.

    Passes (exit 0, silent) whenever the local agent cannot tell: see
    :mod:`homeport.client.precheck`.
    """
    import time

    from homeport.client import precheck

    suffix = ""
    if "--suffix" in argv[:-1]:  # a profile's names: labpc.work (ssh's %h before Hostname)
        i = argv.index("--suffix")
        suffix, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    try:
        args = parse_args(argv)
    except UsageError as exc:
        return _usage_error(str(exc))
    if suffix and args.host.endswith(suffix):
        args.host = args.host[: -len(suffix)]
    else:
        use_profile_suffix(args)
    problem = names.host_name_problem(args.host)
    if problem is not None:
        _fail(args.host, problem)
        return precheck.CHECK_FAIL
    reply = precheck.ask_agent(state_dir(args.state), args.host, parse_reply)
    reason = precheck.verdict(reply, args.host, args.service, time.time())
    if reason is None:
        return precheck.CHECK_PASS
    _fail(args.host, reason)
    return precheck.CHECK_FAIL


# -- the warm path: ask the local agent ------------------------------------------------


def split_profile(host: str, state: str | None) -> tuple[str, str | None]:
    """``labpc.work`` -> ("labpc", "work") when "work" is a profile of the base state directory
    (``default``, or an existing ``profiles/work``); anything else -> (host, None).

    The precedence, and why it is never ambiguous: a node name has no dot (the
    node-name rule of :mod:`homeport.wire.names`), so ``labpc.work`` can never be
    a node of the current profile, and only a valid node name before the last
    dot is taken (``a.b.work`` is left alone). A suffix that names a profile
    wins over ``--profile`` and ``$HOMEPORT_PROFILE``, as in ``homeport ssh
    labpc.work``: the name says which network. ``node.state.list_profiles``'s
    rule, with ``os`` only (nc's start-up time).
    """
    node, dot, suffix = host.rpartition(".")
    if not dot or names.node_name_problem(node) is not None:
        return host, None
    if names.node_name_problem(suffix) is not None:
        return host, None
    if suffix == "default" or os.path.isdir(os.path.join(_base_dir(state), "profiles", suffix)):
        return node, suffix
    return host, None


def use_profile_suffix(args: NcArgs) -> None:
    """Apply :func:`split_profile` to ``args``: the profile goes to $HOMEPORT_PROFILE (so the
    warm and the direct path both use it), errors keep showing the name as given; a name
    that only looks like NAME.PROFILE gets a hint for its "no node named" error."""
    node, profile = split_profile(args.host, args.state)
    if profile is not None:
        os.environ[ENV_PROFILE] = profile
        _SHOWN[node] = args.host
        _HINTS[node] = f" (profile {profile!r})"
        args.host = node
        return
    head, dot, suffix = args.host.rpartition(".")
    if dot and names.node_name_problem(head) is None and names.node_name_problem(suffix) is None:
        _HINTS[args.host] = f" ({suffix!r} is not a profile here: {_profile_list(args.state)})"


def _profile_list(state: str | None) -> str:
    try:
        found = sorted(os.listdir(os.path.join(_base_dir(state), "profiles")))
    except OSError:
        found = []
    base = os.path.join(_base_dir(state), "profiles")
    good = [
        p
        for p in found
        if p != "default"
        and names.node_name_problem(p) is None
        and os.path.isdir(os.path.join(base, p))
    ]
    return "profiles: " + ", ".join(["default", *good])


def _base_dir(arg: str | None) -> str:
    """``node.state.base_dir`` without pathlib: --state, else $HOMEPORT_STATE, else default."""
    raw = arg or os.environ.get(ENV_STATE) or DEFAULT_STATE
    return os.path.abspath(os.path.expanduser(raw))


def state_dir(arg: str | None) -> str:
    """``node.state.resolve_dir`` without pathlib: --state, else $HOMEPORT_STATE, else default;
    then the profile: $HOMEPORT_PROFILE (``--profile``), else the base's ``profile`` file."""
    base = _base_dir(arg)
    name = os.environ.get(ENV_PROFILE)
    if not name:
        try:
            with open(os.path.join(base, "profile"), "rb") as f:
                name = f.read(256).decode("utf-8", "replace").strip()
        except OSError:
            name = ""
    if not name or name == "default":
        return base
    if names.node_name_problem(name) is not None:  # the direct path reports it (StateError)
        return os.path.join(base, "profiles", "-")
    return os.path.join(base, "profiles", name)


def open_request(host: str, service: str, timeout: float) -> bytes:
    """The local API request line. ``host`` passed ``names.host_name_problem`` and
    ``service`` :func:`parse_args`, so neither holds a character JSON would need to escape."""
    return (
        f'{{"op":"open","dst":"{host}","service":"{service}","timeout":{timeout!r},"ack":true}}\n'
    ).encode()


def _agent_open(args: NcArgs, handoff: "_Socket | None") -> int | None:
    """Open through the local agent; None means "no agent here, dial yourself"."""
    import _socket

    path = os.path.join(state_dir(args.state), AGENT_SOCKET)
    try:
        api = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    fds: list[int] = []
    try:
        api.settimeout(AGENT_CONNECT_TIMEOUT)  # connect, request and its ACCEPTED line
        api.connect(path)
        api.sendall(open_request(args.host, args.service, args.timeout))
        line, rest = _recv_line(api, fds)
        if line == ACCEPTED_LINE:  # alive and working on it: now the stream setup's time
            api.settimeout(args.timeout + AGENT_REPLY_MARGIN)
            line, rest = _recv_line(api, fds, rest)
        reply = parse_reply(line.decode())
    except (OSError, ValueError):  # no agent, a stale socket, a hung or confused agent
        api.close()
        _close_all(fds)
        return None
    if reply.get("ok") is not True:
        api.close()
        _close_all(fds)
        if reply.get("fallback") is True:
            return None
        return _fail(args.host, str(reply.get("message") or reply.get("code") or "refused"))
    if len(fds) != 1:  # a confused agent; it sees us leave and closes the stream
        api.close()
        _close_all(fds)
        return None
    fd = fds[0]
    if handoff is not None:
        api.close()
        try:
            send_fd(handoff, fd)
        except OSError as exc:
            return _fail(args.host, f"cannot pass the connection to ssh: {exc}")
        finally:
            os.close(fd)
        return EXIT_OK
    return _copy_stdio(args.host, fd, api, rest)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 - contextlib is one more import on the hot path
            os.close(fd)
        except OSError:
            pass


def _recv_line(sock: "_Socket", fds: list[int], buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read one ``\\n``-terminated line (≤ :data:`MAX_REPLY`), collecting passed descriptors.

    Returns the line without its newline and whatever followed it.

    Raises:
        OSError: EOF before the newline, a too long line, or a socket error.
    """
    import _socket

    anc_size = _socket.CMSG_SPACE(MAX_FDS * _INT_SIZE)
    while b"\n" not in buf:
        if len(buf) > MAX_REPLY:
            raise OSError("local agent reply too long")
        data, ancdata, flags, _addr = sock.recvmsg(
            MAX_REPLY + 1 - len(buf), anc_size, getattr(_socket, "MSG_CMSG_CLOEXEC", 0)
        )
        for level, kind, payload in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT_SIZE
                fds.extend(
                    int.from_bytes(payload[i : i + _INT_SIZE], sys.byteorder, signed=True)
                    for i in range(0, usable, _INT_SIZE)
                )
        if flags & _socket.MSG_CTRUNC:
            raise OSError("local agent passed more descriptors than expected")
        if not data:
            raise OSError("local agent closed the connection")
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line, rest


def send_fd(sock: "_Socket", fd: int) -> None:
    """Pass ``fd`` the way OpenSSH's ``mm_receive_fd`` takes it: one data byte, one SCM_RIGHTS."""
    import _socket

    payload = fd.to_bytes(_INT_SIZE, sys.byteorder, signed=True)
    sock.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)])


def _ssh_wants_fd() -> bool:
    """Whether ssh runs us under ``ProxyUseFdpass`` although ``--fdpass`` was not given.

    Why: ``ssh -o ProxyCommand='homeport nc %h %p' NAME`` with ``ssh-config --install``
    done takes ``ProxyUseFdpass yes`` from the included file; without this ssh
    waited for a descriptor that never came. OpenSSH's signature for it: stdin
    and stdout are one and the same socket (its socketpair); without
    ProxyUseFdpass they are two pipes, and paramiko gives two pipes too.
    """
    import stat

    try:
        st_in, st_out = os.fstat(0), os.fstat(1)
    except OSError:
        return False
    same = (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
    return same and stat.S_ISSOCK(st_out.st_mode)


def _fdpass_socket() -> "_Socket | None":
    """Stdout as a socket when it is an ``AF_UNIX`` stream socket (ssh's ProxyUseFdpass)."""
    import _socket

    try:
        fd = os.dup(1)
    except OSError:  # stdout is closed
        return None
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:  # ENOTSOCK: a pipe, a file or a tty
        os.close(fd)
        return None
    if sock.family != _socket.AF_UNIX or sock.type != _socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def _copy_stdio(host: str, fd: int, api: "_Socket", rest: bytes) -> int:
    """Copy stdin → stream and stream → stdout, then report how the agent's pump ended.

    Two blocking copies (one thread each) instead of a poll loop: simplest for
    unbounded peers, and there is no TLS here. No splice: OpenSSH reads its
    banner byte by byte from the pipe, and splicing into that pipe hung ssh.
    The agent writes the end line before it closes the stream socket, so once
    our downstream copy sees EOF the verdict is on ``api`` (or soon will be:
    a clean end waits for our upstream EOF, an abort does not).
    """
    import _signal  # type: ignore[import-not-found]  # no stub; ``signal`` imports enum
    import _socket
    import _thread

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # no KeyboardInterrupt traceback
    stream = _socket.socket(fileno=fd)
    for std in (0, 1):
        if not os.get_blocking(std):
            os.set_blocking(std, True)

    def upstream() -> None:
        try:
            while data := os.read(0, COPY_SIZE):
                stream.sendall(data)
            stream.shutdown(_socket.SHUT_WR)
        except OSError:
            pass  # the agent aborted the stream; the end line says why

    _thread.start_new_thread(upstream, ())
    buf = bytearray(COPY_SIZE)
    view = memoryview(buf)
    while True:
        try:
            n = stream.recv_into(buf)
        except OSError:  # ECONNRESET: the agent aborted; the end line says why
            n = 0
        if not n:
            break
        off = 0
        try:
            while off < n:
                off += os.write(1, view[off:n])
        except OSError:  # EPIPE: ssh is done with us
            return EXIT_OK
    _half_close(1)
    api.settimeout(None)
    try:
        line, _ = _recv_line(api, [], rest)
        end = parse_reply(line.decode())
    except (OSError, ValueError):
        return _fail(host, "the local homeport agent closed the stream")
    if end.get("ok") is True or end.get("end") == "local-error":
        return EXIT_OK
    if end.get("end") == "cancelled":
        return _fail(host, "the local homeport agent stopped")
    return _fail(host, str(end.get("reason") or "stream failed"))


def _half_close(fd: int) -> None:
    """Signal EOF on ``fd``: ``shutdown(SHUT_WR)`` for a socket, else swap in /dev/null."""
    import _socket

    dup = os.dup(fd)
    try:
        sock = _socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
        return
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


# -- a tiny JSON reader for the agent's flat replies ---------------------------------


def parse_reply(text: str) -> dict[str, object]:
    """Parse a flat JSON object (string, number, true/false/null values).

    ``json`` itself costs ~7 ms to import (it compiles regular expressions);
    strings go through the C ``_json.scanstring``, which is what ``json`` uses.

    Raises:
        ValueError: not such an object (nested values included).
    """
    from _json import scanstring

    out: dict[str, object] = {}
    i = _skip_ws(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("expected '{'")
    i = _skip_ws(text, i + 1)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise ValueError(f"expected a key at {i}")
            key, i = scanstring(text, i + 1)
            i = _skip_ws(text, i)
            if text[i : i + 1] != ":":
                raise ValueError(f"expected ':' at {i}")
            value, i = _scan_value(text, _skip_ws(text, i + 1))
            out[key] = value
            i = _skip_ws(text, i)
            sep = text[i : i + 1]
            i = _skip_ws(text, i + 1)
            if sep == "}":
                break
            if sep != ",":
                raise ValueError(f"expected ',' or '}}' at {i}")
    if _skip_ws(text, i) != len(text):
        raise ValueError("trailing data")
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _scan_value(text: str, i: int) -> tuple[object, int]:
    from _json import scanstring

    if text[i : i + 1] == '"':
        return scanstring(text, i + 1)
    for word, value in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, i):
            return value, i + len(word)
    j = i
    while j < len(text) and text[j] in "-+0123456789.eE":
        j += 1
    number = text[i:j]
    if not number:
        raise ValueError(f"unexpected {text[i : i + 1]!r} at {i}")
    if any(c in number for c in ".eE"):
        return float(number), j
    return int(number), j


# -- the direct path: dial by ourselves ---------------------------------------------


def _direct(args: NcArgs, handoff: "_Socket | None") -> int:
    from homeport.io.dial import DialError, open_stream
    from homeport.node import state as node_state

    try:
        node_state.check_host_name(args.host)
    except ValueError as exc:
        return _fail(args.host, str(exc))
    try:
        state = node_state.load(node_state.resolve_dir(args.state))
    except node_state.StateError as exc:
        return _fail(args.host, str(exc))
    if handoff is not None:
        from homeport.io.dial import route_of

        try:
            wrapped = route_of(state).tls_data
        except DialError as exc:
            return _fail(args.host, exc.message)
        if wrapped:
            return _fork_then_dial(args, state, handoff)
    try:
        stream = open_stream(state, args.host, args.service, timeout=args.timeout)
    except DialError as exc:
        return _fail(args.host, exc.message)
    except OSError as exc:
        return _fail(args.host, f"connection failed: {exc}")
    peer = stream.opened.peer
    port = stream.opened.port or (int(args.service) if args.service.isdigit() else 22)
    from homeport.node.hostkeys import TrustError, admit

    try:  # the pin, then known_hosts: never trust the server's word for a name twice
        admit(state.dir, args.host, port, peer.node_id, peer.host_keys)
    except TrustError as exc:
        stream.tls.close()
        return _fail(args.host, str(exc))
    except (ValueError, OSError) as exc:
        stream.tls.close()
        return _fail(args.host, f"cannot write known_hosts for {peer.name!r}: {exc}")
    if handoff is not None:
        return _fork_and_hand_off(args.host, stream.tls, handoff)
    sys.stdout.flush()
    return _pump(args.host, stream.tls, sys.stdin.fileno(), sys.stdout.fileno())


def _fork_then_dial(args: NcArgs, state: "NodeState", handoff: "_Socket") -> int:
    """ProxyUseFdpass with a TLS-wrapped data connection: the child dials, the parent hands off.

    Why fork first: a wrapped data connection needs a thread pumping its outer
    TLS (:func:`homeport.io.dial.wrap_data`), and threads do not survive the
    fork of :func:`_fork_and_hand_off`. So the child opens the stream, admits the
    host keys, reports one byte on a pipe (0: ready; 1: failed, the child
    printed why), then pumps between the stream and its end of the socketpair;
    the parent passes the other end to ssh only after a 0.
    """
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EXIT_FAIL
        try:
            os.close(ready_r)
            handoff.close()
            theirs.close()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.close(null)
            stream = _open_admitted(args, state)
            os.write(ready_w, b"\1" if stream is None else b"\0")
            os.close(ready_w)
            if stream is not None:
                code = _pump(args.host, stream.tls, mine.fileno(), mine.fileno(), local_tuned=True)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    mine.close()
    try:
        status = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    try:
        if status != b"\0":
            return EXIT_FAIL  # the child said why (or died, and Python printed why)
        send_fd(handoff, theirs.fileno())
    except OSError as exc:
        return _fail(args.host, f"cannot pass the connection to ssh: {exc}")
    finally:
        theirs.close()
        handoff.close()
    return EXIT_OK


def _open_admitted(args: NcArgs, state: "NodeState") -> "OpenStream | None":
    """open_stream + admit, as in :func:`_direct`; None after printing the one-line error."""
    from homeport.io.dial import DialError, open_stream
    from homeport.node.hostkeys import TrustError, admit

    try:
        stream = open_stream(state, args.host, args.service, timeout=args.timeout)
    except DialError as exc:
        _fail(args.host, exc.message)
        return None
    except OSError as exc:
        _fail(args.host, f"connection failed: {exc}")
        return None
    peer = stream.opened.peer
    port = stream.opened.port or (int(args.service) if args.service.isdigit() else 22)
    try:
        admit(state.dir, args.host, port, peer.node_id, peer.host_keys)
    except TrustError as exc:
        stream.tls.close()
        _fail(args.host, str(exc))
        return None
    except (ValueError, OSError) as exc:
        stream.tls.close()
        _fail(args.host, f"cannot write known_hosts for {peer.name!r}: {exc}")
        return None
    return stream


def _pump(
    host: str, tls: "TlsStream", plain_in: int, plain_out: int, local_tuned: bool = False
) -> int:
    from homeport.io.pump import PumpEnd, pump

    hangup_r, _hangup_w = _hangup_pipe()
    result = pump(
        tls,
        plain_in,
        plain_out,
        cancel_fd=hangup_r,
        close_on_cancel=True,
        local_tuned=local_tuned,
    )
    if result.ok or result.end in (PumpEnd.LOCAL_ERROR, PumpEnd.CANCELLED):
        return EXIT_OK
    return _fail(host, result.reason)


def _fork_and_hand_off(host: str, tls: "TlsStream", handoff: "_Socket") -> int:
    """ProxyUseFdpass without an agent: a child keeps the TLS stream, ssh gets a socketpair.

    ssh waits for its ProxyCommand to exit (``waitpid``) after it received the
    descriptor, so the pump cannot run in this process. The child pumps between
    the TLS stream and one end of a socketpair; ssh gets the other end. When ssh
    closes it, the child sees EOF, sends close_notify, and exits once the peer
    has finished too. The child stays in ssh's process group (a Ctrl-C or a
    hangup that ends ssh ends it too) and keeps stderr for a one-line error.
    """
    import contextlib
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # ssh writes into it: room for the pump's coalescing (io.pump.tune_socket's sizes)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            theirs.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: pump until the stream ends, never return into main()
        code = EXIT_FAIL
        try:
            handoff.close()
            theirs.close()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)  # let go of ssh's end of its socketpair
            os.dup2(null, 1)
            os.close(null)
            code = _pump(host, tls, mine.fileno(), mine.fileno(), local_tuned=True)
        finally:
            sys.stderr.flush()
            os._exit(code)
    mine.close()
    tls.close()  # the child's copy carries the stream
    try:
        send_fd(handoff, theirs.fileno())
    except OSError as exc:  # the child sees EOF on its end and exits
        return _fail(host, f"cannot pass the connection to ssh: {exc}")
    finally:
        theirs.close()
        handoff.close()
    return EXIT_OK


def _hangup_pipe() -> tuple[int, int]:
    """A pipe that becomes readable on SIGHUP/SIGTERM/SIGINT.

    ssh sends SIGHUP to its ProxyCommand when the session is over, usually
    before our stdin reaches EOF. Turning the signal into a pump cancel (with
    close_on_cancel) sends a close_notify, so the far agent logs a clean end
    instead of a truncated stream.
    """
    import signal

    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signo, _frame: None)
    return r, w


TYPE_CHECKING = False  # mypy reads this name as True; importing typing costs start-up time
if TYPE_CHECKING:
    from _socket import socket as _Socket

    from homeport.io.dial import OpenStream
    from homeport.io.tlsstream import TlsStream
    from homeport.node.state import NodeState
