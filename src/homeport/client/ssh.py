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
    name: str,
    args: list[str],
    state_dir: Path,
    *,
    python: str | None = None,
    ssh: str = "ssh",
    extra: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The argv ``homeport ssh`` execs: options first, then NAME, then the user's args.

    ``extra``: more options (the certificate's IdentityFile/CertificateFile).
    """
    argv = [ssh]
    for key, value in [*ssh_options(state_dir, python), *(extra or [])]:
        argv += ["-o", f"{key}={value}"]
    return [*argv, name, *args]


def exec_ssh(
    name: str, args: list[str], state_dir: Path, extra: list[tuple[str, str]] | None = None
) -> None:
    """Replace this process with ssh (never returns on success)."""
    argv = ssh_argv(name, args, state_dir, extra=extra)
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
