"""The REST API in-process: every endpoint, and who may call it (tokens and scopes).

The application is the real one (:func:`build_app`) over real :class:`AdminOps` on a
real SQLite file and audit log in ``tmp_path``; only the live server's view (online
nodes, streams) is a stand-in here — ``tests/test_api_e2e.py`` runs the real server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from homeport.proto.audit import Audit
from homeport.server import apikeys
from homeport.server.admin import AdminOps
from homeport.server.audit import append_now, audit_path
from homeport.server.web.api import ROUTES
from homeport.server.web.app import AdminContext, build_app
from homeport.store.db import NodeRow, default_url, open_store
from homeport.store.registry import Registry
from homeport.wire.control import ServiceInfo

EXAMPLE = Path(__file__).with_name("data") / "policy-example.hujson"
T0 = 1_800_000_000.0


class FakeView:
    """The live server's view, as the real ServiceView shapes it."""

    def server_info(self) -> dict[str, Any]:
        return {"version": "x", "nodes_total": 1, "nodes_online": 1, "streams_open": 1}

    def online_nodes(self) -> list[dict[str, Any]]:
        return [{"name": "labpc", "node_id": "n1", "paths": []}]

    def streams(self) -> list[dict[str, Any]]:
        return [{"stream_id": "s1", "src": "laptop", "dst": "labpc", "state": "splicing"}]


@dataclass
class Api:
    client: TestClient
    ops: AdminOps
    registry: Registry
    data: Path
    clock: list[float]
    logins: list[str] = field(default_factory=list)
    read: str = ""
    admin: str = ""

    def token(self, scope: str = "admin", **kw: Any) -> str:
        answer = self.ops.handle({"op": "apikeys.create", "name": "t", "scope": scope, **kw})
        assert answer["ok"], answer
        return str(answer["token"])

    def call(self, method: str, path: str, token: str | None = "", **kw: Any) -> Any:
        tok = self.admin if token == "" else token
        headers = {} if tok is None else {"Authorization": f"Bearer {tok}"}
        return self.client.request(method, f"/api/v1{path}", headers=headers, **kw)

    def ok(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        res = self.call(method, path, **kw)
        assert res.status_code == status, (res.status_code, res.text)
        assert res.headers["cache-control"] == "no-store"
        return res.json()


#: An ed25519 public key line; its ``ssh-keygen -l`` fingerprint is computed below.
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def _node(node_id: str, name: str, user: str = "", tags: tuple[str, ...] = ()) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        name=name,
        fingerprint=f"sha256:{node_id}",
        cert_pem="",
        created_at=T0,
        services=(ServiceInfo("ssh", 22),),
        host_keys=(HOST_KEY,),
        user=user,
        tags=tags,
    )


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    data = tmp_path / "server"
    data.mkdir()
    registry = Registry(open_store(default_url(str(data))), server_pin="pin")
    clock = [T0]
    logins: list[str] = []

    def approve(code: str) -> tuple[bool, str]:
        logins.append(code)
        return (code == "ABCD-EFGH", "approved" if code == "ABCD-EFGH" else "no such code")

    def audit(kind: str, fields: tuple[tuple[str, str], ...]) -> None:
        append_now(audit_path(data), Audit(kind, clock[0], fields))

    ops = AdminOps(
        registry,
        clock=lambda: clock[0],
        audit=audit,
        data_dir=data,
        approve_login=approve,
        live_view=FakeView(),
    )
    ctx = AdminContext(ops=ops, verify_token=ops.verify_api_token)
    with TestClient(build_app(ctx)) as client:
        a = Api(client, ops, registry, data, clock, logins)
        a.read, a.admin = a.token("read"), a.token("admin")
        yield a
    registry.close()


# -- authorization ---------------------------------------------------------------------


def test_no_token_or_a_malformed_header_is_401(api: Api) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}):
        res = api.client.get("/api/v1/nodes", headers=headers)
        assert res.status_code == 401, headers
        assert res.headers["www-authenticate"].startswith("Bearer")
        assert "error" in res.json()
    res = api.call("GET", "/nodes", token="hpk_000000000000_" + "A" * 43)
    assert res.status_code == 401 and res.json() == {
        "error": "invalid, expired or revoked API token"
    }


def test_a_token_is_checked_against_its_hash_not_its_id(api: Api) -> None:
    key_id = apikeys.token_key_id(api.read)
    assert key_id is not None
    forged = f"hpk_{key_id}_" + "B" * 43  # right id, wrong secret
    assert api.call("GET", "/nodes", token=forged).status_code == 401
    assert api.call("GET", "/nodes", token=api.read).status_code == 200
    # only the hash is stored
    [row] = [k for k in api.registry.list_api_keys() if k.key_id == key_id]
    assert row.token_hash == apikeys.hash_token(api.read) and api.read not in repr(row)


def test_read_scope_may_look_but_not_change(api: Api) -> None:
    for method, path in (("GET", "/nodes"), ("GET", "/keys"), ("GET", "/status")):
        assert api.call(method, path, token=api.read).status_code == 200, path
    res = api.call("POST", "/keys", token=api.read, json={})
    assert res.status_code == 403 and "scope read" in res.json()["error"]
    assert api.call("POST", "/users", token=api.read, json={"name": "bob"}).status_code == 403
    assert api.call("GET", "/apikeys", token=api.read).status_code == 403
    assert api.registry.list_auth_keys(T0) == [] and api.registry.list_users() == []


def test_every_write_route_needs_admin_scope(api: Api) -> None:
    """The authorization matrix over the whole table: read tokens get 403 on every route
    that changes something, and nothing runs."""
    for route in ROUTES:
        if route.scope is apikeys.Scope.READ:
            continue
        path = route.path.removeprefix("/api/v1").format(name="x", key_id="x")
        res = api.call(route.method, path, token=api.read, json={})
        assert res.status_code == 403, (route.method, path, res.text)
        assert api.call(route.method, path, token=None).status_code == 401, path
    assert api.registry.list_users() == [] and api.registry.list_auth_keys(T0) == []
    assert len(api.registry.list_api_keys()) == 2  # the fixture's own


def test_read_scope_is_exactly_the_routes_that_change_nothing() -> None:
    """GET is read scope (but the API key list); the one read-scope POST is the policy check,
    a dry run that stores nothing."""
    read = {(r.method, r.op) for r in ROUTES if r.scope is apikeys.Scope.READ}
    gets = {(r.method, r.op) for r in ROUTES if r.method == "GET"}
    assert read == (gets - {("GET", "apikeys.list")}) | {("POST", "policy.check")}


def test_a_revoked_token_is_401(api: Api) -> None:
    tok = api.token("admin")
    assert api.call("GET", "/nodes", token=tok).status_code == 200
    key_id = apikeys.token_key_id(tok)
    assert api.ok("DELETE", f"/apikeys/{key_id}") == {"key_id": key_id}
    assert api.call("GET", "/nodes", token=tok).status_code == 401
    [k] = [k for k in api.ok("GET", "/apikeys")["keys"] if k["key_id"] == key_id]
    assert k["status"] == "revoked"
    assert api.call("DELETE", "/apikeys/000000000000").status_code == 404


def test_an_expired_token_is_401(api: Api) -> None:
    tok = api.token("read", expiry_seconds=60)
    assert api.call("GET", "/nodes", token=tok).status_code == 200
    api.clock[0] += 61
    assert api.call("GET", "/nodes", token=tok).status_code == 401
    key_id = apikeys.token_key_id(tok)
    [k] = [k for k in api.ok("GET", "/apikeys")["keys"] if k["key_id"] == key_id]
    assert k["status"] == "expired"


def test_the_token_of_a_removed_user_is_401(api: Api) -> None:
    api.ok("POST", "/users", 201, json={"name": "alice"})
    tok = api.token("admin", user="alice")
    assert api.call("GET", "/nodes", token=tok).status_code == 200
    assert api.ok("DELETE", "/users/alice") == {"name": "alice", "removed_nodes": []}
    assert api.call("GET", "/nodes", token=tok).status_code == 401
    # re-creating a user of the same name does not bring the old token back
    api.ok("POST", "/users", 201, json={"name": "alice"})
    assert api.call("GET", "/nodes", token=tok).status_code == 401


def test_a_key_for_an_unknown_user_or_with_a_bad_scope_is_refused(api: Api) -> None:
    res = api.call("POST", "/apikeys", json={"name": "x", "user": "nobody"})
    assert res.status_code == 404 and "no user 'nobody'" in res.json()["error"]
    res = api.call("POST", "/apikeys", json={"name": "x", "scope": "root"})
    assert res.status_code == 400 and "scope must be read or admin" in res.json()["error"]
    assert api.call("POST", "/apikeys", json={"name": " "}).status_code == 400


def test_apikeys_create_shows_the_token_once_and_it_works(api: Api) -> None:
    made = api.ok("POST", "/apikeys", 201, json={"name": "grafana", "scope": "read"})
    assert made["token"].startswith("hpk_") and made["scope"] == "read"
    listed = api.ok("GET", "/apikeys")["keys"]
    assert made["token"] not in json.dumps(listed)
    assert [k["name"] for k in listed if k["key_id"] == made["key_id"]] == ["grafana"]
    assert api.call("GET", "/status", token=made["token"]).status_code == 200
    kinds = [(e["kind"], e["event"]) for e in api.ok("GET", "/audit?kind=api-key")["events"]]
    assert kinds[-1] == ("api-key", "create")


# -- metrics ---------------------------------------------------------------------------


def _app(api: Api, **kw: Any) -> TestClient:
    ctx = AdminContext(ops=api.ops, verify_token=api.ops.verify_api_token, **kw)
    return TestClient(build_app(ctx))


def test_metrics_on_loopback_need_no_token_elsewhere_a_read_token(api: Api) -> None:
    def expo() -> tuple[bytes, str]:
        return b"homeport_nodes_online 1\n", "text/plain; version=0.0.4"

    with _app(api, metrics=expo, loopback=True) as c:
        res = c.get("/metrics")
        assert res.status_code == 200 and res.text == "homeport_nodes_online 1\n"
        assert res.headers["content-type"].startswith("text/plain; version=0.0.4")
    with _app(api, metrics=expo, loopback=False) as c:
        assert c.get("/metrics").status_code == 401
        auth = {"Authorization": f"Bearer {api.read}"}
        assert c.get("/metrics", headers=auth).status_code == 200
    with _app(api, metrics=None, loopback=True) as c:
        assert c.get("/metrics").status_code == 404


def test_extra_routes_are_mounted_and_keep_their_own_rules(api: Api) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    async def page(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ui")

    with _app(api, extra_routes=(Route("/ui", page),)) as c:
        assert c.get("/ui").text == "ui"
        assert c.get("/nope").status_code == 404
        assert c.get("/nope").text == "Not Found"  # not the API's JSON outside /api
        assert c.get("/api/v1/nope").json()["error"].startswith("no such route")


# -- endpoints -------------------------------------------------------------------------


def test_status_nodes_and_streams_come_from_the_live_view(api: Api) -> None:
    assert api.ok("GET", "/status")["live"] is True
    assert api.ok("GET", "/status")["nodes_online"] == 1
    assert api.ok("GET", "/status/nodes") == {
        "live": True,
        "nodes": [{"name": "labpc", "node_id": "n1", "paths": []}],
    }
    streams = api.ok("GET", "/streams")
    assert streams["live"] is True and streams["streams"][0]["stream_id"] == "s1"


def test_status_without_a_live_server(tmp_path: Path) -> None:
    registry = Registry(open_store("sqlite://"), server_pin="pin")
    ops = AdminOps(registry, data_dir=tmp_path)
    tok = ops.handle({"op": "apikeys.create", "name": "t", "scope": "read"})["token"]
    with TestClient(build_app(AdminContext(ops=ops, verify_token=ops.verify_api_token))) as c:
        h = {"Authorization": f"Bearer {tok}"}
        assert c.get("/api/v1/status", headers=h).json() == {
            "live": False,
            "nodes_total": 0,
            "nodes_online": 0,
        }
        assert c.get("/api/v1/streams", headers=h).json() == {"live": False, "streams": []}
        assert c.get("/api/v1/status/nodes", headers=h).json() == {"live": False, "nodes": []}
    registry.close()


def test_auth_keys_create_list_revoke(api: Api) -> None:
    made = api.ok("POST", "/keys", 201, json={"reusable": True, "note": "lab"})
    assert made["key"].startswith("hpk1_") and made["reusable"] is True
    assert made["expires_at"] == T0 + 86400  # the CLI's default 24h
    never = api.ok("POST", "/keys", 201, json={"expiry_seconds": None})
    assert never["expires_at"] is None
    keys = {k["key_id"]: k for k in api.ok("GET", "/keys")["keys"]}
    assert keys[made["key_id"]]["note"] == "lab" and made["key"] not in json.dumps(keys)
    assert api.ok("DELETE", f"/keys/{made['key_id']}") == {"key_id": made["key_id"]}
    assert api.ok("GET", "/keys")["keys"][0]["status"] == "revoked"
    res = api.call("DELETE", "/keys/nope")
    assert res.status_code == 404 and res.json() == {"error": "no auth key 'nope'"}
    res = api.call("POST", "/keys", json={"reusable": "yes"})
    assert res.status_code == 400 and res.json()["error"].startswith("bad request:")


def test_bad_bodies_are_400_and_huge_ones_413(api: Api) -> None:
    h = {"Authorization": f"Bearer {api.admin}", "Content-Type": "application/json"}
    res = api.client.post("/api/v1/users", content=b"{not json", headers=h)
    assert res.status_code == 400 and res.json() == {"error": "request body is not JSON"}
    res = api.client.post("/api/v1/users", content=b"[1, 2]", headers=h)
    assert res.status_code == 400 and "JSON object" in res.json()["error"]
    res = api.client.put("/api/v1/policy", content=b" " * (8 * 1024 * 1024 + 1), headers=h)
    assert res.status_code == 413
    res = api.call("GET", "/audit?kind=x&bogus=1")
    assert res.status_code == 400 and "bogus" in res.json()["error"]
    assert api.call("PATCH", "/nodes").status_code == 405


def test_users_create_list_remove(api: Api) -> None:
    assert api.ok("POST", "/users", 201, json={"name": "alice"}) == {"name": "alice"}
    res = api.call("POST", "/users", json={"name": "alice"})
    assert res.status_code == 409 and "already exists" in res.json()["error"]
    assert api.call("POST", "/users", json={"name": "Not A Name!"}).status_code == 400
    api.registry.store.insert_node(_node("n1", "labpc", user="alice"))
    [u] = api.ok("GET", "/users")["users"]
    assert (u["name"], u["nodes"]) == ("alice", ["labpc"])
    res = api.call("DELETE", "/users/alice")
    assert res.status_code == 409 and "still has 1 node(s): labpc" in res.json()["error"]
    assert api.ok("DELETE", "/users/alice?force=true") == {
        "name": "alice",
        "removed_nodes": ["labpc"],
    }
    assert api.call("DELETE", "/users/alice").status_code == 404
    assert api.call("DELETE", "/users/x?force=maybe").status_code == 400


def test_nodes_list_actions_and_remove(api: Api) -> None:
    api.registry.store.insert_node(_node("n1", "labpc"))
    [n] = api.ok("GET", "/nodes")["nodes"]
    blob = base64.b64decode(HOST_KEY.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert n["host_keys"] == [f"ssh-ed25519 SHA256:{digest}"]
    assert (n["name"], n["online"], n["services"]) == (
        "labpc",
        False,
        [{"name": "ssh", "port": 22}],
    )
    assert api.ok("POST", "/nodes/labpc/expire")["expires_at"] == T0
    assert api.ok("POST", "/nodes/labpc/extend")["expires_at"] > T0
    assert api.ok("POST", "/nodes/labpc/disable-expiry")["expiry_disabled"] is True
    assert api.ok("POST", "/nodes/labpc/approve")["approved"] is True
    assert api.call("POST", "/nodes/ghost/approve").status_code == 404
    renamed = api.ok("POST", "/nodes/labpc/rename", json={"new_name": "labpc2"})
    assert renamed == {"name": "labpc2", "node_id": "n1", "from": "labpc"}
    assert api.call("POST", "/nodes/labpc/rename", json={"new_name": "x"}).status_code == 404
    assert (
        api.call("POST", "/nodes/labpc2/rename", json={"new_name": "bad name!"}).status_code == 400
    )
    assert api.ok("POST", "/nodes/labpc2/rename", json={"new_name": "labpc"})["name"] == "labpc"
    assert api.ok("DELETE", "/nodes/labpc") == {"name": "labpc", "node_id": "n1"}
    assert api.ok("GET", "/nodes")["nodes"] == []
    res = api.call("DELETE", "/nodes/labpc")
    assert res.status_code == 404 and res.json() == {"error": "no node named 'labpc'"}


def test_policy_get_set_check_explain_unset(api: Api) -> None:
    assert api.ok("GET", "/policy") == {"set": False, "text": None, "digest": None}
    text = EXAMPLE.read_text()
    checked = api.ok("POST", "/policy/check", token=api.read, json={"text": text})
    assert checked["valid"] is True and checked["acls"] == 2
    bad = '{"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}'
    checked = api.ok("POST", "/policy/check", json={"text": bad})
    assert checked["valid"] is False
    assert checked["problems"][0]["error"] == "'group:x' is not defined in groups"
    assert api.ok("GET", "/policy") == {"set": False, "text": None, "digest": None}  # unchanged
    put = api.ok("PUT", "/policy", json={"text": text})
    assert put["acls"] == 2 and put["digest"] == api.ok("GET", "/policy")["digest"]
    res = api.call("PUT", "/policy", json={"text": bad})
    assert res.status_code == 422
    assert res.json()["error"] == "policy refused; the policy in force is unchanged"
    assert res.json()["problems"][0]["path"] == "acls[0].src[0]"
    assert api.ok("GET", "/policy")["text"] == text
    explained = api.ok(
        "GET",
        "/policy/explain?src=dedede@daioh.com&dst=tag:pupupuserver&service=22&user=root",
        token=api.read,
    )
    assert (explained["verdict"], explained["rule"]) == ("allow", "acls[1]")
    assert explained["ssh"]["verdict"] == "deny"
    res = api.call("GET", "/policy/explain?src=a&dst=b")
    assert res.status_code == 400 and res.json() == {"error": "missing query parameter service"}
    assert api.call("GET", "/policy/explain?src=ghost&dst=tag:x&service=22").status_code == 404
    assert api.ok("DELETE", "/policy") == {"removed": True, "live": False}
    assert api.ok("GET", "/policy")["set"] is False


def test_login_approve(api: Api) -> None:
    assert api.ok("POST", "/login/approve", json={"code": "ABCD-EFGH"}) == {"message": "approved"}
    res = api.call("POST", "/login/approve", json={"code": "WRONG"})
    assert res.status_code == 400 and res.json() == {"error": "no such code"}
    assert api.call("POST", "/login/approve", json={}).status_code == 400
    assert api.logins == ["ABCD-EFGH", "WRONG"]


def test_audit_with_filters(api: Api) -> None:
    path = audit_path(api.data)
    for i, (kind, fields) in enumerate(
        [
            ("stream", (("src", "laptop"), ("dst", "labpc"))),
            ("node-remove", (("node", "labpc"),)),
            ("stream", (("src", "laptop"), ("dst", "nas"))),
            ("enroll", (("node", "nas"),)),
        ]
    ):
        append_now(path, Audit(kind, T0 + 10 + i, fields))
    with path.open("ab") as f:
        f.write(b"not json\n")
    every = api.ok("GET", "/audit", token=api.read)
    kinds = [e["kind"] for e in every["events"]]
    assert kinds[-4:] == ["stream", "node-remove", "stream", "enroll"] and every["skipped"] == 1
    streams = api.ok("GET", "/audit?kind=stream")["events"]
    assert [e["dst"] for e in streams] == ["labpc", "nas"]
    labpc = api.ok("GET", "/audit?node=labpc")["events"]
    assert [e["kind"] for e in labpc] == ["stream", "node-remove"]
    since = api.ok("GET", f"/audit?since={T0 + 12}")["events"]
    assert [e["kind"] for e in since] == ["stream", "enroll"]
    last = api.ok("GET", "/audit?limit=1")
    assert [e["kind"] for e in last["events"]] == ["enroll"] and last["matched"] >= 4
    assert api.call("GET", "/audit?limit=0").status_code == 400
    assert api.call("GET", "/audit?limit=x").status_code == 400
    assert api.call("GET", "/audit?since=soon").status_code == 400


def test_audit_since_an_age(api: Api) -> None:
    import time

    now = time.time()
    append_now(audit_path(api.data), Audit("enroll", now - 7200, (("node", "old"),)))
    append_now(audit_path(api.data), Audit("enroll", now - 60, (("node", "new"),)))
    recent = api.ok("GET", "/audit?kind=enroll&since=1h")["events"]
    assert [e["node"] for e in recent] == ["new"]
    assert len(api.ok("GET", "/audit?kind=enroll&since=3h")["events"]) == 2


def test_audit_without_a_log_is_empty(tmp_path: Path) -> None:
    registry = Registry(open_store("sqlite://"), server_pin="pin")
    ops = AdminOps(registry, data_dir=tmp_path)
    answer = ops.handle({"op": "audit.list"})
    assert answer == {"ok": True, "events": [], "matched": 0, "skipped": 0}
    registry.close()


def test_service_view_lists_paths_between_online_nodes_and_relayed_streams() -> None:
    """The live view over stand-ins for the coordinator and the relay (their real data types)."""
    from types import SimpleNamespace

    from homeport.proto.coord import NodeStatus, PathRecord
    from homeport.proto.coord import StreamState as CoordState
    from homeport.relay.link import RelayStats, StreamStats
    from homeport.relay.pairing import StreamState
    from homeport.server.liveview import ServiceView

    def status(node_id: str, name: str, online: bool) -> NodeStatus:
        return NodeStatus(node_id, name, online, None, "", (), "fp", T0)

    rec = PathRecord("direct", "198.51.100.7:41641", 3.5, "ok", "direct", T0)
    every = [status("a", "laptop", True), status("b", "labpc", True), status("c", "nas", False)]
    core = SimpleNamespace(
        node_list=lambda: every,
        path_record=lambda r, p: rec if (r, p) == ("a", "b") else None,
        endpoints_of=lambda n: object() if n == "a" else None,
        stream_states=lambda: {"s1": CoordState.LIVE},
        policy=None,
        relay_only=False,
    )
    stats = RelayStats(
        (StreamStats("s1", "a", "b", StreamState.SPLICING, 10, 20, T0),), 0, 1, 30, True
    )
    service = SimpleNamespace(
        core=core,
        relay=SimpleNamespace(statistics=lambda: stats),
        unauthenticated=0,
        probe_port=0,
    )
    view = ServiceView(service, listen="127.0.0.1:1", pin="pin", clock=lambda: T0)  # type: ignore[arg-type]
    nodes = {n["name"]: n for n in view.online_nodes()}
    assert set(nodes) == {"laptop", "labpc"}
    assert nodes["laptop"]["direct"] is True
    [path] = nodes["laptop"]["paths"]
    assert (path["peer"], path["kind"], path["endpoint"]) == ("labpc", "direct", rec.endpoint)
    assert path["reported_by"] == "laptop"
    # labpc sent no report (the far end of a direct stream often does not): laptop's shows
    [back] = nodes["labpc"]["paths"]
    assert (back["peer"], back["kind"], back["reported_by"]) == ("laptop", "direct", "laptop")
    [stream] = view.streams()
    assert (stream["src"], stream["dst"], stream["state"]) == ("laptop", "labpc", "splicing")
    assert (stream["bytes_up"], stream["bytes_down"], stream["coordinator_state"]) == (
        10,
        20,
        "live",
    )
    info = view.server_info()
    assert (info["nodes_total"], info["nodes_online"], info["streams_relayed"]) == (3, 2, 1)
    assert info["bytes_relayed_total"] == 30 and info["policy"] is None


# -- non-finite numbers and unknown fields (a user's bug reports) ---------------------------


def test_a_non_finite_or_huge_expiry_is_400_and_stores_nothing(api: Api) -> None:
    h = {"Authorization": f"Bearer {api.admin}", "Content-Type": "application/json"}
    before = len(api.ok("GET", "/keys")["keys"])
    for path in ("/keys", "/apikeys"):
        for raw in (b"Infinity", b"-Infinity", b"NaN"):
            body = b'{"name": "x", "expiry_seconds": ' + raw + b"}"
            if path == "/keys":
                body = b'{"expiry_seconds": ' + raw + b"}"
            res = api.client.post(f"/api/v1{path}", content=body, headers=h)
            assert res.status_code == 400, (path, raw, res.text)
            assert raw.decode().lstrip("-") in res.json()["error"]
        for value in (1e300, 0, -5, 11 * 365 * 86400):
            fields: dict[str, object] = {"expiry_seconds": value}
            if path == "/apikeys":
                fields["name"] = "x"
            res = api.call("POST", path, json=fields)
            assert res.status_code == 400, (path, value, res.text)
            assert "expiry_seconds" in res.json()["error"] and "\n" not in res.json()["error"]
    assert len(api.ok("GET", "/keys")["keys"]) == before
    assert api.ok("POST", "/keys", 201, json={"expiry_seconds": 3650 * 86400})["expires_at"]
    assert api.ops.handle({"op": "keys.create", "expiry_seconds": float("inf")})["ok"] is False
    assert api.ops.handle({"op": "keys.create", "expiry_seconds": float("nan")})["ok"] is False


def test_listings_survive_a_non_finite_time_already_stored(api: Api) -> None:
    """Rows written before expiries were checked: the listings show them as "never"."""
    made = api.ok("POST", "/keys", 201, json={})
    made_api = api.ok("POST", "/apikeys", 201, json={"name": "old"})
    with sqlite3.connect(api.data / "homeport.db") as db:  # as an older version stored them
        db.execute(
            "UPDATE auth_keys SET expires_at = ? WHERE key_id = ?", (float("inf"), made["key_id"])
        )
        db.execute(
            "UPDATE api_keys SET expires_at = ? WHERE key_id = ?",
            (float("inf"), made_api["key_id"]),
        )
    keys = {k["key_id"]: k for k in api.ok("GET", "/keys")["keys"]}
    assert keys[made["key_id"]]["expires_at"] is None
    akeys = {k["key_id"]: k for k in api.ok("GET", "/apikeys")["keys"]}
    assert akeys[made_api["key_id"]]["expires_at"] is None
    assert akeys[made_api["key_id"]]["status"] == "valid"
    answer = api.ops.handle({"op": "apikeys.list"})
    json.dumps(answer, allow_nan=False)  # the CLI's --json output stays valid JSON


def test_the_api_never_sends_a_non_finite_number() -> None:
    from homeport.server.web.app import json_safe

    assert json_safe({"a": [float("inf"), 1.5, {"b": float("nan")}], "c": "x"}) == {
        "a": [None, 1.5, {"b": None}],
        "c": "x",
    }


def test_unknown_body_fields_are_400_naming_them(api: Api) -> None:
    res = api.call("POST", "/keys", json={"expiry": "5"})
    assert res.status_code == 400 and "expiry" in res.json()["error"]
    assert "expiry_seconds" in res.json()["error"]  # the known ones, to spot the typo
    for route in ROUTES:
        if route.body is None:
            continue
        assert route.body.get("additionalProperties") is False, route.path
        path = route.path.replace("{name}", "labpc").replace("/api/v1", "")
        res = api.call(route.method, path, json={"bogus_field": 1})
        assert res.status_code == 400, (route.path, res.text)
        assert "bogus_field" in res.json()["error"], route.path


def test_a_body_sent_to_a_route_without_one_is_400(api: Api) -> None:
    res = api.call("POST", "/nodes/labpc/extend", json={"seconds": 100})
    assert res.status_code == 400 and "seconds" in res.json()["error"]
    res = api.call("DELETE", "/keys/abc", json={"force": True})
    assert res.status_code == 400 and "takes no body" in res.json()["error"]
    assert api.call("DELETE", "/keys/abc").status_code == 404  # no body: as before
