"""A node's settings: what it exposes (``homeport set``, ``up --ssh/--expose``) and how it
reaches its server (``up --proxy/--tls-data``, ``HTTPS_PROXY``).

Why a pure decision: the first version of ``up --expose web=…`` *replaced* the
saved services, so a user adding Jupyter to a remote lab PC silently stopped
exposing ssh and locked themselves out. Changes now add and remove by name, and
a change that would leave no ssh on a node that had it (the way back in) is
refused unless the user asked for exactly that with ``--force``.

The exit-node setting (``--advertise-exit``) is kept here too, in its own file
(:data:`EXIT_FILE`); see docs/exit-nodes.md.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from homeport.node.files import write_private
from homeport.policy import exitnet
from homeport.policy.services import SSH_NAME, Service
from homeport.wire.httpconnect import ProxyURL, no_proxy_matches, parse_proxy_url


class ChangeVerdict(enum.Enum):
    """What :func:`apply_changes` decided (stable strings for ``--json``)."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class ServiceChange:
    """The outcome: the new service list (the old one when refused) and why."""

    verdict: ChangeVerdict
    services: tuple[Service, ...]
    reason: str


def describe(services: tuple[Service, ...]) -> str:
    """``ssh=127.0.0.1:22, web=127.0.0.1:8888`` (or ``nothing``)."""
    return ", ".join(f"{s.name}={s.target_host}:{s.target_port}" for s in services) or "nothing"


def apply_changes(
    current: tuple[Service, ...],
    *,
    add: tuple[Service, ...] = (),
    remove: tuple[str, ...] = (),
    force: bool = False,
) -> ServiceChange:
    """``current`` with ``remove`` (names) taken out and ``add`` put in (same name: replaced).

    Refused: removing a name that is not exposed (a typo must not pass for
    success), and dropping ssh without ``force``.
    """
    names_now = {s.name for s in current}
    unknown = [n for n in remove if n not in names_now and n not in {s.name for s in add}]
    if unknown:
        return ServiceChange(
            ChangeVerdict.REFUSED,
            current,
            f"not exposed: {', '.join(unknown)} (exposed now: {describe(current)})",
        )
    by_name = {s.name: s for s in current if s.name not in remove}
    for svc in add:
        by_name[svc.name] = svc
    new = tuple(by_name.values())
    if SSH_NAME in names_now and SSH_NAME not in by_name and not force:
        return ServiceChange(
            ChangeVerdict.REFUSED,
            current,
            "this would stop exposing ssh, the way back into this node; "
            "add --force if that is what you want",
        )
    if new == current:
        return ServiceChange(ChangeVerdict.UNCHANGED, current, f"exposing {describe(current)}")
    return ServiceChange(ChangeVerdict.CHANGED, new, f"exposing {describe(new)}")


# -- exit node settings (``--advertise-exit``) ----------------------------------------------

#: The file (in the state directory) that keeps ``--advertise-exit``; absent = not an exit.
EXIT_FILE = "exit.json"
#: exit.json is tiny; anything bigger is not ours.
MAX_EXIT_FILE = 64 * 1024


class ExitSettingsError(Exception):
    """exit.json is unreadable or malformed (the message is user-facing)."""


def load_exit(state_dir: Path) -> tuple[str, ...]:
    """The exit networks saved for this node (``()``: not an exit node).

    Why a file of its own rather than node.json: ``homeport nc`` reads node.json
    on every ssh connection, and the exit setting is the agent's business only.

    Raises:
        ExitSettingsError: the file exists but is not a list of networks.
    """
    path = state_dir / EXIT_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_EXIT_FILE + 1)
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise ExitSettingsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if len(raw) > MAX_EXIT_FILE:
            raise ValueError("file too large")
        obj = json.loads(raw)
        nets = obj.get("exit") if isinstance(obj, dict) else None
        if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
            raise ValueError("'exit' is not a list of networks")
        if not nets:
            return ()
        return exitnet.parse_exit_spec(",".join(nets))
    except ValueError as exc:
        raise ExitSettingsError(
            f"{path}: {exc}; fix it with homeport set --advertise-exit"
        ) from None


def save_exit(state_dir: Path, nets: tuple[str, ...]) -> None:
    """Keep ``nets`` as this node's exit networks (``()``: stop being an exit node)."""
    data = json.dumps({"exit": list(nets)}, indent=2).encode() + b"\n"
    write_private(state_dir / EXIT_FILE, data)


# -- how this node reaches its server: an HTTP CONNECT proxy, TLS-wrapped data ---------

#: File in the state directory holding the network settings ``up --proxy/--tls-data`` saved
#: (0600: a proxy URL may carry a password).
NETWORK_FILE = "network.json"
#: Longest network.json we read.
MAX_NETWORK_FILE = 4 * 1024
#: Environment: a proxy URL for every homeport command (beats the node's saved one);
#: ``off``/``none``/``direct`` means no proxy at all, whatever else says.
ENV_PROXY = "HOMEPORT_PROXY"
#: Environment: ``on``/``off``/``auto`` for TLS-wrapped data connections (beats the saved one).
ENV_TLS_DATA = "HOMEPORT_TLS_DATA"
NO_PROXY_WORDS = frozenset({"off", "none", "direct"})
#: Environment: the password for ``up --proxy http://USER@HOST:PORT`` (or for the saved
#: proxy's user), so that it is not on the command line, where ``ps`` shows it to everyone.
ENV_PROXY_PASSWORD = "HOMEPORT_PROXY_PASSWORD"  # noqa: S105 - a variable's name
#: ``up --proxy-password-file``: read at most this much (a password is 1..MAX_CREDENTIAL).
MAX_PASSWORD_FILE = 1024


def proxy_has_password(url: str) -> bool:
    """Whether a ``--proxy`` URL carries a password (``ps`` shows it: ``up`` warns)."""
    try:
        return bool(parse_proxy_url(url).password)
    except ValueError:
        return False


def proxy_with_password(url: str, password: str, source: str) -> str:
    """``url`` (``http://USER@HOST:PORT``) with ``password`` from ``source`` added: the URL
    to save in network.json (0600). Why a separate way in: an argument is visible in
    ``ps`` to every user of the machine for as long as ``up`` runs.

    Raises:
        ValueError: one line: a bad URL, no user to give the password to, a password given
            twice, an empty or too long one.
    """
    from dataclasses import replace

    from homeport.wire.httpconnect import MAX_CREDENTIAL

    proxy = parse_proxy_url(url)
    if proxy.user is None:
        raise ValueError(
            f"a proxy password from {source} needs the user name in the proxy URL: "
            "--proxy http://USER@HOST:PORT"
        )
    if proxy.password:
        raise ValueError(f"the proxy password is given twice: in the URL and in {source}")
    if not password or len(password) > MAX_CREDENTIAL:
        raise ValueError(f"the proxy password in {source} must be 1-{MAX_CREDENTIAL} characters")
    return replace(proxy, password=password).url()


class TlsData(enum.Enum):
    """Whether data connections to the server are wrapped in TLS (``--tls-data``).

    ``AUTO`` (the default) wraps exactly when a proxy is used. Why: the networks
    that force an HTTP proxy are the ones whose proxies and firewalls inspect what
    goes through the tunnel (TLS interception appliances refuse a CONNECT tunnel
    whose first bytes are not a ClientHello), and a node behind such a proxy
    cannot find out in advance which kind it has; the price (the server
    decrypts and re-encrypts that node's relayed bytes, docs/proxy.md) is paid
    only by the nodes that need it. ``ON`` also wraps without a proxy (a
    firewall that allows only TLS on 443); ``OFF`` never wraps (a plain proxy
    that does not inspect, when the relay's CPU matters).
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """What ``homeport up --proxy/--tls-data`` saved (``proxy`` is a URL, or "off", or None)."""

    proxy: str | None = None
    tls_data: TlsData = TlsData.AUTO


@dataclass(frozen=True, slots=True)
class Route:
    """How to reach the server, decided by :func:`choose_route` (``reason`` for ``-v`` logs)."""

    proxy: ProxyURL | None
    tls_data: bool
    reason: str


def choose_route(saved: NetworkSettings, env: Mapping[str, str], server_host: str) -> Route:
    """The route to ``server_host``: proxy (or none) and whether data connections are wrapped.

    Proxy precedence: ``HOMEPORT_PROXY``, then the node's saved ``--proxy``, then
    ``HTTPS_PROXY``/``https_proxy`` unless ``NO_PROXY``/``no_proxy`` excludes the
    server or the server is on loopback (the saved and HOMEPORT_PROXY settings are
    explicit, so neither exception applies to them). ``off`` at any of the explicit
    levels means direct.

    Raises:
        ValueError: a malformed proxy URL (one line, naming where it came from).
    """
    explicit = env.get(ENV_PROXY, "").strip()
    source = ENV_PROXY
    if not explicit and saved.proxy:
        explicit, source = saved.proxy, "the node's --proxy"
    proxy: ProxyURL | None = None
    why: str
    if explicit:
        if explicit.lower() in NO_PROXY_WORDS:
            why = f"direct ({source} is {explicit!r})"
        else:
            proxy = _parse(explicit, source)
            why = f"through proxy {proxy} ({source})"
    else:
        name = "HTTPS_PROXY" if env.get("HTTPS_PROXY") else "https_proxy"
        from_env = env.get(name, "").strip()
        no_proxy = env.get("NO_PROXY", "") or env.get("no_proxy", "")
        if not from_env:
            why = "direct (no proxy configured)"
        elif no_proxy_matches(no_proxy, server_host):
            why = f"direct (NO_PROXY excludes {server_host})"
        elif _is_loopback(server_host):  # a proxy elsewhere cannot reach our loopback
            why = f"direct ({server_host} is this machine)"
        else:
            proxy = _parse(from_env, name)
            why = f"through proxy {proxy} ({name})"
    tls = saved.tls_data
    env_tls = env.get(ENV_TLS_DATA, "").strip().lower()
    if env_tls:
        try:
            tls = TlsData(env_tls)
        except ValueError:
            raise ValueError(f"{ENV_TLS_DATA}={env_tls[:20]!r}: use on, off or auto") from None
    wrapped = tls is TlsData.ON or (tls is TlsData.AUTO and proxy is not None)
    return Route(proxy, wrapped, f"{why}; data connections {'TLS-wrapped' if wrapped else 'plain'}")


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    return name in ("localhost", "::1") or name.startswith("127.") or name.endswith(".localhost")


def _parse(url: str, source: str) -> ProxyURL:
    try:
        return parse_proxy_url(url)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def parse_network_untrusted(raw: bytes) -> NetworkSettings:
    """network.json's content (a file we wrote, but read defensively: it may be edited).

    Raises:
        ValueError: not the object we write.
    """
    import json

    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{NETWORK_FILE} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{NETWORK_FILE} is not an object")
    proxy = obj.get("proxy")
    if proxy is not None and not isinstance(proxy, str):
        raise ValueError(f"{NETWORK_FILE}: proxy must be a string")
    try:
        tls = TlsData(obj.get("tls_data", "auto"))
    except ValueError:
        raise ValueError(f"{NETWORK_FILE}: tls_data must be on, off or auto") from None
    return NetworkSettings(proxy=proxy or None, tls_data=tls)


def encode_network(settings: NetworkSettings) -> bytes:
    import json

    obj = {"proxy": settings.proxy, "tls_data": settings.tls_data.value}
    return (json.dumps(obj, indent=2) + "\n").encode()


def load_network(state_dir: Path) -> NetworkSettings:
    """The saved settings, or the defaults when there is no file.

    Raises:
        ValueError: an unreadable or malformed file (one line).
    """
    try:
        with open(state_dir / NETWORK_FILE, "rb") as f:
            raw = f.read(MAX_NETWORK_FILE + 1)
    except FileNotFoundError:
        return NetworkSettings()
    except OSError as exc:
        raise ValueError(f"cannot read {state_dir / NETWORK_FILE}: {exc.strerror}") from None
    if len(raw) > MAX_NETWORK_FILE:
        raise ValueError(f"{state_dir / NETWORK_FILE} is over {MAX_NETWORK_FILE} bytes")
    return parse_network_untrusted(raw)


def save_network(state_dir: Path, settings: NetworkSettings) -> None:
    """Write network.json (0600), or remove it when it holds only defaults."""
    from homeport.node.files import write_private

    if settings == NetworkSettings():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_dir / NETWORK_FILE)
        return
    write_private(state_dir / NETWORK_FILE, encode_network(settings))


def route_for(
    state_dir: Path | None, server_host: str, env: Mapping[str, str] | None = None
) -> Route:
    """:func:`choose_route` with the settings saved in ``state_dir`` and ``os.environ``."""
    saved = load_network(state_dir) if state_dir is not None else NetworkSettings()
    return choose_route(saved, os.environ if env is None else env, server_host)
