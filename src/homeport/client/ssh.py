"""``homeport ssh NAME [ssh args…]`` and ``homeport ssh-config``: plain OpenSSH, routed.

Both produce the same five options:

* ``ProxyCommand <python> -I -S <homeport>/ncfast.py --state <abs state> --fdpass %h %p``
  — the current interpreter, so a virtualenv install works without ``homeport`` on
  PATH, started without ``site`` because nc needs only the standard library (see
  :mod:`homeport.ncfast`; it saves the ``.pth``/site-packages scan on every ssh);
* ``ProxyUseFdpass yes`` (OpenSSH ≥ 6.5) — nc hands ssh a connected socket and
  exits instead of relaying every byte through itself: with a local agent
  running, ssh then talks straight to the agent's pump, and nc's life is a few
  milliseconds of start-up. ``--fdpass`` tells nc to expect this (see
  :mod:`homeport.client.nc`; without ProxyUseFdpass it just copies, as before);
* ``UserKnownHostsFile <state>/ssh_known_hosts`` — ``nc`` writes the peer's host
  keys (vouched for by the server, pinned, checked end to end) to
  ``known_hosts/<peer>`` and merges every peer's file into this one before ssh
  reads a byte. One file without ``%h`` tokens, because paramiko and asyncssh
  cannot expand them (they failed to connect with the per-peer form);
* ``StrictHostKeyChecking yes`` — no trust-on-first-use prompt, no silent change;
* ``UpdateHostKeys no`` — ssh must not add keys to a file ``nc`` owns.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from homeport.node.state import ALL_KNOWN_HOSTS
from homeport.wire.names import node_name_problem

#: The file ``ssh-config --install`` writes, and the line it puts atop ~/.ssh/config.
INCLUDE_FILE = "homeport.conf"
INCLUDE_LINE = "Include ~/.ssh/homeport.conf"
#: The precheck Match blocks (OpenSSH only), included from the top of :data:`INCLUDE_FILE`.
#: A file of its own because paramiko runs ``Match exec`` through ``invoke`` (and fails
#: without it), while it ignores ``Include``: homeport.conf stays portable.
CHECK_FILE = "homeport-check.conf"


def package_root() -> str:
    """The directory that contains the ``homeport`` package (for PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


def needs_pythonpath() -> bool:
    """True when homeport is importable only thanks to $PYTHONPATH (a source checkout)."""
    root = package_root()
    return root in os.environ.get("PYTHONPATH", "").split(os.pathsep)


def proxy_command(state_dir: Path, python: str | None = None, *, fdpass: bool = True) -> str:
    """The ProxyCommand: works from an install, a venv or a source checkout alike.

    ``fdpass`` adds ``--fdpass``, which goes with ``ProxyUseFdpass yes``; it is
    harmless without it (nc sees a pipe on stdout and copies). ``--profile default``
    pins ``state_dir`` itself (a profile's own directory, see :mod:`homeport.node.state`),
    whatever $HOMEPORT_PROFILE or ``homeport switch`` say when ssh runs.
    """
    exe = python or sys.executable
    launcher = Path(package_root()) / "homeport" / "ncfast.py"
    words = [shlex.quote(exe), "-I", "-S", shlex.quote(str(launcher))]
    words += ["--state", shlex.quote(str(state_dir)), "--profile", "default"]
    if fdpass:
        words.append("--fdpass")
    return " ".join([*words, "%h", "%p"])


def check_command(state_dir: Path, python: str | None = None, suffix: str = "") -> str:
    """The precheck ``Match … !exec`` runs: ``nc --check`` (see :mod:`homeport.client.precheck`).

    ``suffix``: the profile suffix (``.work``) the check strips from ``%h`` (ssh
    expands ``%h`` in ``Match exec`` to the name as typed, before ``Hostname``).
    """
    words = proxy_command(state_dir, python, fdpass=False).split(" ")[:-2]
    words.append("--check")
    if suffix:
        words += ["--suffix", shlex.quote(suffix)]
    return " ".join([*words, "%h", "%p"])


def precheck_block(
    hosts: list[str], state_dir: Path, python: str | None = None, suffix: str = ""
) -> list[str]:
    """``Match originalhost … !exec "nc --check"``: when the check fails (it printed its
    one line), ssh runs quietly into a ProxyCommand that fails: no OpenSSH noise after
    homeport's reason. Must come before the Host block (ssh keeps the first value)."""
    cmd = check_command(state_dir, python, suffix)
    quote_config(cmd)  # refuses control characters and double quotes
    return [
        "# homeport: say why a node cannot be reached, without OpenSSH's follow-up noise",
        "Match originalhost " + ",".join(hosts) + f' !exec "{cmd}"',
        "    LogLevel QUIET",
        "    ProxyCommand false",
    ]


def precheck_text(
    names: list[str], state_dir: Path, *, python: str | None = None, suffix: str = ""
) -> str:
    """The precheck block alone (for :data:`CHECK_FILE`); "" when there is no node.

    Raises:
        ConfigError: as :func:`ssh_config_block`.
    """
    good, problems = safe_names(names)
    if problems:
        raise ConfigError(problems[0])
    if not good:
        return ""
    return "\n".join(precheck_block([n + suffix for n in good], state_dir, python, suffix)) + "\n"


# -- where ``homeport ssh``'s destination is among ssh's own arguments -------------------

#: ssh(1)'s options that take an argument (``man ssh``, OpenSSH 9.x: -B -b -c -D -E -e -F
#: -I -i -J -L -l -m -O -o -P -p -Q -R -S -W -w). ``-P tag`` is OpenSSH 9.4's; older ones
#: took ``-P`` without an argument and ignored it, so nobody passes it to those.
SSH_OPTIONS_WITH_ARG = frozenset("BbcDEeFIiJLlmOoPpQRSWw")
#: ssh(1)'s flags (``-1``/``-2`` are accepted and ignored by current OpenSSH).
SSH_FLAGS = frozenset("1246AaCfGgKkMNnqsTtVvXxYy")
URI_SCHEME = "ssh://"


class SshArgsError(ValueError):
    """ssh's arguments cannot be parsed as ssh would (message is one line for the user)."""


@dataclass(frozen=True)
class SshCommandLine:
    """ssh's arguments split around the destination, the way OpenSSH reads them.

    ssh takes options before the destination and after it, up to the first other word (the
    remote command) or ``--``. Where a setting comes several times the first one wins,
    the destination's ``user@``/``:port`` counting at its place: ``-l a b@h`` logs in as
    a, ``b@h -l a`` as b (what ``ssh -G`` prints). Why homeport needs it: to find the node
    (``-i KEY labpc`` is not a node called ``-i``), its port for the precheck, and the
    login for the certificate.
    """

    before: tuple[str, ...]  #: everything ahead of the destination, untouched
    destination: str  #: as given: ``[user@]host`` or ``ssh://[user@]host[:port]``
    after: tuple[str, ...]  #: later options and the remote command, untouched
    host: str
    user: str | None  #: the login ssh will use, when the command line says
    port: str | None  #: the port ssh will ask for, when the command line says
    own: tuple[tuple[str, str | None], ...] = ()  #: homeport's options found among ssh's

    def argv(self) -> list[str]:
        return [*self.before, self.destination, *self.after]

    def with_host(self, host: str) -> SshCommandLine:
        """The same command line to ``host`` (a profile suffix taken off), user/port kept."""
        dest = self.destination
        if dest.startswith(URI_SCHEME):
            rest = dest[len(URI_SCHEME) :]
            userinfo, at, hostport = rest.rpartition("@")
            _, colon, port = hostport.partition(":")
            dest = f"{URI_SCHEME}{userinfo}{at}{host}{colon}{port}"
        else:
            user, at, _ = dest.rpartition("@")
            dest = f"{user}{at}{host}"
        return replace(self, destination=dest, host=host)


def _split_destination(dest: str) -> tuple[str | None, str, str | None]:
    """(user, host, port) of ``[user@]host`` or ``ssh://[user@]host[:port]``."""
    port = None
    rest = dest
    if dest.startswith(URI_SCHEME):
        rest = dest[len(URI_SCHEME) :]
        userinfo, at, hostport = rest.rpartition("@")
        host, colon, port_text = hostport.partition(":")
        port = port_text if colon else None
        rest = f"{userinfo}{at}{host}"
    user, at, host = rest.rpartition("@")
    return (user if at else None), host, port


def _option_setting(value: str) -> tuple[str, str]:
    """``-o Port=2222`` / ``-o "Port 2222"`` -> ("port", "2222") (ssh_config's two forms)."""
    text = value.strip()
    cut = min((i for i in (text.find("="), text.find(" "), text.find("\t")) if i >= 0), default=-1)
    if cut < 0:
        return text.lower(), ""
    return text[:cut].strip().lower(), text[cut + 1 :].strip(" \t=")


def parse_ssh_args(args: list[str], own: Mapping[str, bool] | None = None) -> SshCommandLine:
    """Find the destination in ssh's arguments (OpenSSH's getopt rules, see
    :class:`SshCommandLine`): bundled flags (``-vv``), an argument attached (``-p2222``,
    ``-oPort=2222``) or the next word (``-i KEY``), ``--`` ending the options.

    ``own``: ``homeport ssh``'s long options (name -> takes a value), also taken where
    ssh's options may be (``homeport ssh labpc --user ubuntu``: ssh has no long options,
    so they cannot be ssh's); they come back in ``SshCommandLine.own``, not in its argv.

    Raises:
        SshArgsError: no destination, an option without its argument, an unknown option.
    """
    own = own or {}
    user: str | None = None
    port: str | None = None
    found: tuple[int, str] | None = None
    mine: list[tuple[str, str | None]] = []
    taken: set[int] = set()  # indexes of homeport's own options (not passed to ssh)
    i, options = 0, True
    while i < len(args):
        start = i
        arg = args[i]
        i += 1
        if options and arg == "--":
            options = False
            if found is not None:
                break  # ends the options after the destination: the rest is the command
            continue
        if not options or not arg.startswith("-") or arg == "-":
            if found is not None:
                break  # the remote command starts here
            found = (i - 1, arg)
            d_user, _, d_port = _split_destination(arg)
            user = user if user is not None else d_user
            port = port if port is not None else d_port
            continue
        if arg.startswith("--"):  # ssh has no long options: one of homeport's (after NAME)
            name, eq, value = arg.partition("=")
            if name not in own:
                raise SshArgsError(
                    f"ssh has no option {name} (and homeport ssh neither; see: homeport ssh "
                    "--help, man ssh)"
                )
            if own[name] and not eq:
                if i >= len(args):
                    raise SshArgsError(f"{name} needs a value")
                value = args[i]
                i += 1
            elif not own[name] and eq:
                raise SshArgsError(f"{name} takes no value")
            mine.append((name, value if own[name] else None))
            taken.update(range(start, i))
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in SSH_FLAGS:
                j += 1
                continue
            if letter not in SSH_OPTIONS_WITH_ARG:
                raise SshArgsError(f"unknown ssh option -{letter} (see: man ssh)")
            value = arg[j + 1 :]
            if not value:
                if i >= len(args):
                    raise SshArgsError(f"ssh option -{letter} needs an argument (see: man ssh)")
                value = args[i]
                i += 1
            if letter == "l" and user is None:
                user = value
            elif letter == "p" and port is None:
                port = value
            elif letter == "o":
                key, val = _option_setting(value)
                if key == "user" and user is None:
                    user = val
                elif key == "port" and port is None:
                    port = val
            break
    if found is None:
        raise SshArgsError("no NAME to connect to: homeport ssh [OPTIONS] [SSH OPTIONS] NAME [CMD]")
    at, dest = found
    _, host, _ = _split_destination(dest)
    return SshCommandLine(
        before=tuple(a for k, a in enumerate(args[:at]) if k not in taken),
        destination=dest,
        after=tuple(a for k, a in enumerate(args[at + 1 :], at + 1) if k not in taken),
        host=host,
        user=user,
        port=port,
        own=tuple(mine),
    )


def ssh_options(state_dir: Path, python: str | None = None) -> list[tuple[str, str]]:
    """The (keyword, value) pairs that route ssh through homeport."""
    kh = state_dir / ALL_KNOWN_HOSTS
    return [
        ("ProxyCommand", proxy_command(state_dir, python)),
        ("ProxyUseFdpass", "yes"),
        ("UserKnownHostsFile", str(kh)),
        ("StrictHostKeyChecking", "yes"),
        ("UpdateHostKeys", "no"),
    ]


def ssh_argv(
    args: list[str],
    state_dir: Path,
    *,
    python: str | None = None,
    ssh: str = "ssh",
    extra: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The argv ``homeport ssh`` execs: homeport's options first (ssh keeps the first value
    it gets, so they win), then the user's ssh arguments with NAME among them, as given.

    ``extra``: more options (the certificate's IdentityFile/CertificateFile).
    """
    argv = [ssh]
    for key, value in [*ssh_options(state_dir, python), *(extra or [])]:
        argv += ["-o", f"{key}={value}"]
    return [*argv, *args]


def exec_ssh(args: list[str], state_dir: Path, extra: list[tuple[str, str]] | None = None) -> None:
    """Replace this process with ssh (never returns on success)."""
    argv = ssh_argv(args, state_dir, extra=extra)
    os.execvp(argv[0], argv)  # noqa: S606 - exec ssh, no shell


class ConfigError(ValueError):
    """Something cannot be written into an ssh config safely (message is for the user)."""


def quote_config(value: str) -> str:
    """``value`` as one ssh_config argument: double-quoted when it holds spaces.

    ssh_config has no escape for ``"`` and ends a line at a newline, so a value
    with either (or any control character) is refused rather than written.
    """
    if any(c == '"' or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"cannot put {value[:80]!r} into an ssh config (quote or control char)")
    return f'"{value}"' if any(c.isspace() for c in value) or not value else value


def safe_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(valid node names, problems): a name from the server goes into a ``Host`` line only
    if it is a node name (a compromised server once added ``Host *`` + ``ProxyCommand``)."""
    good: list[str] = []
    problems: list[str] = []
    for name in names:
        problem = node_name_problem(name)
        if problem is None:
            good.append(name)
        else:
            problems.append(problem)
    return good, problems


def ssh_config_block(
    names: list[str],
    state_dir: Path,
    *,
    python: str | None = None,
    certs: bool = False,
    precheck: bool = True,
    suffix: str = "",
) -> str:
    """A ``Host`` block for ~/.ssh/config covering ``names`` (the network's nodes).

    ``certs``: add a ``Match … exec`` block that fetches a fresh key and SSH
    certificate (``homeport ssh-cert``) before every login and points ssh at
    them; if the server refuses, the exec fails and ssh uses the user's own keys.

    Raises:
        ConfigError: a name is not a node name, or a value cannot be quoted safely.
    """
    good, problems = safe_names(names)
    if problems:
        raise ConfigError(problems[0])
    if not good:
        return "# no nodes in this homeport network yet\n"
    hosts = [n + suffix for n in good]
    lines = [f"# homeport: nodes of this network (state {quote_config(str(state_dir))})"]
    if precheck:
        lines += precheck_block(hosts, state_dir, python, suffix)
    if suffix:  # labpc.work -> labpc: ssh, nc and known_hosts see the node's own name
        for name, host in zip(good, hosts, strict=True):
            lines += [f"Host {host}", f"    Hostname {name}"]
    lines.append("Host " + " ".join(hosts))
    for key, value in ssh_options(state_dir, python):
        if key == "ProxyCommand":  # run by a shell: proxy_command() shell-quoted each word
            quote_config(value)  # refuses control characters all the same
            lines.append(f"    {key} {value}")
        else:
            lines.append(f"    {key} {quote_config(value)}")
    if certs:
        lines += cert_match_block(hosts, state_dir, python)
    return "\n".join(lines) + "\n"


def cert_match_block(names: list[str], state_dir: Path, python: str | None = None) -> list[str]:
    """``Match host … exec "homeport ssh-cert …"`` + IdentityFile/CertificateFile lines.

    The exec runs while ssh reads its config, before authentication: it writes
    the key and certificate to fixed per-(node, account) paths
    (``homeport.client.login.key_paths``), which the two lines then name.
    """
    from homeport.client.login import SSH_KEYS_DIR

    exe = python or sys.executable
    cmd = " ".join(
        [
            shlex.quote(exe),
            "-m",
            "homeport",
            "ssh-cert",
            "--quiet",
            "--state",
            shlex.quote(str(state_dir)),
            "--profile",
            "default",
            "--user",
            "%r",
            "%n",
        ]
    )
    base = state_dir / SSH_KEYS_DIR
    return [
        "Match host " + ",".join(names) + f' exec "{cmd}"',
        f"    IdentityFile {quote_config(str(base / '%n_%r'))}",
        f"    CertificateFile {quote_config(str(base / '%n_%r-cert.pub'))}",
    ]


def include_line(home: Path, login_home: Path) -> str:
    """:data:`INCLUDE_LINE`, or its absolute form when ``$HOME`` is not the login's home
    (ssh expands ``~`` from the password database, not from ``$HOME``)."""
    if home == login_home:
        return INCLUDE_LINE
    return f"Include {quote_config(str(home / '.ssh' / INCLUDE_FILE))}"


def add_include(config_text: str, line: str = INCLUDE_LINE) -> str | None:
    """``config_text`` with ``line`` first; None when an Include of our file is there.

    First, because ssh takes the first value it finds for each option: an
    ``Include`` appended after a ``Host *`` that sets known-hosts options would lose.
    """
    for existing in config_text.splitlines():
        words = existing.split()
        ours = any(w.strip('"').endswith("/.ssh/" + INCLUDE_FILE) for w in words[1:])
        if words and words[0].lower() == "include" and ours:
            return None
    return f"# added by homeport ssh-config --install\n{line}\n\n" + config_text


def ssh_config_json(names: list[str], state_dir: Path, *, python: str | None = None) -> str:
    return json.dumps(
        {
            "hosts": names,
            "options": dict(ssh_options(state_dir, python)),
        },
        indent=2,
    )
