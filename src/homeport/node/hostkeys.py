"""sshd host keys: what an agent reports to the server, and what a client pins per peer.

Why ``ssh-keyscan`` against the ssh service's target first: that is what the sshd
clients will reach really serves (it may run in a container, on another port,
or with keys outside /etc/ssh). The ``/etc/ssh/ssh_host_*_key.pub`` files are
the fallback when no sshd answers right now (the agent re-collects on every
reconnect).

**Pinning (host-key continuity).** The keys a client writes into
``known_hosts/<peer>`` come from the server (which got them from the peer's
agent), so on their own they only prove what the server says today. After
``nodes remove labpc`` anyone with an auth key could enroll a new ``labpc``
with another sshd; rewriting known_hosts with whatever arrives would let
``ssh labpc`` reach it without a word. So a client keeps, per peer name, the
node id and the host keys it saw first (``pins/<name>``, JSON, 0600) and
refuses a name that now belongs to another node id, or whose keys changed,
until its user runs ``homeport trust reset NAME``. :func:`check_pin` is the
pure decision; :func:`admit` is the file glue used by ``homeport nc`` and by
the agent's local open path. An added key (sshd key rotation that keeps the
old one) is a change too: the server alone vouches for the new key, and a
compromised server adding its own key next to the real one is exactly the
attack to catch; a rotation is rare and one ``trust reset`` away.
"""

from __future__ import annotations

import enum
import glob
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from homeport.node.files import write_private
from homeport.node.state import (
    KNOWN_HOSTS_DIR,
    check_host_name,
    rebuild_known_hosts,
    sanitize_host_key,
    write_known_hosts,
)
from homeport.wire.hostkey import MAX_HOST_KEYS, sanitize_host_keys

log = logging.getLogger(__name__)

#: ssh-keyscan's own per-host timeout (seconds) and our hard cap on the process.
KEYSCAN_TIMEOUT = 3
KEYSCAN_PROCESS_TIMEOUT = 10.0
HOST_KEY_GLOB = "/etc/ssh/ssh_host_*_key.pub"


def parse_keys(lines: Iterable[str], *, with_host: bool) -> tuple[str, ...]:
    """Keep valid ``type base64`` keys, dropping comments, junk and duplicates.

    ``with_host``: lines are ssh-keyscan output (``host type key``).
    """
    keys: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if with_host:
            parts = parts[1:]
        keys.append(" ".join(parts[:2]))
    # sorted: ssh-keyscan prints keys in whichever order its exchanges finish, and an order
    # change must not read as new host keys (a stored announce, a pushed map) on every scan
    return tuple(sorted(sanitize_host_keys(keys)))


def keyscan(host: str, port: int) -> tuple[str, ...]:
    """Host keys the sshd at ``host:port`` serves (empty when it does not answer)."""
    import subprocess  # lazily: nc's direct path imports this module for pinning

    try:
        proc = subprocess.run(
            ["ssh-keyscan", "-T", str(KEYSCAN_TIMEOUT), "-p", str(port), host],
            capture_output=True,
            text=True,
            timeout=KEYSCAN_PROCESS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ssh-keyscan %s:%d failed: %s", host, port, exc)
        return ()
    return parse_keys(proc.stdout.splitlines(), with_host=True)


def from_files(pattern: str = HOST_KEY_GLOB) -> tuple[str, ...]:
    """Host keys from the local sshd's public key files."""
    lines: list[str] = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                lines.append(f.readline())
        except OSError:
            continue
    return parse_keys(lines, with_host=False)


def collect(target: tuple[str, int] | None, *, pattern: str = HOST_KEY_GLOB) -> tuple[str, ...]:
    """Host keys for the ssh service whose local target is ``target`` (None: not exposed)."""
    if target is None:
        return ()
    keys = keyscan(*target)
    if keys:
        return keys
    keys = from_files(pattern)
    if keys:
        log.info("sshd at %s:%d did not answer ssh-keyscan; using %s", *target, pattern)
    else:
        log.warning("no sshd host keys found for %s:%d; peers cannot pin them", *target)
    return keys


# -- pinning --------------------------------------------------------------------------

PINS_DIR = "pins"
#: A pin file is tiny (an id and at most MAX_HOST_KEYS keys); refuse anything absurd.
MAX_PIN_FILE = 64 * 1024
#: A node id as the server names it (``n`` + hex today); longer or odder text is refused.
MAX_NODE_ID = 64
_NODE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
RESET_HINT = "homeport trust reset"


class TrustError(Exception):
    """A peer is refused by its pin (message is one user-facing line with the fix)."""


class PinVerdict(enum.Enum):
    """What :func:`check_pin` decided (stable strings: logs and ``--json``)."""

    FIRST = "first-seen"  # no pin yet: pin what we see
    SAME = "same"  # the pinned node, the pinned keys
    KEYS_ADDED = "keys-first-seen"  # the pinned node had no keys pinned; pin them now
    NO_KEYS = "no-keys"  # the pinned node announces no keys now: keep the pinned ones
    NODE_CHANGED = "node-changed"
    KEYS_CHANGED = "keys-changed"
    BAD_KEYS = "bad-keys"  # the server sent something that is not a host key
    BAD_NODE_ID = "bad-node-id"


@dataclass(frozen=True, slots=True)
class Pin:
    """What a client trusts for one peer name.

    ``node_id`` is "" for a pin adopted from a known_hosts file written
    before pins existed (the keys are pinned; the first node id seen is adopted).
    """

    name: str
    node_id: str
    host_keys: tuple[str, ...]
    since: float  # unix time the pin was made

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "host_keys": list(self.host_keys),
            "fingerprints": [fingerprint(k) for k in self.host_keys],
            "since": self.since,
        }


@dataclass(frozen=True, slots=True)
class PinDecision:
    """Verdict + reason; ``pin`` is what to store (None: leave the file alone)."""

    verdict: PinVerdict
    reason: str
    keys: tuple[str, ...] = ()  # what known_hosts must say
    pin: Pin | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict in (
            PinVerdict.FIRST,
            PinVerdict.SAME,
            PinVerdict.KEYS_ADDED,
            PinVerdict.NO_KEYS,
        )


def fingerprint(key: str) -> str:
    """``TYPE SHA256:...`` as ``ssh-keygen -l`` shows it (for people, not for checks)."""
    import base64
    import hashlib

    key_type, _, b64 = key.partition(" ")
    try:
        blob = base64.b64decode(b64, validate=True)
    except ValueError:
        return f"{key_type} (unreadable)"
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{key_type} SHA256:{digest}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _keys_text(keys: Iterable[str]) -> str:
    return ", ".join(fingerprint(k) for k in sorted(keys)) or "none"


def _node_id_problem(node_id: str) -> str | None:
    if not node_id or len(node_id) > MAX_NODE_ID or not set(node_id) <= _NODE_ID_CHARS:
        return f"the server named a malformed node id {node_id[:MAX_NODE_ID]!r}"
    return None


def check_pin(
    name: str, pin: Pin | None, node_id: str, host_keys: Iterable[str], now: float
) -> PinDecision:
    """Decide whether peer ``name`` (node ``node_id``, announcing ``host_keys``) is trusted.

    Pure: the pin, the server's answer and ``now`` in, a decision out. The
    server's keys are untrusted text: every one must be a real OpenSSH public
    key (one bad key refuses the peer; a server that sends junk is not one
    to believe about the rest), compared as a set in canonical form.
    """
    problem = _node_id_problem(node_id)
    if problem is not None:
        return PinDecision(PinVerdict.BAD_NODE_ID, problem)
    raw = list(host_keys)
    if len(raw) > MAX_HOST_KEYS:
        return PinDecision(PinVerdict.BAD_KEYS, f"the server sent more than {MAX_HOST_KEYS} keys")
    try:
        keys = tuple(dict.fromkeys(sanitize_host_key(k) for k in raw))
    except ValueError as exc:
        return PinDecision(PinVerdict.BAD_KEYS, f"the server sent a bad host key: {exc}")
    hint = f"if that is expected, run: {RESET_HINT} {name}"
    if pin is None:
        return PinDecision(
            PinVerdict.FIRST,
            f"first contact: pinned node {node_id} and {len(keys)} host key(s)",
            keys,
            Pin(name, node_id, keys, now),
        )
    since = _when(pin.since)
    if pin.node_id and pin.node_id != node_id:
        return PinDecision(
            PinVerdict.NODE_CHANGED,
            f"{name} is now a different node ({node_id}, pinned {pin.node_id} since {since}): "
            f"it may have been removed and re-enrolled by someone else; {hint}",
        )
    adopted = pin if pin.node_id else Pin(name, node_id, pin.host_keys, pin.since)
    if not keys:  # e.g. a forward to a node that exposes no ssh: nothing new to trust
        return PinDecision(
            PinVerdict.NO_KEYS,
            "the node announces no host keys; the pinned ones stay",
            pin.host_keys,
            adopted if adopted is not pin else None,
        )
    if not pin.host_keys:
        return PinDecision(
            PinVerdict.KEYS_ADDED,
            f"pinned {len(keys)} host key(s) of node {node_id}",
            keys,
            Pin(name, node_id, keys, pin.since),
        )
    if set(keys) != set(pin.host_keys):
        added = set(keys) - set(pin.host_keys)
        removed = set(pin.host_keys) - set(keys)
        parts = []
        if added:
            parts.append(f"new {_keys_text(added)}")
        if removed:
            parts.append(f"gone {_keys_text(removed)}")
        return PinDecision(
            PinVerdict.KEYS_CHANGED,
            f"{name}'s ssh host keys changed ({'; '.join(parts)}; pinned since {since}); {hint}",
        )
    update = adopted if adopted is not pin else None
    return PinDecision(PinVerdict.SAME, "pinned node and keys", pin.host_keys, update)


def _pin_path(state_dir: Path, name: str) -> Path:
    return state_dir / PINS_DIR / check_host_name(name)


def _legacy_pin(state_dir: Path, name: str) -> Pin | None:
    """A known_hosts file written before pins existed: its keys are what we trusted."""
    path = state_dir / KNOWN_HOSTS_DIR / name
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(MAX_PIN_FILE + 1)
        since = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    if len(text) > MAX_PIN_FILE:
        raise TrustError(f"{path} is too large; {RESET_HINT} {name}")
    keys = parse_keys(text.splitlines(), with_host=True)
    return Pin(name, "", keys, since)


def _stored_key(text: str) -> str:
    """A key from our own pin file: shape-checked only (cheap, on every warm open).

    The file is ours (0600 in a 0700 directory), and a key only reaches
    known_hosts through :func:`render_known_hosts` or after it compared equal
    to a key the server sent, which was fully parsed by :func:`check_pin`.
    """
    key_type, sep, b64 = text.partition(" ")
    if not sep or not key_type or not b64 or not text.isascii() or len(text.split()) != 2:
        raise ValueError(f"not a host key: {text[:40]!r}")
    return text


def load_pin(state_dir: Path, name: str) -> Pin | None:
    """The pin for ``name`` (or one adopted from an older known_hosts file), or None.

    Raises:
        TrustError: the pin file is unreadable or malformed (refuse, never guess).
        ValueError: ``name`` is not a peer host name.
    """
    path = _pin_path(state_dir, name)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PIN_FILE + 1)
    except FileNotFoundError:
        return _legacy_pin(state_dir, name)
    except OSError as exc:
        raise TrustError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if len(raw) > MAX_PIN_FILE:
            raise ValueError("too large")
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.get("name") != name:
            raise ValueError("not a pin for this name")
        keys = obj["host_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("host_keys is not a list of strings")
        pin = Pin(
            name=name,
            node_id=str(obj["node_id"]),
            host_keys=tuple(_stored_key(k) for k in keys),
            since=float(obj["since"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TrustError(f"{path} is malformed ({exc}); {RESET_HINT} {name} to pin again") from None
    return pin


def save_pin(state_dir: Path, pin: Pin) -> Path:
    """Write ``pins/<name>`` atomically (0600; the directory 0700)."""
    path = _pin_path(state_dir, pin.name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    obj: dict[str, object] = {
        "name": pin.name,
        "node_id": pin.node_id,
        "host_keys": list(pin.host_keys),
        "since": pin.since,
    }
    write_private(path, (json.dumps(obj, indent=2) + "\n").encode())
    return path


def list_pins(state_dir: Path) -> list[Pin]:
    """Every pin (and every known_hosts file not yet pinned), by name; unreadable ones skipped."""
    names: set[str] = set()
    for sub in (PINS_DIR, KNOWN_HOSTS_DIR):
        try:
            names.update(os.listdir(state_dir / sub))
        except OSError:
            continue
    pins: list[Pin] = []
    for name in sorted(names):
        try:
            pin = load_pin(state_dir, name)
        except (TrustError, ValueError) as exc:
            log.warning("skipping pin %r: %s", name, exc)
            continue
        if pin is not None:
            pins.append(pin)
    return pins


def reset_pin(state_dir: Path, name: str) -> bool:
    """Forget ``name``'s pin and known_hosts file; the next connection pins afresh.

    Returns whether there was anything to forget.
    """
    check_host_name(name)
    found = False
    for path in (state_dir / PINS_DIR / name, state_dir / KNOWN_HOSTS_DIR / name):
        try:
            path.unlink()
            found = True
        except FileNotFoundError:
            continue
    rebuild_known_hosts(state_dir)
    return found


def admit(
    state_dir: Path,
    name: str,
    port: int,
    node_id: str,
    host_keys: Iterable[str],
    *,
    now: float | None = None,
) -> PinDecision:
    """Check ``name`` against its pin, then pin and write ``known_hosts/<name>``.

    known_hosts is rewritten only when its text changes (saves the atomic
    write's fsync on the warm path, where the same peer is opened again and
    again) and only ever with pinned keys.

    Raises:
        TrustError: refused (one line: what changed, since when, the command to accept).
        ValueError, OSError: a bad name, or the files cannot be written.
    """
    when = time.time() if now is None else now
    decision = check_pin(name, load_pin(state_dir, name), node_id, host_keys, when)
    if not decision.allowed:
        log.warning("refused %s: %s", name, decision.reason)
        raise TrustError(decision.reason)
    if decision.pin is not None:
        save_pin(state_dir, decision.pin)
        if decision.verdict is not PinVerdict.SAME:
            log.info("%s: %s", name, decision.reason)
    # What render_known_hosts would write, built without re-parsing every key: only
    # compared with the file; any difference is written by write_known_hosts (which parses).
    lines = [f"{name} {k}\n" for k in decision.keys]
    if port != 22:
        lines += [f"[{name}]:{port} {k}\n" for k in decision.keys]
    text = "".join(lines).encode()
    try:
        with open(os.path.join(state_dir, KNOWN_HOSTS_DIR, name), "rb") as f:
            if f.read(len(text) + 1) == text:
                return decision
    except OSError:
        pass
    write_known_hosts(state_dir, name, port, decision.keys)
    return decision
