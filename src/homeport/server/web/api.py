"""The REST API's route table: one :class:`ApiRoute` per (method, path), each an admin op.

This table is the single source of both the Starlette routes
(:mod:`homeport.server.web.app`) and the OpenAPI document
(:mod:`homeport.server.web.openapi`). A route names the :class:`AdminOps` op it
runs, the scope it needs, its path/query parameters and JSON body, and the JSON
Schema of its answer; :func:`build_request` turns an HTTP request into the op's
request dict exactly as the CLI would build it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from homeport.server.admin import parse_duration
from homeport.server.apikeys import Scope

API_PREFIX = "/api/v1"
#: Default lifetime of an auth key created through the API (the CLI's ``--expiry 24h``).
DEFAULT_KEY_EXPIRY = 24 * 3600.0
#: Longest query parameter value we look at (names, kinds, durations are all short).
MAX_QUERY_VALUE = 1024


class BadInput(Exception):
    """The HTTP request cannot become an admin request (400, or ``status``)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter; ``kind`` is a JSON Schema type (string/integer/boolean)."""

    name: str
    where: str  # "path" | "query"
    description: str
    kind: str = "string"
    required: bool = False


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """One API operation: ``method path`` runs admin op ``op`` for a ``scope`` token."""

    method: str
    path: str
    op: str
    scope: Scope
    summary: str
    response: dict[str, Any]
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None
    status: int = 200
    offload: bool = False  # run on a worker thread (reads a file or only computes)
    tag: str = ""
    defaults: tuple[tuple[str, Any], ...] = field(default=())


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    out.update(extra)
    return out


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


STR: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "boolean"}
INT: dict[str, Any] = {"type": "integer"}
NUM: dict[str, Any] = {"type": "number"}
TIME: dict[str, Any] = {"type": ["number", "null"], "description": "unix seconds"}
NSTR: dict[str, Any] = {"type": ["string", "null"]}
STRS: dict[str, Any] = {"type": "array", "items": STR}

#: Reusable schemas (``components/schemas`` of the OpenAPI document).
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(
        {
            "error": STR,
            "problems": {"type": "array", "items": _ref("PolicyProblem")},
            "more": INT,
        },
        ("error",),
    ),
    "PolicyProblem": _obj(
        {"line": INT, "column": INT, "path": STR, "error": STR},
        description="One problem found in a policy (position in the HuJSON text).",
    ),
    "Service": _obj({"name": STR, "port": INT}, ("name", "port")),
    "Node": _obj(
        {
            "name": STR,
            "node_id": STR,
            "online": BOOL,
            "last_seen": TIME,
            "address": STR,
            "services": {"type": "array", "items": _ref("Service")},
            "fingerprint": STR,
            "host_keys": STRS,
            "created_at": NUM,
            "user": STR,
            "tags": STRS,
            "approved": BOOL,
            "expires_at": TIME,
            "ephemeral": BOOL,
            "expiry_disabled": BOOL,
            "expiry_warning": STR,
        },
        ("name", "node_id", "online"),
    ),
    "NodeAction": _obj(
        {
            "name": STR,
            "node_id": STR,
            "approved": BOOL,
            "expires_at": TIME,
            "expiry_disabled": BOOL,
        },
        ("name", "node_id"),
    ),
    "AuthKey": _obj(
        {
            "key_id": STR,
            "reusable": BOOL,
            "status": STR,
            "uses": INT,
            "created_at": NUM,
            "expires_at": TIME,
            "last_used_at": TIME,
            "note": STR,
            "user": STR,
            "tags": STRS,
            "ephemeral": BOOL,
            "approval": BOOL,
        },
        ("key_id", "status"),
    ),
    "User": _obj({"name": STR, "created_at": NUM, "nodes": STRS}, ("name",)),
    "ApiKey": _obj(
        {
            "key_id": STR,
            "name": STR,
            "scope": {"type": "string", "enum": [s.value for s in Scope]},
            "user": NSTR,
            "created_at": NUM,
            "expires_at": TIME,
            "status": {"type": "string", "enum": ["valid", "revoked", "expired", "user removed"]},
        },
        ("key_id", "name", "scope", "status"),
    ),
    "PathReport": _obj(
        {
            "peer": STR,
            "reported_by": {
                "type": "string",
                "description": "the node that sent this report: this node, or the peer",
            },
            "kind": STR,
            "endpoint": STR,
            "rtt_ms": NUM,
            "code": STR,
            "reason": STR,
            "at": NUM,
            "punch_attempts": INT,
            "punch_successes": INT,
            "streams_direct": INT,
            "streams_relay": INT,
        },
        ("peer", "kind"),
        description="The last path report about one online peer: the node's own, else the "
        "peer's about the node.",
    ),
    "OnlineNode": _obj(
        {
            "name": STR,
            "node_id": STR,
            "address": STR,
            "user": STR,
            "tags": STRS,
            "services": {"type": "array", "items": _ref("Service")},
            "direct": {"type": "boolean", "description": "the node takes part in direct paths"},
            "paths": {
                "type": ["array", "null"],
                "items": _ref("PathReport"),
                "description": "null when too many nodes are online to list pairs",
            },
        },
        ("name", "node_id"),
    ),
    "Stream": _obj(
        {
            "stream_id": STR,
            "src": STR,
            "dst": STR,
            "path": STR,
            "state": STR,
            "coordinator_state": NSTR,
            "bytes_up": INT,
            "bytes_down": INT,
            "started": TIME,
        },
        ("stream_id", "src", "dst", "state"),
    ),
    "AuditEvent": _obj(
        {"ts": NUM, "kind": STR},
        ("ts", "kind"),
        additionalProperties=STR,
        description="One line of audit.jsonl: ts, kind, then the event's string fields.",
    ),
}


def _list(key: str, item: str, **more: Any) -> dict[str, Any]:
    return _obj({key: {"type": "array", "items": _ref(item)}, **more}, (key,))


NAME_PARAM = Param("name", "path", "node name", required=True)

#: Every route of the REST API (the OpenAPI document lists exactly these, plus /metrics).
ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute(
        "GET",
        f"{API_PREFIX}/openapi.json",
        "openapi",
        Scope.READ,
        "This OpenAPI 3.1 document",
        {"type": "object"},
        tag="meta",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/status",
        "status",
        Scope.READ,
        "Server status: version, addresses, pin, uptime, node and stream counts",
        _obj(
            {
                "live": BOOL,
                "version": STR,
                "listen": STR,
                "admin_listen": STR,
                "server_pin": STR,
                "started_at": NUM,
                "uptime": NUM,
                "nodes_total": INT,
                "nodes_online": INT,
                "streams_open": INT,
                "streams_relayed": INT,
                "streams_relayed_total": INT,
                "bytes_relayed_total": INT,
                "unauthenticated_connections": INT,
                "relay_only": BOOL,
                "probe_port": INT,
                "policy": NSTR,
            },
            ("live",),
        ),
        tag="status",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/status/nodes",
        "status.nodes",
        Scope.READ,
        "Online nodes with the paths they report to their online peers",
        _list("nodes", "OnlineNode", live=BOOL),
        tag="status",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/streams",
        "streams.list",
        Scope.READ,
        "Streams relayed through this server now (direct streams appear in the audit log)",
        _list("streams", "Stream", live=BOOL),
        tag="status",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/audit",
        "audit.list",
        Scope.READ,
        "The newest audit events matching the filters, oldest first",
        _list("events", "AuditEvent", matched=INT, skipped=INT),
        params=(
            Param("kind", "query", "only events of this kind (e.g. stream, enroll, node-remove)"),
            Param("node", "query", "only events whose node, src or dst is this node"),
            Param("since", "query", "unix time, or an age such as 30m, 1h, 7d"),
            Param("limit", "query", "at most this many events (1-1000, default 100)", "integer"),
        ),
        offload=True,
        tag="audit",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/nodes",
        "nodes.list",
        Scope.READ,
        "Every node: online, last seen, services, owner, key expiry",
        _list("nodes", "Node", live=BOOL),
        tag="nodes",
    ),
    ApiRoute(
        "DELETE",
        f"{API_PREFIX}/nodes/{{name}}",
        "nodes.remove",
        Scope.ADMIN,
        "Remove a node: its sessions and streams end now; it must re-enroll",
        _obj({"name": STR, "node_id": STR}, ("name", "node_id")),
        params=(NAME_PARAM,),
        tag="nodes",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/nodes/{{name}}/rename",
        "nodes.rename",
        Scope.ADMIN,
        "Rename a node: peers see the new name at once; the node saves it when it reconnects",
        _obj({"name": STR, "node_id": STR, "from": STR}, ("name", "node_id", "from")),
        params=(NAME_PARAM,),
        body=_obj({"new_name": STR}, ("new_name",), additionalProperties=False),
        tag="nodes",
    ),
    *(
        ApiRoute(
            "POST",
            f"{API_PREFIX}/nodes/{{name}}/{action}",
            f"nodes.{action}",
            Scope.ADMIN,
            summary,
            _ref("NodeAction"),
            params=(NAME_PARAM,),
            tag="nodes",
        )
        for action, summary in (
            ("approve", "Approve a node enrolled with an approval key"),
            ("expire", "Expire a node's key now (disconnects it until extended)"),
            ("extend", "Give a node's key a full lifetime from now"),
            ("disable-expiry", "Never expire this node's key"),
        )
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/keys",
        "keys.list",
        Scope.READ,
        "Auth keys (never their secrets)",
        _list("keys", "AuthKey"),
        tag="keys",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/keys",
        "keys.create",
        Scope.ADMIN,
        "Create an auth key; the answer's key is shown only this once",
        _obj(
            {
                "key": STR,
                "key_id": STR,
                "reusable": BOOL,
                "expires_at": TIME,
                "user": STR,
                "tags": STRS,
                "ephemeral": BOOL,
                "approval": BOOL,
            },
            ("key", "key_id"),
        ),
        body=_obj(
            {
                "reusable": BOOL,
                "expiry_seconds": {
                    "type": ["number", "null"],
                    "description": "lifetime in seconds (at most 10 years); null never expires;"
                    " default 86400",
                },
                "note": STR,
                "user": STR,
                "tags": STRS,
                "ephemeral": BOOL,
                "approval": BOOL,
            },
            additionalProperties=False,
        ),
        status=201,
        tag="keys",
        defaults=(("expiry_seconds", DEFAULT_KEY_EXPIRY),),
    ),
    ApiRoute(
        "DELETE",
        f"{API_PREFIX}/keys/{{key_id}}",
        "keys.revoke",
        Scope.ADMIN,
        "Revoke an auth key",
        _obj({"key_id": STR}, ("key_id",)),
        params=(Param("key_id", "path", "auth key id", required=True),),
        tag="keys",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/users",
        "users.list",
        Scope.READ,
        "Users and their nodes",
        _list("users", "User"),
        tag="users",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/users",
        "users.create",
        Scope.ADMIN,
        "Add a user",
        _obj({"name": STR}, ("name",)),
        body=_obj({"name": STR}, ("name",), additionalProperties=False),
        status=201,
        tag="users",
    ),
    ApiRoute(
        "DELETE",
        f"{API_PREFIX}/users/{{name}}",
        "users.remove",
        Scope.ADMIN,
        "Remove a user and revoke its auth and API keys (force: remove its nodes too)",
        _obj({"name": STR, "removed_nodes": STRS}, ("name", "removed_nodes")),
        params=(
            Param("name", "path", "user name", required=True),
            Param("force", "query", "also remove the user's nodes", "boolean"),
        ),
        tag="users",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/policy",
        "policy.get",
        Scope.READ,
        "The policy in force (its text as stored)",
        _obj({"set": BOOL, "text": NSTR, "digest": NSTR}, ("set",)),
        tag="policy",
    ),
    ApiRoute(
        "PUT",
        f"{API_PREFIX}/policy",
        "policy.set",
        Scope.ADMIN,
        "Put a policy in force (422 with every problem if refused; the old one stays)",
        _obj({"digest": STR, "acls": INT, "ssh": INT, "live": BOOL}, ("digest",)),
        body=_obj(
            {"text": {"type": "string", "description": "HuJSON policy"}},
            ("text",),
            additionalProperties=False,
        ),
        tag="policy",
    ),
    ApiRoute(
        "DELETE",
        f"{API_PREFIX}/policy",
        "policy.unset",
        Scope.ADMIN,
        "Remove the policy (every node may reach every exposed service)",
        _obj({"removed": BOOL, "live": BOOL}, ("removed",)),
        tag="policy",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/policy/check",
        "policy.check",
        Scope.READ,
        "Check a policy and run its tests without storing it (changes nothing: read scope)",
        _obj(
            {
                "valid": BOOL,
                "digest": STR,
                "acls": INT,
                "ssh": INT,
                "problems": {"type": "array", "items": _ref("PolicyProblem")},
                "more": INT,
            },
            ("valid",),
        ),
        body=_obj({"text": STR}, ("text",), additionalProperties=False),
        offload=True,
        tag="policy",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/policy/explain",
        "policy.explain",
        Scope.READ,
        "Dry run: may SRC reach DST:SERVICE (and log in as USER)? Verdict and deciding rule",
        _obj(
            {
                "policy": NSTR,
                "verdict": STR,
                "code": STR,
                "rule": STR,
                "reason": STR,
                "ssh": _obj(
                    {
                        "user": STR,
                        "verdict": STR,
                        "rule": STR,
                        "reason": STR,
                        "check_period": {"type": ["number", "null"]},
                    }
                ),
            },
            ("verdict", "rule", "reason"),
        ),
        params=(
            Param("src", "query", "a node name, tag:x or a user", required=True),
            Param("dst", "query", "a node name, tag:x or a user", required=True),
            Param("service", "query", "a port number or service name", required=True),
            Param("user", "query", "also explain an ssh login as this local user"),
        ),
        tag="policy",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/login/approve",
        "login.approve",
        Scope.ADMIN,
        "Approve a login check code (homeport login approve CODE)",
        _obj({"message": STR}, ("message",)),
        body=_obj({"code": STR}, ("code",), additionalProperties=False),
        tag="login",
    ),
    ApiRoute(
        "GET",
        f"{API_PREFIX}/apikeys",
        "apikeys.list",
        Scope.ADMIN,
        "API keys (never their tokens)",
        _list("keys", "ApiKey"),
        tag="apikeys",
    ),
    ApiRoute(
        "POST",
        f"{API_PREFIX}/apikeys",
        "apikeys.create",
        Scope.ADMIN,
        "Create an API key; the answer's token is shown only this once",
        _obj(
            {
                "token": STR,
                "key_id": STR,
                "name": STR,
                "scope": STR,
                "user": NSTR,
                "created_at": NUM,
                "expires_at": TIME,
            },
            ("token", "key_id"),
        ),
        body=_obj(
            {
                "name": STR,
                "scope": {"type": "string", "enum": [s.value for s in Scope]},
                "user": NSTR,
                "expiry_seconds": {
                    "type": ["number", "null"],
                    "description": "lifetime in seconds (at most 10 years); null never expires",
                },
            },
            ("name",),
            additionalProperties=False,
        ),
        status=201,
        tag="apikeys",
    ),
    ApiRoute(
        "DELETE",
        f"{API_PREFIX}/apikeys/{{key_id}}",
        "apikeys.revoke",
        Scope.ADMIN,
        "Revoke an API key (requests with it get 401 from now on)",
        _obj({"key_id": STR}, ("key_id",)),
        params=(Param("key_id", "path", "API key id", required=True),),
        tag="apikeys",
    ),
)


def _query_value(param: Param, text: str, now: float) -> Any:
    if len(text) > MAX_QUERY_VALUE:
        raise BadInput(f"query parameter {param.name} is too long")
    if param.kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise BadInput(f"{param.name} must be an integer, not {text!r}") from None
    if param.kind == "boolean":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise BadInput(f"{param.name} must be true or false, not {text!r}")
    if param.name == "since":
        try:
            value = float(text)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):
                raise BadInput(f"since must be a unix time or an age, not {text!r}")
            return value
        try:
            age = parse_duration(text)
        except ValueError as exc:
            raise BadInput(f"since: {exc}") from None
        return None if age is None else now - age
    return text


def build_request(
    route: ApiRoute,
    path_params: dict[str, Any],
    query: Mapping[str, str],
    body: dict[str, Any],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The admin request for ``route``: its defaults, the body, query and path parameters.

    Path and query parameters win over body fields of the same name, and ``op``
    always comes from the route. Unknown query parameters and body fields are
    refused (a typo in a filter must not silently list everything, nor one in
    ``expiry`` silently create a key with the default lifetime).
    """
    t = time.time() if now is None else now
    declared = {p.name for p in route.params if p.where == "query"}
    unknown = sorted(set(query) - declared)
    if unknown:
        raise BadInput(f"unknown query parameter(s): {', '.join(unknown)}")
    if route.body is not None:
        known = route.body.get("properties", {})
        extra = sorted(k for k in body if k not in known)
        if extra:
            raise BadInput(
                f"unknown body field(s): {', '.join(extra)} (known: {', '.join(sorted(known))})"
            )
    req: dict[str, Any] = {**dict(route.defaults), **body}
    for p in route.params:
        if p.where == "query":
            if p.name in query:
                req[p.name] = _query_value(p, query[p.name], t)
            elif p.required:
                raise BadInput(f"missing query parameter {p.name}")
        else:
            req[p.name] = str(path_params[p.name])
    req["op"] = route.op
    return req
