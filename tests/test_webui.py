"""Web UI units: login, session cookie, CSRF, CSP, expiry, read-only scope, escaping.

The pages run in-process against a real :class:`AdminOps` on an in-memory SQLite
registry, through Starlette's test client (real HTTP semantics, no socket). The
browser journey is tests/test_webui_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from homeport.proto.coord import NodeStatus
from homeport.server.admin import AdminOps
from homeport.server.web.app import AdminContext, build_app
from homeport.server.webui import routes
from homeport.server.webui.session import LINK_TTL, SESSION_IDLE, SESSION_MAX, SessionStore
from homeport.store.db import open_store
from homeport.store.registry import Registry
from homeport.wire import control as m

HOSTILE = '<img src=x onerror="alert(1)">&amp;'
POLICY_OK = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}'
POLICY_FAILING_TEST = (
    '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}],\n'
    ' "tests": [{"src": "alice@example.com", "deny": ["tag:x:22"]}],\n'
    ' "tagOwners": {"tag:x": ["alice@example.com"]}}'
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class UI:
    client: TestClient
    ctx: AdminContext
    clock: Clock
    wall: Clock
    admin_token: str
    read_token: str

    def login(self, token: str | None = None) -> None:
        token = token or self.admin_token
        page = self.client.get("/ui/login")
        nonce = _field(page.text, "login_csrf")
        resp = self.client.post(
            "/ui/login", data={"login_csrf": nonce, "token": token}, follow_redirects=False
        )
        assert resp.status_code == 303, resp.text

    def csrf(self, path: str = "/ui/nodes") -> str:
        return _field(self.client.get(path).text, "csrf")


class _Tags(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: script tags without src,
    style/on* attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[bool] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        if tag == "script":
            self.scripts.append("src" in names)
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [k for k in names if k == "style" or k.startswith("on")]


def _field(html: str, name: str) -> str:
    mo = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert mo is not None, f"no {name} field in {html[:2000]}"
    return mo.group(1)


def _hostile_nodes() -> list[NodeStatus]:
    return [
        NodeStatus(
            node_id="n" + "1" * 15,
            name=HOSTILE,
            online=True,
            last_seen=None,
            address="127.0.0.1:1",
            services=(m.ServiceInfo(HOSTILE, 22),),
            fingerprint="sha256:" + "ab" * 32,
            created_at=900.0,
            tags=("tag:<b>x</b>",),
        )
    ]


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[UI]:
    wall = Clock()
    registry = Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32)
    ops = AdminOps(registry, data_dir=tmp_path, clock=wall, live=True, nodes=_hostile_nodes)
    ops.ui_url = "http://testserver"
    admin = ops.handle({"op": "apikeys.create", "name": "ops-admin", "scope": "admin"})
    read = ops.handle({"op": "apikeys.create", "name": "viewer", "scope": "read"})
    ctx = AdminContext(ops, ops.verify_api_token)
    clock = Clock()
    app = build_app(replace(ctx, extra_routes=tuple(routes(ctx, clock=clock, wall=wall))))
    with TestClient(app) as client:
        yield UI(client, ctx, clock, wall, admin["token"], read["token"])
    registry.close()


def test_pages_need_a_login(ui: UI) -> None:
    for path in ("/ui/nodes", "/ui/keys", "/ui/users", "/ui/policy", "/ui/audit", "/ui/streams"):
        resp = ui.client.get(path, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/login", path
    resp = ui.client.post("/ui/keys/create", data={"csrf": "x"}, follow_redirects=False)
    assert resp.status_code == 401
    assert ui.ctx.ops.handle({"op": "keys.list"})["keys"] == []


def test_security_headers_on_every_response(ui: UI) -> None:
    ui.login()
    for path in ("/ui/login", "/ui/nodes", "/ui/static/app.js", "/ui/static/app.css", "/ui/nope"):
        resp = ui.client.get(path)
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["cache-control"] == "no-store"
    for path in ("/ui/nodes", "/ui/keys", "/ui/users", "/ui/policy", "/ui/audit", "/ui/login"):
        html = ui.client.get(path).text
        # no inline script or style: every <script> has a src, no style or on* attributes
        tags = _Tags()
        tags.feed(html)
        assert tags.scripts and all(tags.scripts), path
        assert tags.inline == [], path


def test_session_cookie_attributes(ui: UI) -> None:
    ui.login()
    resp = ui.client.get("/ui/login")
    assert resp.status_code == 200
    page = ui.client.get("/ui/login")
    nonce = _field(page.text, "login_csrf")
    resp = ui.client.post(
        "/ui/login", data={"login_csrf": nonce, "token": ui.admin_token}, follow_redirects=False
    )
    cookie = next(v for k, v in resp.headers.multi_items() if v.startswith("hp_session="))
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/ui" in attrs
    assert "secure" not in attrs  # plain http on loopback
    assert ui.admin_token not in cookie and "hpk_" not in cookie  # a random id, not the token
    secure = TestClient(ui.client.app, base_url="https://testserver")
    nonce = _field(secure.get("/ui/login").text, "login_csrf")
    resp = secure.post(
        "/ui/login", data={"login_csrf": nonce, "token": ui.admin_token}, follow_redirects=False
    )
    cookie = next(v for k, v in resp.headers.multi_items() if v.startswith("hp_session="))
    assert "secure" in {a.strip().lower() for a in cookie.split(";")[1:]}


def test_login_refusals(ui: UI) -> None:
    resp = ui.client.post("/ui/login", data={"token": ui.admin_token}, follow_redirects=False)
    assert resp.status_code == 403 and "expired" in resp.text  # no login nonce: login CSRF
    nonce = _field(ui.client.get("/ui/login").text, "login_csrf")
    resp = ui.client.post("/ui/login", data={"login_csrf": nonce, "token": "hpk_nope"})
    assert resp.status_code == 401 and "unknown or revoked API token" in resp.text
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 303


def test_csrf_token_required_on_every_post(ui: UI) -> None:
    ui.login()
    token = ui.csrf()
    form = {"expiry": "1h", "note": "n"}
    for bad in ({}, {"csrf": ""}, {"csrf": token[:-1] + ("A" if token[-1] != "A" else "B")}):
        resp = ui.client.post("/ui/keys/create", data={**form, **bad})
        assert resp.status_code == 403 and "CSRF" in resp.text
    resp = ui.client.post(
        "/ui/keys/create",
        data={**form, "csrf": token},
        headers={"origin": "http://evil.example"},
    )
    assert resp.status_code == 403 and "another site" in resp.text
    assert ui.ctx.ops.handle({"op": "keys.list"})["keys"] == []  # nothing was created
    resp = ui.client.post("/ui/keys/create", data={**form, "csrf": token})
    assert resp.status_code == 200
    key = ui.ctx.ops.handle({"op": "keys.list"})["keys"][0]
    shown = re.search(r'id="new-key-value">([^<]+)<', resp.text)
    assert shown is not None and key["key_id"] in shown.group(1)
    assert shown.group(1) not in ui.client.get("/ui/keys").text  # shown once only


def test_key_create_has_the_cli_options(ui: UI) -> None:
    ui.login()
    assert ui.ctx.ops.handle({"op": "users.create", "name": "alice@example.com"})["ok"]
    resp = ui.client.post(
        "/ui/keys/create",
        data={
            "csrf": ui.csrf(),
            "expiry": "2h",
            "tags": "tag:a, tag:b",
            "note": "for the lab",
            "reusable": "on",
            "ephemeral": "on",
            "approval": "on",
        },
    )
    assert resp.status_code == 200
    (key,) = ui.ctx.ops.handle({"op": "keys.list"})["keys"]
    assert key["reusable"] and key["ephemeral"] and key["approval"]
    assert key["tags"] == ["tag:a", "tag:b"]
    assert key["note"] == "for the lab"
    assert key["expires_at"] == pytest.approx(ui.wall.now + 7200)
    owned = ui.client.post(
        "/ui/keys/create", data={"csrf": ui.csrf(), "user": "alice@example.com", "tags": "tag:a"}
    )
    assert owned.status_code == 400 and "not both" in owned.text  # the CLI's refusal, shown
    ui.client.post("/ui/keys/create", data={"csrf": ui.csrf(), "user": "alice@example.com"})
    assert ui.ctx.ops.handle({"op": "keys.list"})["keys"][-1]["user"] == "alice@example.com"
    bad = ui.client.post("/ui/keys/create", data={"csrf": ui.csrf(), "expiry": "soon"})
    assert bad.status_code == 400 and "bad duration" in bad.text
    revoke = ui.client.post("/ui/keys/revoke", data={"csrf": ui.csrf(), "key_id": key["key_id"]})
    assert revoke.status_code == 200 and f"auth key {key['key_id']} revoked" in revoke.text
    statuses = {k["key_id"]: k["status"] for k in ui.ctx.ops.handle({"op": "keys.list"})["keys"]}
    assert statuses[key["key_id"]] == "revoked"


def test_session_expires_when_idle_and_at_its_maximum_age(ui: UI) -> None:
    ui.login()
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 200
    ui.clock.now += SESSION_IDLE - 1
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 200
    ui.clock.now += SESSION_IDLE + 1  # idle too long
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 303
    ui.login()
    for _ in range(int(SESSION_MAX // (SESSION_IDLE / 2)) + 1):  # active, but too old
        ui.clock.now += SESSION_IDLE / 2
        ui.client.get("/ui/nodes", follow_redirects=False)
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 303


def test_revoked_token_ends_its_session(ui: UI) -> None:
    ui.login()
    assert ui.client.get("/ui/keys", follow_redirects=False).status_code == 200
    key_id = ui.admin_token.split("_")[1]
    assert ui.ctx.ops.handle({"op": "apikeys.revoke", "key_id": key_id})["ok"]
    assert ui.client.get("/ui/keys", follow_redirects=False).status_code == 303


def test_read_only_token_sees_pages_but_no_actions(ui: UI) -> None:
    ui.login(ui.read_token)
    nodes = ui.client.get("/ui/nodes")
    assert nodes.status_code == 200 and "viewer · read" in nodes.text
    assert "/ui/nodes/action" not in nodes.text
    assert "/ui/keys/create" not in ui.client.get("/ui/keys").text
    token = ui.csrf()
    for path, form in (
        ("/ui/keys/create", {"expiry": "1h"}),
        ("/ui/nodes/action", {"action": "remove", "name": HOSTILE}),
        ("/ui/users/create", {"name": "bob@example.com"}),
        ("/ui/policy/save", {"text": POLICY_OK}),
    ):
        resp = ui.client.post(path, data={**form, "csrf": token})
        assert resp.status_code == 403 and "read-only" in resp.text, path
    assert ui.ctx.ops.handle({"op": "keys.list"})["keys"] == []
    assert ui.ctx.ops.handle({"op": "users.list"})["users"] == []
    assert ui.ctx.ops.handle({"op": "policy.get"})["set"] is False
    # a dry run changes nothing: allowed
    explain = ui.client.post(
        "/ui/policy/explain",
        data={"csrf": token, "src": "alice@example.com", "dst": "tag:x", "service": "22"},
    )
    assert explain.status_code == 200 and "allow" in explain.text


def test_hostile_node_name_is_escaped(ui: UI) -> None:
    ui.login()
    html = ui.client.get("/ui/nodes").text
    assert HOSTILE not in html and "<img" not in html and "<b>x</b>" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;amp;" in html
    assert "tag:&lt;b&gt;x&lt;/b&gt;" in html


def test_hostile_audit_fields_are_escaped(ui: UI) -> None:
    ui.login()
    token = ui.csrf()
    ui.client.post("/ui/keys/create", data={"csrf": token, "note": HOSTILE})
    (ui.ctx.ops.data_dir or Path()).joinpath("audit.jsonl").write_text(
        '{"ts": 1000.5, "kind": "key-create", "note": "<script>alert(1)</script>"}\n'
        '{"ts": 1001.5, "kind": "stream", "src": "laptop", "dst": "labpc"}\n',
        encoding="utf-8",
    )
    html = ui.client.get("/ui/audit").text
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    filtered = ui.client.get("/ui/audit", params={"kind": "stream"}).text
    assert "labpc" in filtered and "alert(1)" not in filtered
    assert "labpc" not in ui.client.get("/ui/audit", params={"q": "script"}).text


def test_one_time_link_logs_in_once(ui: UI) -> None:
    answer = ui.ctx.ops.handle({"op": "ui.link"})
    assert answer["ok"] and answer["url"].startswith("http://testserver/ui/login#link=")
    assert answer["expires_at"] == ui.wall.now + LINK_TTL
    secret = answer["url"].split("#link=", 1)[1]
    for expect in (303, 401):  # the second use is refused
        ui.client.cookies.clear()
        nonce = _field(ui.client.get("/ui/login").text, "login_csrf")
        resp = ui.client.post(
            "/ui/login", data={"login_csrf": nonce, "link": secret}, follow_redirects=False
        )
        assert resp.status_code == expect
    assert "already used or has expired" in resp.text
    late = ui.ctx.ops.handle({"op": "ui.link"})["url"].split("#link=", 1)[1]
    ui.wall.now += LINK_TTL + 1
    nonce = _field(ui.client.get("/ui/login").text, "login_csrf")
    resp = ui.client.post("/ui/login", data={"login_csrf": nonce, "link": late})
    assert resp.status_code == 401


def test_link_op_needs_the_running_server_with_a_web_ui(tmp_path: Path) -> None:
    registry = Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32)
    try:
        offline = AdminOps(registry, data_dir=tmp_path).handle({"op": "ui.link"})
        assert offline["ok"] is False and "running server" in offline["error"]
        live_no_ui = AdminOps(registry, data_dir=tmp_path, live=True).handle({"op": "ui.link"})
        assert live_no_ui["ok"] is False and "--admin-listen" in live_no_ui["error"]
    finally:
        registry.close()


def test_policy_save_refuses_a_failing_test_and_keeps_the_policy(ui: UI) -> None:
    ui.login()
    ok = ui.client.post("/ui/policy/save", data={"csrf": ui.csrf(), "text": POLICY_OK})
    assert ok.status_code == 200 and "saved and in force" in ok.text
    before = ui.ctx.ops.handle({"op": "policy.get"})
    bad = ui.client.post(
        "/ui/policy/save", data={"csrf": ui.csrf("/ui/policy"), "text": POLICY_FAILING_TEST}
    )
    assert bad.status_code == 400
    assert "policy refused; the policy in force is unchanged" in bad.text
    problems = re.search(r'<ul id="problems">(.*?)</ul>', bad.text, re.S)
    assert problems is not None and "tests[0]" in problems.group(1)
    assert "alice@example.com" in problems.group(1)  # the failing test, with its reason
    assert ui.ctx.ops.handle({"op": "policy.get"}) == before


def test_node_action_through_the_ops(ui: UI) -> None:
    ui.login()
    resp = ui.client.post(
        "/ui/nodes/action", data={"csrf": ui.csrf(), "action": "remove", "name": "ghost"}
    )
    assert resp.status_code == 200 and "no node named &#39;ghost&#39;" in resp.text
    resp = ui.client.post(
        "/ui/nodes/action", data={"csrf": ui.csrf(), "action": "drop-table", "name": "x"}
    )
    assert "unknown action" in resp.text


def test_oversized_or_wrong_form_is_refused(ui: UI) -> None:
    ui.login()
    token = ui.csrf()
    resp = ui.client.post(
        "/ui/policy/save", content=b'{"text": "x"}', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and "expected a form" in resp.text
    big = ui.client.post("/ui/policy/save", data={"csrf": token, "text": "x" * (5 << 20)})
    assert big.status_code == 400 and "too large" in big.text


def test_logout_ends_the_session(ui: UI) -> None:
    ui.login()
    resp = ui.client.post("/ui/logout", data={"csrf": ui.csrf()}, follow_redirects=False)
    assert resp.status_code == 303
    assert ui.client.get("/ui/nodes", follow_redirects=False).status_code == 303


def test_session_store_is_bounded() -> None:
    store = SessionStore(limit=3)
    from homeport.server.webui.session import Access

    first = store.create("a", Access.READ, 0.0)
    for i in range(3):
        store.create(f"b{i}", Access.READ, 0.0)
    assert len(store) == 3 and store.get(first.sid, 0.0) is None


def test_real_server_serves_the_ui_and_makes_admin_links(tmp_path: Path) -> None:
    """Wiring without a browser: the admin listener serves /ui, and ``homeport admin-link``'s
    op answers with a link to it that logs in once."""
    import http.cookiejar
    import urllib.error
    import urllib.request

    from homeport.server.admin import admin_request
    from homeport.server.app import start_server_thread

    with start_server_thread(tmp_path / "srv", admin_listen="127.0.0.1:0") as srv:
        base = srv.admin_url
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(base + "/", timeout=10) as resp:  # / -> /ui/nodes -> login
            assert resp.url == base + "/ui/login"
            assert "script-src 'self'" in resp.headers["content-security-policy"]
            page = resp.read().decode()
        link = admin_request(srv.data_dir, {"op": "ui.link"})
        assert link["ok"] and link["url"].startswith(base + "/ui/login#link=")
        secret = link["url"].split("#link=", 1)[1]
        assert "login-form" in page

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(base + "/ui/login", timeout=10) as resp:
            nonce = _field(resp.read().decode(), "login_csrf")
        body = f"login_csrf={nonce}&link={secret}".encode()
        with opener.open(base + "/ui/login", data=body, timeout=10) as resp:
            assert resp.url == base + "/ui/nodes" and "Nodes" in resp.read().decode()
        with opener.open(base + "/ui/login", timeout=10) as resp:
            nonce = _field(resp.read().decode(), "login_csrf")
        with pytest.raises(urllib.error.HTTPError) as again:  # the link works once
            opener.open(base + "/ui/login", data=f"login_csrf={nonce}&link={secret}".encode())
        assert again.value.code == 401 and b"already used" in again.value.read()


def test_keys_page_survives_a_non_finite_expiry_already_stored(ui: UI) -> None:
    """A key stored with an infinite expiry before the ops checked it (as older versions
    did): the page still renders, and shows it as never expiring."""
    ops = ui.ctx.ops
    ops.registry.create_auth_key(now=1000.0, reusable=False, expiry_seconds=float("inf"))
    ui.login()
    page = ui.client.get("/ui/keys")
    assert page.status_code == 200, page.text
    answer = ops.handle({"op": "keys.list"})
    assert [k["expires_at"] for k in answer["keys"]] == [None]


class _PathView:
    """A live view where only laptop reported its path to labpc (labpc sent none)."""

    def server_info(self) -> dict[str, object]:
        return {}

    def streams(self) -> list[dict[str, object]]:
        return []

    def online_nodes(self) -> list[dict[str, object]]:
        report = {"kind": "direct", "rtt_ms": 2.0, "reason": "", "reported_by": "laptop"}
        return [
            {"name": "laptop", "direct": True, "paths": [{**report, "peer": "labpc"}]},
            {"name": "labpc", "direct": True, "paths": [{**report, "peer": "laptop"}]},
            {"name": "nas", "direct": True, "paths": []},
        ]


def test_nodes_page_shows_the_path_a_peer_reported(tmp_path: Path) -> None:
    def nodes() -> list[NodeStatus]:
        return [
            NodeStatus(f"n{i}", name, True, None, "127.0.0.1:1", (), "sha256:ab", 900.0)
            for i, name in enumerate(("laptop", "labpc", "nas"))
        ]

    registry = Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32)
    ops = AdminOps(registry, live=True, nodes=nodes, live_view=_PathView())
    token = ops.handle({"op": "apikeys.create", "name": "a", "scope": "admin"})["token"]
    ctx = AdminContext(ops, ops.verify_api_token)
    app = build_app(replace(ctx, extra_routes=tuple(routes(ctx))))
    with TestClient(app) as client:
        ui = UI(client, ctx, Clock(), Clock(), token, token)
        ui.login()
        html = client.get("/ui/nodes").text
    registry.close()
    rows = dict(re.findall(r'<tr data-node="([^"]+)">(.*?)</tr>', html, re.S))
    assert "direct</span> to laptop" in rows["labpc"] and "as laptop reports" in rows["labpc"]
    assert "as laptop reports" not in rows["laptop"]
    assert "no path reported by it or its peers yet" in rows["nas"]
    assert "no path used yet" not in html
