"""Local administration: a unix socket on the server host, and its client.

Why a unix socket and no admin password: whoever can read the server's data
directory (0700) already owns the network — they hold the CA key. So the
admin interface is exactly as reachable as that directory: ``admin.sock``
lives in it (0600 from the start) and additionally checks the peer's uid
(SO_PEERCRED; unreadable credentials are refused), with the agent's local API's
rules (:mod:`homeport.io.unixsock`). Elsewhere there is nothing to connect to, and the CLI says
so.

Protocol: JSON lines. Each request ``{"op": "keys.create", ...}`` gets one
answer ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

The client (:func:`admin_request`) prefers the running server (so removals
take effect on live sessions); when the data directory exists but no server
answers, it opens the store itself through the same
:class:`~homeport.store.registry.Registry` and runs the request in-process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from homeport.io import unixsock
from homeport.node.hostkeys import fingerprint as host_key_fingerprint
from homeport.policy.acl import (
    CompiledPolicy,
    PolicyError,
    Subject,
    acl_check,
    check_ssh,
    compile_policy,
)
from homeport.policy.decide import decide
from homeport.proto.audit import (
    API_KEY,
    KEY_CREATE,
    KEY_REVOKE,
    NODE_REMOVE,
    NODE_RENAME,
    POLICY_REFUSED,
    POLICY_SET,
    USER,
    Audit,
)
from homeport.proto.coord import EXPIRY_WARNINGS, NodeRecord, NodeStatus
from homeport.server import apikeys
from homeport.server.audit import ReadStats, append_now, audit_path, read_events
from homeport.server.datadir import (
    PolicyFileError,
    has_server_data,
    load_policy,
    open_offline_registry,
    read_policy_text,
    remove_policy,
    save_policy,
)
from homeport.server.webui.session import LoginLinks
from homeport.store.registry import ApiKeyRow, Registry

log = logging.getLogger("homeport.server.admin")

ADMIN_SOCKET = "admin.sock"
#: Longest request line (bytes): a ``policy set`` carries the policy text
#: (at most ``policy.hujson.MAX_TEXT`` characters, JSON-escaped).
MAX_ADMIN_LINE = 8 * 1024 * 1024
#: How long the CLI waits for the running server's answer.
ADMIN_TIMEOUT = 10.0
#: listen(2) backlog of admin.sock (admin commands are rare and short).
ADMIN_BACKLOG = 16

#: Audit events one ``audit.list`` answers by default, and at most.
AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX = 1000
#: Event fields that name a node (``audit.list`` with ``node``).
AUDIT_NODE_FIELDS = ("node", "src", "dst")

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: What an API key id looks like (``apikeys.KEY_ID_HEX`` hex digits); anything else given
#: to ``apikeys.revoke`` is not echoed back (it may be a mangled token, i.e. a secret).
_KEY_ID_RE = re.compile(r"[0-9a-f]{1,64}")
#: Longest lifetime an auth or API key may be given (10 years): beyond it the admin meant
#: "never" (null), and a huge or non-finite number would break every listing and JSON answer.
MAX_EXPIRY_SECONDS = 10 * 365 * 86400.0


class AdminError(Exception):
    """An admin request failed; the message is for the user.

    ``code`` classifies the failure for the REST API (HTTP status), which the
    admin socket also passes on in its answer; subclasses set it.
    """

    code = "refused"


class NotFound(AdminError):
    """The node, key or user named does not exist."""

    code = "not-found"


class Conflict(AdminError):
    """The request clashes with the current state (a name taken, a user still owning nodes)."""

    code = "conflict"


class NoServerData(AdminError):
    """There is no server data directory here: not the server host (or wrong --data)."""


def parse_duration(text: str) -> float | None:
    """``30m``, ``1h``, ``7d``, ``2w``, ``90`` (seconds) → seconds; ``never`` → None."""
    t = text.strip().lower()
    if t in ("never", "none", "0"):
        return None
    mo = _DURATION_RE.match(t)
    if mo is None:
        raise ValueError(f"bad duration {text!r}: use e.g. 30m, 1h, 7d or never")
    seconds = float(mo.group(1)) * _UNITS[mo.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"bad duration {text!r}: too large")
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


def expiry_arg(value: object, field: str = "expiry_seconds") -> float | None:
    """A request's key lifetime checked: None (never), or a finite number of seconds in
    (0, :data:`MAX_EXPIRY_SECONDS`]. Raises TypeError/ValueError (a one-line 400): an
    ``Infinity``, ``NaN`` or ``1e300`` stored as an expiry would break every listing."""
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{field} must be a number of seconds or null (never)")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{field} must be a positive number of seconds, or null for never")
    if seconds > MAX_EXPIRY_SECONDS:
        raise ValueError(
            f"{field} must be at most {int(MAX_EXPIRY_SECONDS)} (10 years); use null for never"
        )
    return seconds


def finite_time(value: float | None) -> float | None:
    """A stored time as listings show it: a non-finite value (written before expiries were
    checked, or by hand) reads as None ("never"), so one bad row cannot break a listing."""
    if value is None or not math.isfinite(value):
        return None
    return value


class LiveView(Protocol):
    """The running server's live state (status, online nodes, relayed streams); see
    :mod:`homeport.server.liveview`. Offline there is none."""

    def server_info(self) -> dict[str, Any]: ...

    def online_nodes(self) -> list[dict[str, Any]]: ...

    def streams(self) -> list[dict[str, Any]]: ...


class AdminOps:
    """Executes admin requests: keys in the registry; nodes from the live server or the registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        nodes: Callable[[], list[NodeStatus]] | None = None,
        remove_node: Callable[[str], NodeRecord] | None = None,
        live: bool = False,
        clock: Callable[[], float] = time.time,
        node_action: Callable[[str, str], NodeRecord] | None = None,
        audit: Callable[[str, tuple[tuple[str, str], ...]], None] | None = None,
        data_dir: Path | None = None,
        set_policy: Callable[[CompiledPolicy | None], None] | None = None,
        policy_refused: Callable[[str], None] | None = None,
        node_by_name: Callable[[str], NodeRecord | None] | None = None,
        approve_login: Callable[[str], tuple[bool, str]] | None = None,
        live_view: LiveView | None = None,
        rename_node: Callable[[str, str], NodeRecord] | None = None,
    ) -> None:
        self.registry = registry
        self._nodes = nodes or registry.node_list
        self._remove = remove_node
        self._node_action = node_action
        self._audit = audit
        self.live = live
        self._clock = clock
        self.data_dir = data_dir
        self._set_policy = set_policy
        self._policy_refused = policy_refused
        self._node_by_name = node_by_name
        self._approve_login = approve_login
        #: One-time web UI login links (``homeport admin-link``), in server memory only.
        self.ui_links = LoginLinks()
        #: Base URL of the admin listener's web UI (``http://127.0.0.1:PORT``), set by whoever
        #: starts the listener; None: no web UI here, so ``ui.link`` refuses.
        self.ui_url: str | None = None
        self._live_view = live_view
        self._rename_node = rename_node

    def handle(self, request: Any) -> dict[str, Any]:
        """Answer one request; never raises for bad input."""
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "request must be a JSON object with an 'op'"}
        op = request["op"]
        handler = {
            "ping": self._ping,
            "keys.create": self._keys_create,
            "keys.list": self._keys_list,
            "keys.revoke": self._keys_revoke,
            "nodes.list": self._nodes_list,
            "nodes.remove": self._nodes_remove,
            "nodes.approve": self._nodes_action,
            "nodes.expire": self._nodes_action,
            "nodes.extend": self._nodes_action,
            "nodes.disable-expiry": self._nodes_action,
            "nodes.rename": self._nodes_rename,
            "users.create": self._users_create,
            "users.list": self._users_list,
            "users.remove": self._users_remove,
            "login.approve": self._login_approve,
            "policy.set": self._policy_set,
            "policy.get": self._policy_get,
            "policy.unset": self._policy_unset,
            "policy.explain": self._policy_explain,
            "ui.link": self._ui_link,
            "policy.check": self._policy_check,
            "apikeys.create": self._apikeys_create,
            "apikeys.list": self._apikeys_list,
            "apikeys.revoke": self._apikeys_revoke,
            "status": self._status,
            "status.nodes": self._status_nodes,
            "streams.list": self._streams_list,
            "audit.list": self._audit_list,
        }.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            return {"ok": True, **handler(request)}
        except PolicyError as exc:
            return {
                "ok": False,
                "code": "policy-refused",
                "error": "policy refused; the policy in force is unchanged",
                "problems": [p.as_dict() for p in exc.problems],
                "more": exc.more,
            }
        except AdminError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except (TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad request: {exc}", "code": "bad-request"}

    def _ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"live": self.live}

    def _emit_audit(self, kind: str, fields: tuple[tuple[str, str], ...]) -> None:
        if self._audit is not None:
            self._audit(kind, fields)

    def _keys_create(self, req: dict[str, Any]) -> dict[str, Any]:
        reusable = req.get("reusable", False)
        expiry = req.get("expiry_seconds")
        note = req.get("note", "")
        user = req.get("user", "")
        tags = req.get("tags", [])
        ephemeral = req.get("ephemeral", False)
        approval = req.get("approval", False)
        if not isinstance(reusable, bool) or not isinstance(note, str):
            raise TypeError("reusable must be a boolean and note a string")
        if not isinstance(ephemeral, bool) or not isinstance(approval, bool):
            raise TypeError("ephemeral and approval must be booleans")
        if not isinstance(user, str) or not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        ):
            raise TypeError("user must be a string and tags a list of strings")
        expiry = expiry_arg(expiry)
        self._check_tags_declared(tags)
        now = self._clock()
        try:
            key = self.registry.create_auth_key(
                now=now,
                reusable=reusable,
                expiry_seconds=None if expiry is None else float(expiry),
                note=note,
                user=user,
                tags=tuple(tags),
                ephemeral=ephemeral,
                approval=approval,
            )
        except (
            ValueError
        ) as exc:  # an unknown user, a bad tag: the admin's to fix, not "bad request"
            raise AdminError(str(exc)) from None
        log.info("auth key %s created (reusable=%s)", key.key_id, reusable)
        self._emit_audit(
            KEY_CREATE,
            (
                ("key_id", key.key_id),
                ("reusable", str(reusable).lower()),
                ("ephemeral", str(ephemeral).lower()),
                ("approval", str(approval).lower()),
                ("user", user),
                ("tags", ",".join(tags)),
                ("expiry", str(expiry)),
                ("note", note),
            ),
        )
        return {
            "key": str(key),
            "key_id": key.key_id,
            "reusable": reusable,
            "expires_at": None if expiry is None else now + float(expiry),
            "user": user,
            "tags": list(tags),
            "ephemeral": ephemeral,
            "approval": approval,
        }

    def _check_tags_declared(self, tags: list[str]) -> None:
        """With a policy in force, a key may only carry tags its ``tagOwners`` declares (as in
        Tailscale): an undeclared tag is usually a typo, and no rule could ever name it."""
        if not tags or self.data_dir is None:
            return
        try:
            policy = load_policy(self.data_dir)
        except PolicyFileError as exc:
            raise AdminError(str(exc).splitlines()[0]) from None
        if policy is None:
            return
        for tag in tags:
            if tag not in policy.tag_owners:
                raise AdminError(
                    f"tag {tag!r} is not declared in the policy's tagOwners; "
                    f"declare it there first (homeport policy set)"
                )

    def _keys_list(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {
            "keys": [
                {
                    "key_id": k.key_id,
                    "reusable": k.reusable,
                    "status": k.status.value,
                    "uses": k.uses,
                    "created_at": finite_time(k.created_at),
                    "expires_at": finite_time(k.expires_at),
                    "last_used_at": finite_time(k.last_used_at),
                    "note": k.note,
                    "user": k.user,
                    "tags": list(k.tags),
                    "ephemeral": k.ephemeral,
                    "approval": k.approval,
                }
                for k in self.registry.list_auth_keys(self._clock())
            ]
        }

    def _keys_revoke(self, req: dict[str, Any]) -> dict[str, Any]:
        key_id = req.get("key_id")
        if not isinstance(key_id, str):
            raise TypeError("key_id must be a string")
        if not self.registry.revoke_auth_key(key_id):
            raise NotFound(f"no auth key {key_id!r}")
        self._emit_audit(KEY_REVOKE, (("key_id", key_id),))
        return {"key_id": key_id}

    def _nodes_list(self, _req: dict[str, Any]) -> dict[str, Any]:
        now = self._clock()
        return {
            "live": self.live,
            "nodes": [
                {
                    "name": n.name,
                    "node_id": n.node_id,
                    "online": n.online,
                    "last_seen": n.last_seen,
                    "address": n.address,
                    "services": [{"name": s.name, "port": s.port} for s in n.services],
                    "fingerprint": n.fingerprint,
                    # the sshd host keys the node announced, as ``ssh-keygen -l`` shows them
                    "host_keys": [host_key_fingerprint(k) for k in n.host_keys],
                    "created_at": n.created_at,
                    "user": n.user,
                    "tags": list(n.tags),
                    "approved": n.approved,
                    "expires_at": finite_time(None if n.expiry_disabled else n.expires_at),
                    "ephemeral": n.ephemeral,
                    "expiry_disabled": n.expiry_disabled,
                    "expiry_warning": expiry_warning(
                        finite_time(None if n.expiry_disabled else n.expires_at), now
                    ),
                }
                for n in self._nodes()
            ],
        }

    def _nodes_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("name")
        if not isinstance(name, str):
            raise TypeError("name must be a string")
        try:
            if self._remove is not None:
                node = self._remove(name)
            else:
                node = self.registry.remove_node(name, self._clock())
                # live, the coordinator records it; offline, we do
                self._emit_audit(
                    NODE_REMOVE, (("node", node.name), ("node_id", node.node_id), ("by", "offline"))
                )
        except KeyError:
            raise NotFound(f"no node named {name!r}") from None
        return {"name": node.name, "node_id": node.node_id}

    # -- policy ---------------------------------------------------------------------------
    def _policy_dir(self) -> Path:
        if self.data_dir is None:
            raise AdminError("this server keeps no policy file")
        return self.data_dir

    def _login_approve(self, req: dict[str, Any]) -> dict[str, Any]:
        code = req.get("code")
        if not isinstance(code, str):
            raise TypeError("code must be a string")
        if self._approve_login is None:
            raise AdminError("login checks live in the running server: start 'homeport server'")
        ok, message = self._approve_login(code)
        if not ok:
            raise AdminError(message)
        return {"message": message}

    def _policy_set(self, req: dict[str, Any]) -> dict[str, Any]:
        text = req.get("text")
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        data_dir = self._policy_dir()
        try:
            compiled = compile_policy(text)
        except PolicyError as exc:
            first = str(exc.problems[0]) if exc.problems else "refused"
            if self._policy_refused is not None:
                self._policy_refused(first)
            else:  # no live core to record it: straight into the audit log
                self._emit_audit(POLICY_REFUSED, (("reason", first),))
            log.info("policy refused: %s", first)
            raise
        save_policy(data_dir, text)  # stored first: a restart keeps what is in force
        if self._set_policy is not None:
            self._set_policy(compiled)
        else:
            self._emit_audit(
                POLICY_SET,
                (
                    ("digest", compiled.digest),
                    ("acls", str(len(compiled.acls))),
                    ("ssh", str(len(compiled.ssh))),
                ),
            )
        log.info(
            "policy %s set (%d acls, %d ssh rules)",
            compiled.digest,
            len(compiled.acls),
            len(compiled.ssh),
        )
        return {
            "digest": compiled.digest,
            "acls": len(compiled.acls),
            "ssh": len(compiled.ssh),
            "live": self.live,
        }

    def _policy_unset(self, _req: dict[str, Any]) -> dict[str, Any]:
        """Back to no policy (every node may reach every exposed service)."""
        removed = remove_policy(self._policy_dir())
        if self._set_policy is not None:
            self._set_policy(None)
        elif removed:
            self._emit_audit(POLICY_SET, (("digest", "none"), ("acls", "0"), ("ssh", "0")))
        log.info("policy unset (was %s)", "stored" if removed else "not set")
        return {"removed": removed, "live": self.live}

    def _policy_get(self, _req: dict[str, Any]) -> dict[str, Any]:
        text = read_policy_text(self._policy_dir())
        if text is None:
            return {"set": False, "text": None, "digest": None}
        return {"set": True, "text": text, "digest": compile_policy(text).digest}

    def _lookup(self, name: str) -> NodeRecord | None:
        if self._node_by_name is not None:
            return self._node_by_name(name)
        for node in self.registry.load_nodes():
            if node.name == name and not node.removed:
                return node
        return None

    def _subject(self, text: str) -> tuple[Subject, NodeRecord | None]:
        """A node by name, or a hypothetical node for ``tag:x`` / a user (dry runs)."""
        node = self._lookup(text)
        if node is not None:
            return node.subject(), node
        if text.startswith("tag:"):
            return Subject("", f"(any {text} node)", "", (text,)), None
        if "@" in text or text.startswith("user:"):
            user = text.removeprefix("user:").rstrip("@")
            return Subject("", f"(a node of {user})", user, ()), None
        raise NotFound(f"no node named {text!r} (name a node, tag:x or a user)")

    def _policy_explain(self, req: dict[str, Any]) -> dict[str, Any]:
        src_text, dst_text, service = req.get("src"), req.get("dst"), req.get("service")
        local_user = req.get("user")
        if not all(isinstance(x, str) for x in (src_text, dst_text, service)):
            raise TypeError("src, dst and service must be strings")
        if local_user is not None and not isinstance(local_user, str):
            raise TypeError("user must be a string")
        assert isinstance(src_text, str) and isinstance(dst_text, str)
        assert isinstance(service, str)
        try:
            policy = load_policy(self._policy_dir())
        except PolicyFileError as exc:
            raise AdminError(str(exc)) from None
        src, _ = self._subject(src_text)
        dst, dst_node = self._subject(dst_text)
        answer: dict[str, Any] = {"policy": policy.digest if policy else None}
        if service == "exit":  # may src use dst as an exit node (docs/exit-nodes.md)
            from homeport.policy.decide import exit_grant

            g = exit_grant(src, dst, policy)
            answer.update(verdict=g.verdict.value, code=g.code, rule=g.rule, reason=g.reason)
        elif dst_node is not None:
            d = decide(src, dst, dst_node.services, service, policy)
            answer.update(verdict=d.verdict.value, code=d.code, rule=d.rule, reason=d.reason)
        elif not service.isdigit():
            raise AdminError(f"{dst_text} is not a node: give a port number, not {service!r}")
        elif policy is None:
            answer.update(
                verdict="allow",
                code="ok",
                rule="service-exposed",
                reason="no policy: every node may reach every exposed service",
            )
        else:
            v = acl_check(policy, src, dst, int(service))
            answer.update(
                verdict="allow" if v.allowed else "deny",
                code="ok" if v.allowed else "policy",
                rule=v.rule,
                reason=v.reason,
            )
        if local_user is not None:
            sd = check_ssh(policy, src, dst, local_user)
            answer["ssh"] = {
                "user": local_user,
                "verdict": sd.verdict.value,
                "rule": sd.rule,
                "reason": sd.reason,
                "check_period": sd.check_period,
            }
        return answer

    def _ui_link(self, _req: dict[str, Any]) -> dict[str, Any]:
        """A one-time login link for the web UI; the secret rides in the URL fragment
        (browsers never send it, so no server or proxy log records it)."""
        if not self.live or self.ui_url is None:
            raise AdminError(
                "the web UI lives in the running server's admin listener: start "
                "'homeport server' (with --admin-listen) first"
            )
        token, expires_at = self.ui_links.create(self._clock())
        # admin-link runs on the server host: a wildcard listener is reached on loopback
        base = self.ui_url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
        return {"url": f"{base}/ui/login#link={token}", "expires_at": expires_at}

    def _nodes_action(self, req: dict[str, Any]) -> dict[str, Any]:
        action = str(req["op"]).removeprefix("nodes.")
        name = req.get("name")
        if not isinstance(name, str):
            raise TypeError("name must be a string")
        try:
            if self._node_action is not None:
                node = self._node_action(action, name)
            else:
                node = self.registry.node_action(name, action, self._clock())
        except KeyError:
            raise NotFound(f"no node named {name!r}") from None
        return {
            "name": node.name,
            "node_id": node.node_id,
            "approved": node.approved,
            "expires_at": None if node.expiry_disabled else node.expires_at,
            "expiry_disabled": node.expiry_disabled,
        }

    def _nodes_rename(self, req: dict[str, Any]) -> dict[str, Any]:
        """Rename a live node: in the running coordinator (peers and the node follow at
        once), else in the registry (the node reads its name in WELCOME next time)."""
        name, new_name = req.get("name"), req.get("new_name")
        if not isinstance(name, str) or not isinstance(new_name, str):
            raise TypeError("name and new_name must be strings")
        try:
            if self._rename_node is not None:
                node = self._rename_node(name, new_name)
            else:
                node = self.registry.rename_node(name, new_name)
                self._emit_audit(
                    NODE_RENAME,
                    (("node", node.name), ("node_id", node.node_id), ("from", name)),
                )
        except KeyError:
            raise NotFound(f"no node named {name!r}") from None
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        return {"name": node.name, "node_id": node.node_id, "from": name}

    def _users_create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("name")
        if not isinstance(name, str):
            raise TypeError("name must be a string")
        if not self.registry.create_user(name, self._clock()):
            raise Conflict(f"user {name!r} already exists")
        self._emit_audit(USER, (("user", name), ("event", "create")))
        return {"name": name}

    def _users_list(self, _req: dict[str, Any]) -> dict[str, Any]:
        nodes = self._nodes()
        return {
            "users": [
                {
                    "name": u.name,
                    "created_at": u.created_at,
                    "nodes": sorted(n.name for n in nodes if n.user == u.name),
                }
                for u in self.registry.list_users()
            ]
        }

    def _users_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("name")
        force = req.get("force", False)
        if not isinstance(name, str) or not isinstance(force, bool):
            raise TypeError("name must be a string and force a boolean")
        if name not in {u.name for u in self.registry.list_users()}:
            raise NotFound(f"no user {name!r}")
        owned = sorted(n.name for n in self._nodes() if n.user == name)
        if owned and not force:
            raise Conflict(
                f"user {name!r} still has {len(owned)} node(s): {', '.join(owned)}; "
                "remove them first, or use --force to remove them too"
            )
        for node_name in owned:
            with contextlib.suppress(KeyError):
                if self._remove is not None:
                    self._remove(node_name)
                else:
                    self.registry.remove_node(node_name, self._clock())
        self.registry.remove_user(name)
        for k in self.registry.list_api_keys():  # its API keys end with it
            if k.user == name and not k.revoked:
                self.registry.revoke_api_key(k.key_id)
        self._emit_audit(USER, (("user", name), ("event", "remove"), ("nodes", ",".join(owned))))
        return {"name": name, "removed_nodes": owned}

    # -- API keys, status, streams, audit (the REST API's extra operations) -------------------
    def _apikeys_create(self, req: dict[str, Any]) -> dict[str, Any]:
        name, scope_text = req.get("name"), req.get("scope", "read")
        user, expiry = req.get("user"), req.get("expiry_seconds")
        if not isinstance(name, str) or not isinstance(scope_text, str):
            raise TypeError("name and scope must be strings")
        if user is not None and not isinstance(user, str):
            raise TypeError("user must be a string or null")
        expiry = expiry_arg(expiry)
        problem = apikeys.name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        try:
            scope = apikeys.Scope(scope_text)
        except ValueError:
            raise ValueError(f"scope must be read or admin, not {scope_text!r}") from None
        if user is not None and not self.registry.user_exists(user):
            raise NotFound(f"no user {user!r} (homeport users create {user})")
        now = self._clock()
        new = apikeys.new_token()
        expires_at = None if expiry is None else now + float(expiry)
        self.registry.create_api_key(
            ApiKeyRow(
                key_id=new.key_id,
                token_hash=new.token_hash,
                name=name,
                scope=scope.value,
                created_at=now,
                user=user,
                expires_at=expires_at,
            )
        )
        log.info("API key %s (%s, %s) created", new.key_id, name, scope.value)
        self._emit_audit(
            API_KEY,
            (
                ("event", "create"),
                ("key_id", new.key_id),
                ("name", name),
                ("scope", scope.value),
                ("user", user or ""),
                ("expiry", str(expiry)),
            ),
        )
        return {
            "token": new.token,
            "key_id": new.key_id,
            "name": name,
            "scope": scope.value,
            "user": user,
            "created_at": now,
            "expires_at": expires_at,
        }

    def _apikeys_list(self, _req: dict[str, Any]) -> dict[str, Any]:
        now = self._clock()
        users = {u.name for u in self.registry.list_users()}
        out = []
        for k in self.registry.list_api_keys():
            expires_at = finite_time(k.expires_at)
            if k.revoked:
                status = "revoked"
            elif expires_at is not None and now >= expires_at:
                status = "expired"
            elif k.user is not None and k.user not in users:
                status = "user removed"
            else:
                status = "valid"
            out.append(
                {
                    "key_id": k.key_id,
                    "name": k.name,
                    "scope": k.scope,
                    "user": k.user,
                    "created_at": finite_time(k.created_at),
                    "expires_at": expires_at,
                    "status": status,
                }
            )
        return {"keys": out}

    def _apikeys_revoke(self, req: dict[str, Any]) -> dict[str, Any]:
        """Revoke by key id; a whole token pasted instead revokes its key. Why the care in
        the messages: the argument may be a secret, and errors land in terminals and logs."""
        given = req.get("key_id")
        if not isinstance(given, str):
            raise TypeError("key_id must be a string")
        key_id = apikeys.token_key_id(given) or given
        if not _KEY_ID_RE.fullmatch(key_id):
            raise NotFound(
                "not an API key id: give the key id that 'homeport apikeys list' shows "
                "(in a token hpk_<id>_<secret>, the 12 hex digits after hpk_)"
            )
        if not self.registry.revoke_api_key(key_id):
            raise NotFound(f"no API key {key_id!r}")
        log.info("API key %s revoked", key_id)
        self._emit_audit(API_KEY, (("event", "revoke"), ("key_id", key_id)))
        return {"key_id": key_id}

    def verify_api_token(self, token: str) -> apikeys.ApiPrincipal | None:
        """The principal ``token`` authenticates now, or None (unknown, revoked, expired,
        or its user removed). Reads the store; call it where admin ops run."""
        if apikeys.token_key_id(token) is None:
            return None
        row = self.registry.find_api_key_by_hash(apikeys.hash_token(token))
        if row is None:
            return None
        verdict = apikeys.judge_key(
            token=token,
            stored_hash=row.token_hash,
            key_id=row.key_id,
            name=row.name,
            scope=row.scope,
            user=row.user,
            user_exists=row.user is None or self.registry.user_exists(row.user),
            revoked=row.revoked,
            expires_at=row.expires_at,
            now=self._clock(),
        )
        if verdict.principal is None:
            log.info("API token refused: %s", verdict.reason)
        return verdict.principal

    def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self._live_view is None:
            nodes = self._nodes()
            return {"live": False, "nodes_total": len(nodes), "nodes_online": 0}
        return {"live": True, **self._live_view.server_info()}

    def _status_nodes(self, _req: dict[str, Any]) -> dict[str, Any]:
        view = self._live_view
        return {"live": view is not None, "nodes": [] if view is None else view.online_nodes()}

    def _streams_list(self, _req: dict[str, Any]) -> dict[str, Any]:
        view = self._live_view
        return {"live": view is not None, "streams": [] if view is None else view.streams()}

    def _audit_list(self, req: dict[str, Any]) -> dict[str, Any]:
        """The newest ``limit`` events matching the filters, oldest first (reads the file:
        safe to run off the event loop)."""
        kind, node, since = req.get("kind"), req.get("node"), req.get("since")
        limit = req.get("limit", AUDIT_DEFAULT_LIMIT)
        if kind is not None and not isinstance(kind, str):
            raise TypeError("kind must be a string")
        if node is not None and not isinstance(node, str):
            raise TypeError("node must be a string")
        if since is not None and (not isinstance(since, int | float) or isinstance(since, bool)):
            raise TypeError("since must be a unix time (number)")
        if since is not None and not math.isfinite(since):
            raise ValueError("since must be a finite unix time")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= AUDIT_MAX:
            raise ValueError(f"limit must be an integer from 1 to {AUDIT_MAX}")
        if self.data_dir is None:
            raise AdminError("this server keeps no audit log")
        path = audit_path(self.data_dir)
        stats = ReadStats()
        picked: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        matched = 0
        try:
            for ev in read_events(path, stats):
                if kind is not None and ev["kind"] != kind:
                    continue
                if since is not None and float(ev["ts"]) < since:
                    continue
                if node is not None and not any(ev.get(f) == node for f in AUDIT_NODE_FIELDS):
                    continue
                matched += 1
                picked.append(ev)
        except FileNotFoundError:
            pass
        except PermissionError as exc:
            raise AdminError(f"cannot read {path}: {exc.strerror}") from None
        return {"events": list(picked), "matched": matched, "skipped": stats.skipped}

    def _policy_check(self, req: dict[str, Any]) -> dict[str, Any]:
        """Compile ``text`` (with its tests) without storing it: a dry run of ``policy set``."""
        text = req.get("text")
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        try:
            compiled = compile_policy(text)
        except PolicyError as exc:
            return {
                "valid": False,
                "problems": [p.as_dict() for p in exc.problems],
                "more": exc.more,
            }
        return {
            "valid": True,
            "digest": compiled.digest,
            "acls": len(compiled.acls),
            "ssh": len(compiled.ssh),
        }


def expiry_warning(expires_at: float | None, now: float) -> str:
    """``expired``, ``expires in 3 days`` (within 14 days), or "" (why: one wording everywhere)."""
    if expires_at is None:
        return ""
    left = expires_at - now
    if left <= 0:
        return "expired"
    if left > max(EXPIRY_WARNINGS):
        return ""
    if left < 86400:
        return f"expires in {max(1, round(left / 3600))} h"
    return f"expires in {round(left / 86400)} days"


# -- server side ---------------------------------------------------------------------


class AdminServer:
    """``admin.sock`` being served; :meth:`close` stops it and removes the socket file."""

    def __init__(
        self,
        server: asyncio.AbstractServer,
        listener: unixsock.UnixListener,
        connections: set[asyncio.StreamWriter],
    ) -> None:
        self.server = server
        self.listener = listener
        self._connections = connections

    def close(self) -> None:
        """Stop accepting, cut open admin connections, remove ``admin.sock``."""
        self.server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        self.listener.close()


def allowed_uids() -> frozenset[int]:
    """Who may use the admin socket: the server's own uid, and root (who can read
    the data directory anyway)."""
    return frozenset({os.geteuid(), 0})


async def start_admin_server(path: Path, ops: AdminOps) -> AdminServer:
    """Serve ``ops`` on the unix socket ``path`` (0600, see :mod:`homeport.io.unixsock`).

    Raises:
        AdminError: another server already answers on ``path``, or it cannot be bound.
    """
    try:
        listener = await asyncio.to_thread(unixsock.bind_listener, path, ADMIN_BACKLOG)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AdminError(
                f"another homeport server is already running with {path.parent}"
            ) from None
        raise AdminError(f"cannot serve {path}: {exc.strerror or exc}") from exc
    allowed = allowed_uids()
    connections: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(writer)
        try:
            refusal = unixsock.peer_refusal(writer.get_extra_info("socket"), allowed)
            if refusal is not None:
                log.warning("admin socket: %s", refusal)
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    return
                try:
                    request = json.loads(line, parse_constant=_refuse_constant)
                except ValueError:
                    answer: dict[str, Any] = {"ok": False, "error": "request is not JSON"}
                else:
                    answer = ops.handle(request)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            connections.discard(writer)
            writer.close()

    try:
        server = await asyncio.start_unix_server(handle, sock=listener.sock, limit=MAX_ADMIN_LINE)
    except BaseException:
        listener.close()
        raise
    return AdminServer(server, listener, connections)


def _refuse_constant(name: str) -> float:
    """``json.loads`` hook: NaN/Infinity are not JSON; refuse them at parse time."""
    raise ValueError(f"{name} is not valid JSON")


# -- client side ----------------------------------------------------------------------


def _request_socket(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    with unixsock.connect(path, timeout) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise AdminError("the server closed the admin connection without answering")
            buf += chunk
            if len(buf) > 64 * MAX_ADMIN_LINE:
                raise AdminError("admin answer too long")
    try:
        answer = json.loads(buf)
    except ValueError as exc:
        raise AdminError("the server sent a malformed admin answer") from exc
    if not isinstance(answer, dict):
        raise AdminError("the server sent a malformed admin answer")
    return answer


def admin_request(
    data_dir: Path, request: dict[str, Any], *, db_url: str | None = None
) -> dict[str, Any]:
    """Run one admin request: via the running server, else directly on the store.

    Raises:
        NoServerData: ``data_dir`` holds no server (not the server host).
        AdminError: the server could not be asked.
    """
    path = data_dir / ADMIN_SOCKET
    if path.exists():
        try:
            return _request_socket(path, request, ADMIN_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale socket: no server runs
        except PermissionError as exc:
            raise AdminError(
                f"cannot use {path}: {exc.strerror}; run as the server's user"
            ) from exc
        except OSError as exc:
            raise AdminError(f"the server did not answer on {path}: {exc}") from exc
    if not has_server_data(data_dir):
        raise NoServerData(
            f"no homeport server data in {data_dir} — run this on the server host, "
            "or pass --data DIR"
        )
    registry = open_offline_registry(data_dir, db_url=db_url)
    try:
        path = audit_path(data_dir)

        def offline_audit(kind: str, fields: tuple[tuple[str, str], ...]) -> None:
            append_now(path, Audit(kind, time.time(), fields))

        return AdminOps(registry, audit=offline_audit, data_dir=data_dir).handle(request)
    finally:
        registry.close()
