"""The node's state directory: who we are, which server we trust, what we expose.

Layout (``--state DIR``, env ``HOMEPORT_STATE``, default ``~/.local/state/homeport``;
the directory is 0700 because it holds the node's private key)::

    node.json          server "host:port", server pin, node id, name, services
    node.key  (0600)   this node's Ed25519 key (generated here, never sent anywhere)
    node.crt           its certificate, signed by the network CA at enrollment
    ca.crt             the network CA (trust anchor for end-to-end streams)
    known_hosts/<peer> sshd host keys of a peer, written by ``homeport nc``
    profile            the default profile's name (``homeport switch``; absent: "default")
    profiles/<name>/   another network's node: the same layout (``--profile NAME``)

Profiles (several networks on one machine, docs/profiles.md): the state
directory above is the "default" profile, exactly as a single-network install
always had it (nothing moves); ``--profile NAME`` (env ``HOMEPORT_PROFILE``,
else the ``profile`` file) picks ``profiles/NAME`` instead. Each profile is a
complete node — identity, agent socket, agent lock, known_hosts — so two agents
of two profiles run side by side.

Why this module is standard-library only: ``homeport nc`` (run by ``ssh`` for
every connection) loads the state on its hot start-up path. Key generation,
which needs ``cryptography``, lives in :mod:`homeport.node.keys`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from homeport.node.files import safe_dir, write_private
from homeport.policy.services import Service
from homeport.wire import hostkey, names
from homeport.wire.errors import WireError

ENV_STATE = "HOMEPORT_STATE"
ENV_PROFILE = "HOMEPORT_PROFILE"
#: The profile that is the state directory itself (a single-network install).
DEFAULT_PROFILE = "default"
PROFILES_DIR = "profiles"
#: In the base state directory: the name of the default profile (``homeport switch``).
CURRENT_PROFILE_FILE = "profile"
DEFAULT_STATE = "~/.local/state/homeport"
STATE_FILE = "node.json"
KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "ca.crt"
KNOWN_HOSTS_DIR = "known_hosts"
#: One known_hosts file holding every peer's keys, for ssh implementations that cannot
#: expand ``%h`` (paramiko, asyncssh) and for ``ssh -o ProxyCommand=...`` users.
ALL_KNOWN_HOSTS = "ssh_known_hosts"
#: Largest per-peer known_hosts file merged into :data:`ALL_KNOWN_HOSTS` (bigger: skipped).
MAX_PEER_KNOWN_HOSTS = 64 * 1024
#: node.json is tiny; refuse to parse anything absurd (a corrupted or foreign file).
MAX_STATE_FILE = 1024 * 1024
#: Most host key lines we write for one peer (the wire rule's limit).
MAX_HOST_KEYS = hostkey.MAX_HOST_KEYS

ENROLL_HINT = "run HOMEPORT_AUTHKEY=KEY homeport up --server HOST:PORT --name NAME"


class StateError(Exception):
    """The state directory is missing, unreadable or malformed (message is user-facing)."""


class NotEnrolled(StateError):
    """This state directory holds no enrolled node yet."""


class NoSuchProfile(NotEnrolled):
    """The chosen profile does not exist (a typo in ``--profile``/$HOMEPORT_PROFILE, most
    likely): said as such, not as "not enrolled" with an invitation to enroll a new network.
    A :class:`NotEnrolled` still, so ``homeport up`` creates the profile as before."""


@dataclass(frozen=True, slots=True)
class NodeState:
    """An enrolled node, as loaded from ``node.json`` plus the paths of its PEM files."""

    dir: Path
    server: str  # "host:port" as given to ``up --server``
    server_pin: str  # "sha256:<hex>" of the server's TLS certificate
    node_id: str
    name: str
    services: tuple[Service, ...] = field(default=())

    @property
    def key_path(self) -> Path:
        return self.dir / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.dir / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_FILE

    @property
    def known_hosts_dir(self) -> Path:
        return self.dir / KNOWN_HOSTS_DIR

    def server_address(self) -> tuple[str, int]:
        return parse_server(self.server)

    def with_services(self, services: tuple[Service, ...]) -> NodeState:
        return replace(self, services=services)


def parse_server(text: str, default_port: int = 8443) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); the port defaults to 8443.

    Raises:
        ValueError: with a user-facing message.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty server address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad server address {text!r}")
        port_text = rest.removeprefix(":") if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad server address {text!r}: no host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad server address {text!r}: {port_text!r} is not a port") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad server address {text!r}: port out of range")
    return host, port


def base_dir(arg: str | os.PathLike[str] | None = None) -> Path:
    """The base state directory (the "default" profile's): ``--state``, $HOMEPORT_STATE,
    else the default."""
    raw = os.fspath(arg) if arg else os.environ.get(ENV_STATE) or DEFAULT_STATE
    return Path(raw).expanduser().absolute()


def profile_problem(name: str) -> str | None:
    """Why ``name`` cannot name a profile (it becomes an ssh host suffix: ``labpc.NAME``)."""
    problem = names.node_name_problem(name)
    return None if problem is None else f"bad profile name: {problem}"


def current_profile(base: Path) -> str:
    """The default profile of ``base``: its ``profile`` file, else "default"."""
    try:
        with open(base / CURRENT_PROFILE_FILE, "rb") as f:
            name = f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return DEFAULT_PROFILE
    return name if name and profile_problem(name) is None else DEFAULT_PROFILE


def chosen_profile(base: Path, profile: str | None = None) -> str:
    """``profile``, else $HOMEPORT_PROFILE, else :func:`current_profile`.

    Raises:
        StateError: a bad profile name.
    """
    name = profile or os.environ.get(ENV_PROFILE) or current_profile(base)
    problem = profile_problem(name)
    if problem is not None:
        raise StateError(problem)
    return name


def profile_dir(base: Path, name: str) -> Path:
    """Where profile ``name`` of ``base`` keeps its node."""
    return base if name == DEFAULT_PROFILE else base / PROFILES_DIR / name


def resolve_dir(arg: str | os.PathLike[str] | None = None, profile: str | None = None) -> Path:
    """The state directory of the chosen profile (:func:`chosen_profile`) under
    :func:`base_dir`; without profiles that is the base directory itself, as always.

    Raises:
        StateError: a bad profile name (from the command line or the environment).
    """
    base = base_dir(arg)
    return profile_dir(base, chosen_profile(base, profile))


def list_profiles(base: Path) -> list[str]:
    """ "default" and every ``profiles/<name>`` directory (valid names only), sorted after it."""
    found = [DEFAULT_PROFILE]
    try:
        entries = sorted(os.listdir(base / PROFILES_DIR))
    except OSError:
        entries = []
    found += [
        e
        for e in entries
        if e != DEFAULT_PROFILE
        and profile_problem(e) is None
        and (base / PROFILES_DIR / e).is_dir()
    ]
    return found


def no_profile_message(base: Path, name: str) -> str:
    """What a command says for a profile that does not exist (``up --profile`` creates one)."""
    known = ", ".join(list_profiles(base))
    return f"no profile {name!r} (profiles: {known}); create it with 'homeport up --profile'"


def _missing_profile(state_dir: Path) -> NoSuchProfile | None:
    """``state_dir`` is ``<base>/profiles/<name>`` and no such directory exists."""
    if state_dir.parent.name != PROFILES_DIR or state_dir.is_dir():
        return None
    return NoSuchProfile(no_profile_message(state_dir.parent.parent, state_dir.name))


def set_current_profile(base: Path, name: str) -> None:
    """Make ``name`` the default profile (``homeport switch``)."""
    ensure_dir(base)
    if name == DEFAULT_PROFILE:
        (base / CURRENT_PROFILE_FILE).unlink(missing_ok=True)
    else:
        write_private(base / CURRENT_PROFILE_FILE, (name + "\n").encode())


def ensure_dir(path: Path) -> Path:
    """Create the state directory (0700) if needed, or check it (:func:`files.safe_dir`:
    another user's or a group/other-writable directory is refused, not chmodded)."""
    return safe_dir(path)


def _service_from_json(obj: Any) -> Service:
    if not isinstance(obj, dict):
        raise StateError("node.json: a service is not an object")
    try:
        return Service(
            name=str(obj["name"]),
            port=int(obj["port"]),
            target_host=str(obj["target_host"]),
            target_port=int(obj["target_port"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"node.json: malformed service {obj!r}") from exc


def load(state_dir: Path) -> NodeState:
    """Load an enrolled node.

    Raises:
        NoSuchProfile: ``state_dir`` is a profile's and the profile does not exist.
        NotEnrolled: no node.json or no key/certificate (message says how to enroll).
        StateError: the files exist but are malformed.
    """
    path = state_dir / STATE_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        missing = _missing_profile(state_dir)
        if missing is not None:
            raise missing from None
        raise NotEnrolled(f"not enrolled ({state_dir}): {ENROLL_HINT}") from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_STATE_FILE:
        raise StateError(f"{path} is too large to be a homeport state file")
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        services = obj.get("services") or []
        if not isinstance(services, list):
            raise TypeError("services is not a list")
        state = NodeState(
            dir=state_dir,
            server=str(obj["server"]),
            server_pin=str(obj["server_pin"]),
            node_id=str(obj["node_id"]),
            name=str(obj["name"]),
            services=tuple(_service_from_json(s) for s in services),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path} is malformed ({exc}); remove it and enroll again") from exc
    for p in (state.key_path, state.cert_path, state.ca_path):
        if not p.exists():
            raise NotEnrolled(f"not enrolled ({p} is missing): {ENROLL_HINT}")
    return state


def load_services(state_dir: Path) -> tuple[Service, ...]:
    """The services saved in node.json, or () when there is none yet."""
    try:
        return load(state_dir).services
    except StateError:
        return ()


def save(state: NodeState) -> None:
    """Write node.json atomically (the PEM files are written by enrollment)."""
    ensure_dir(state.dir)
    obj = {
        "server": state.server,
        "server_pin": state.server_pin,
        "node_id": state.node_id,
        "name": state.name,
        "services": [
            {
                "name": s.name,
                "port": s.port,
                "target_host": s.target_host,
                "target_port": s.target_port,
            }
            for s in state.services
        ],
    }
    write_private(state.dir / STATE_FILE, (json.dumps(obj, indent=2) + "\n").encode())


# -- known_hosts ----------------------------------------------------------------


def sanitize_host_key(line: str) -> str:
    """Return ``"type base64"`` for a host key line, or raise ValueError.

    Host keys come from the server (which got them from the peer agent), so they
    are untrusted text that ends up in a file ssh parses: only a real OpenSSH
    public key passes (:func:`homeport.wire.hostkey.parse_host_key_untrusted`).
    """
    try:
        return hostkey.parse_host_key_untrusted(line).line()
    except WireError as exc:
        raise ValueError(str(exc)) from None


def _require(text: str, problem: str | None) -> str:
    if problem is not None:
        raise ValueError(problem)
    return text


def check_host_name(host: str) -> str:
    """Validate a peer name used as a file name and a known_hosts pattern.

    Raises:
        ValueError: :func:`homeport.wire.names.host_name_problem`'s reason.
    """
    return _require(host, names.host_name_problem(host))


def render_known_hosts(host: str, port: int, host_keys: tuple[str, ...] | list[str]) -> str:
    """The known_hosts file for peer ``host`` (what ssh checks with StrictHostKeyChecking).

    ssh looks keys up as ``host`` for port 22 and ``[host]:port`` otherwise.

    Raises:
        ValueError: a bad host name or host key (never write a partial file).
    """
    check_host_name(host)
    if len(host_keys) > MAX_HOST_KEYS:
        raise ValueError(f"more than {MAX_HOST_KEYS} host keys")
    keys = [sanitize_host_key(k) for k in host_keys]
    lines = [f"{host} {k}" for k in keys]
    if port != 22:
        lines += [f"[{host}]:{port} {k}" for k in keys]
    return "".join(line + "\n" for line in lines)


def write_known_hosts(
    state_dir: Path, host: str, port: int, host_keys: tuple[str, ...] | list[str]
) -> Path:
    """Atomically replace ``known_hosts/<host>`` with the peer's current host keys."""
    text = render_known_hosts(host, port, host_keys)
    kh = state_dir / KNOWN_HOSTS_DIR
    kh.mkdir(mode=0o700, exist_ok=True)
    path = kh / host
    write_private(path, text.encode())
    rebuild_known_hosts(state_dir)
    return path


def rebuild_known_hosts(state_dir: Path) -> Path:
    """Rewrite ``<state>/ssh_known_hosts`` from every ``known_hosts/<peer>`` file.

    Under a lock: each writer's own per-peer file exists before it takes the
    lock, so whichever rebuild renames last includes every file written so far.
    """
    import fcntl

    kh = state_dir / KNOWN_HOSTS_DIR
    out = state_dir / ALL_KNOWN_HOSTS
    fd = os.open(
        state_dir / (ALL_KNOWN_HOSTS + ".lock"),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        parts: list[bytes] = []
        for entry in sorted(os.listdir(kh)) if kh.is_dir() else []:
            if names.host_name_problem(entry) is not None:
                continue  # temporary files and strays
            try:
                with open(kh / entry, "rb") as f:
                    data = f.read(MAX_PEER_KNOWN_HOSTS + 1)
            except OSError:
                continue
            if len(data) <= MAX_PEER_KNOWN_HOSTS:
                parts.append(data)
        write_private(out, b"".join(parts))
    finally:
        os.close(fd)
    return out


def check_node_name(name: str) -> str:
    """Validate a node name before asking the server (it re-checks: ``bad-name``).

    Raises:
        ValueError: :func:`homeport.wire.names.node_name_problem`'s reason.
    """
    return _require(name, names.node_name_problem(name))
