"""The web admin UI: server-rendered pages under ``/ui`` on the admin listener.

Every page calls the same in-process operations as the CLI (``ctx.ops.handle({"op": ...})``),
so the UI can do nothing the admin socket cannot, and shows the same refusals.

Security, in the order a request meets it:

* every response carries a strict Content-Security-Policy (``script-src 'self'``, no
  inline script or style, ``frame-ancestors 'none'``), ``X-Frame-Options: DENY``,
  ``nosniff``, ``Referrer-Policy: same-origin`` and ``Cache-Control: no-store``
  (:class:`SecurityHeaders`);
* a page needs a session (:mod:`.session`): a random id in an ``HttpOnly``,
  ``SameSite=Strict`` cookie (``Secure`` over TLS), created by logging in with an API token
  or a one-time link from ``homeport admin-link`` (the link's secret travels in the URL
  fragment, which browsers never send; the login page posts it and wipes it from the
  address bar);
* every POST must carry the session's CSRF token, and a browser's ``Origin`` must be ours;
* a read-only token's session sees every page but no action (403 on every POST but logout);
* Jinja2 autoescaping escapes everything shown: node names, services, audit fields and
  policy text are untrusted.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from homeport.policy.acl import PolicyError, compile_policy
from homeport.server.admin import parse_duration
from homeport.server.apikeys import ApiPrincipal, Scope
from homeport.server.web.app import AdminContext
from homeport.server.webui.session import Access, Session, SessionStore, csrf_ok

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SESSION_COOKIE = "hp_session"
LOGIN_COOKIE = "hp_login"
#: Largest form body accepted (bytes): a policy text is at most 1 MiB, form-encoded up to 3x.
MAX_FORM = 4 * 1024 * 1024
#: Audit events shown at most on one page (the newest that match the filters).
MAX_AUDIT_ROWS = 500
#: Characters of one audit field shown (the file caps them at 1024 already).
MAX_AUDIT_FIELD = 300
#: Seconds between reloads of a page opened with ``?refresh=1``.
REFRESH_SECONDS = 5
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Origin "null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
NODE_ACTIONS = ("approve", "expire", "extend", "disable-expiry", "remove")
STATIC_FILES = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}


class SecurityHeaders:
    """ASGI middleware: the security headers on every ``/ui`` response (pages, errors, static)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _when(ts: Any, now: float) -> str:
    """``3 min ago`` / ``in 2 days`` / ``—``: times relative to now, as the CLI shows them."""
    if not isinstance(ts, int | float):
        return "—"
    delta = now - float(ts)
    future = delta < 0
    delta = abs(delta)
    if delta < 60:
        text = f"{int(delta)} s"
    elif delta < 3600:
        text = f"{int(delta // 60)} min"
    elif delta < 86400:
        text = f"{int(delta // 3600)} h"
    else:
        text = f"{int(delta // 86400)} days"
    return f"in {text}" if future else f"{text} ago"


def _utc(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))


class FormError(Exception):
    """A POST body we refuse (too large, not a form); the message is for the user."""


async def _read_form(request: Request) -> dict[str, str]:
    """The url-encoded form of a POST, at most :data:`MAX_FORM` bytes; last value wins."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError("expected a form (application/x-www-form-urlencoded)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise FormError("form too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("form is not UTF-8") from None
    parsed = parse_qs(text, keep_blank_values=True, max_num_fields=100)
    return {k: v[-1] for k, v in parsed.items()}


class WebUI:
    """The UI's state (sessions) and handlers, bound to one admin context."""

    def __init__(
        self,
        ctx: AdminContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sessions: SessionStore | None = None,
    ) -> None:
        self.ctx = ctx
        self.clock = clock
        self.wall = wall
        self.sessions = sessions or SessionStore()
        self.env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = lambda ts: _when(ts, self.wall())
        self.env.filters["utc"] = _utc

    # -- plumbing -------------------------------------------------------------------------
    def op(self, request: dict[str, Any]) -> dict[str, Any]:
        """One admin operation, exactly as the CLI sends it."""
        answer = self.ctx.ops.handle(request)
        return answer if isinstance(answer, dict) else {"ok": False, "error": "no answer"}

    def render(
        self,
        name: str,
        request: Request,
        sess: Session | None,
        status: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        flash, flash_error = "", False
        if sess is not None and sess.flash:
            flash, flash_error = sess.flash, sess.flash_error
            self.sessions.update(replace(sess, flash="", flash_error=False))
        html = self.env.get_template(name).render(
            session=sess,
            can_act=sess is not None and sess.access is Access.ADMIN,
            flash=flash,
            flash_error=flash_error,
            path=request.url.path,
            refresh=REFRESH_SECONDS if request.query_params.get("refresh") else 0,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def session(self, request: Request) -> Session | None:
        """The request's live session; a session whose API token was revoked ends here."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        if not sid:
            return None
        sess = self.sessions.get(sid, self.clock())
        if sess is None:
            return None
        if sess.token:
            principal = self.ctx.verify_token(sess.token)
            if principal is None:
                self.sessions.drop(sess.sid)
                return None
            access = _access(principal)
            if access is not sess.access:
                sess = replace(sess, access=access)
                self.sessions.update(sess)
        return sess

    def flash(self, sess: Session, message: str, error: bool = False) -> None:
        self.sessions.update(replace(sess, flash=message, flash_error=error))

    def page(
        self, handler: Callable[[Request, Session], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A GET page: needs a session, else to the login page."""

        async def endpoint(request: Request) -> Response:
            sess = self.session(request)
            if sess is None:
                return RedirectResponse("/ui/login", status_code=303)
            return await handler(request, sess)

        return endpoint

    def action(
        self,
        handler: Callable[[Request, Session, dict[str, str]], Awaitable[Response]],
        *,
        read_ok: bool = False,
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST: needs a session, our Origin, the session's CSRF token, and admin access."""

        async def endpoint(request: Request) -> Response:
            sess = self.session(request)
            if sess is None:
                return self.refuse(request, None, 401, "not logged in (or the session expired)")
            if not _same_origin(request):
                return self.refuse(request, sess, 403, "refused: the form came from another site")
            try:
                form = await _read_form(request)
            except FormError as exc:
                return self.refuse(request, sess, 400, str(exc))
            if not csrf_ok(sess, form.get("csrf", "")):
                return self.refuse(request, sess, 403, "refused: missing or wrong CSRF token")
            if sess.access is not Access.ADMIN and not read_ok:
                return self.refuse(request, sess, 403, "refused: this login is read-only")
            return await handler(request, sess, form)

        return endpoint

    def refuse(self, request: Request, sess: Session | None, status: int, why: str) -> Response:
        return self.render("error.html", request, sess, status=status, message=why)

    # -- login ----------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        return self._login_form(request, "", 200)

    def _login_form(self, request: Request, error: str, status: int) -> Response:
        nonce = secrets.token_urlsafe(32)
        resp = self.render(
            "login.html", request, None, status=status, error=error, login_csrf=nonce
        )
        resp.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path="/ui/login",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return resp

    async def login(self, request: Request) -> Response:
        """Exchange an API token or a one-time link for a session cookie."""
        if not _same_origin(request):
            return self._login_form(request, "refused: the form came from another site", 403)
        try:
            form = await _read_form(request)
        except FormError as exc:
            return self._login_form(request, str(exc), 400)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        sent = form.get("login_csrf", "")
        if not nonce or not secrets.compare_digest(nonce.encode(), sent.encode()):
            return self._login_form(request, "the login form expired; try again", 403)
        link, token = form.get("link", "").strip(), form.get("token", "").strip()
        now = self.clock()
        if link:
            if not self.ctx.ops.ui_links.redeem(link, self.wall()):
                return self._login_form(
                    request,
                    "this login link was already used or has expired; "
                    "run homeport admin-link again",
                    401,
                )
            sess = self.sessions.create("admin-link", Access.ADMIN, now)
        elif token:
            principal = self.ctx.verify_token(token)
            if principal is None:
                return self._login_form(request, "unknown or revoked API token", 401)
            sess = self.sessions.create(str(principal.name), _access(principal), now, token)
        else:
            return self._login_form(request, "paste an API token", 400)
        resp = RedirectResponse("/ui/nodes", status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            sess.sid,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        resp.delete_cookie(LOGIN_COOKIE, path="/ui/login")
        return resp

    async def logout(self, request: Request, sess: Session, _form: dict[str, str]) -> Response:
        self.sessions.drop(sess.sid)
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/ui")
        return resp

    # -- nodes ----------------------------------------------------------------------------
    async def nodes(self, request: Request, sess: Session) -> Response:
        answer = self.op({"op": "nodes.list"})
        nodes = answer.get("nodes", []) if answer.get("ok") else []
        nodes = sorted(nodes, key=lambda n: (not n.get("online"), str(n.get("name"))))
        live = self.op({"op": "status.nodes"})  # paths each online node reported, and why
        paths = {str(n.get("name")): n for n in live.get("nodes", [])} if live.get("ok") else {}
        nodes = [{**n, "live": paths.get(str(n.get("name")))} for n in nodes]
        return self.render(
            "nodes.html",
            request,
            sess,
            nodes=nodes,
            error="" if answer.get("ok") else answer.get("error", ""),
            actions=NODE_ACTIONS,
        )

    async def node_action(self, _request: Request, sess: Session, form: dict[str, str]) -> Response:
        action, name = form.get("action", ""), form.get("name", "")
        if action not in NODE_ACTIONS:
            self.flash(sess, f"unknown action {action!r}", True)
        else:
            answer = self.op({"op": f"nodes.{action}", "name": name})
            if answer.get("ok"):
                self.flash(sess, f"{action}: {name} done")
            else:
                self.flash(sess, f"{action} {name}: {answer.get('error')}", True)
        return RedirectResponse("/ui/nodes", status_code=303)

    # -- auth keys ------------------------------------------------------------------------
    async def keys(self, request: Request, sess: Session) -> Response:
        return self._keys_page(request, sess, None, {}, status=200)

    def _keys_page(
        self,
        request: Request,
        sess: Session,
        created: dict[str, Any] | None,
        form: dict[str, str],
        *,
        status: int,
        error: str = "",
    ) -> Response:
        answer = self.op({"op": "keys.list"})
        keys = answer.get("keys", []) if answer.get("ok") else []
        keys = sorted(keys, key=lambda k: -float(k.get("created_at") or 0))
        return self.render(
            "keys.html",
            request,
            sess,
            status=status,
            keys=keys,
            created=created,
            form=form,
            error=error or ("" if answer.get("ok") else answer.get("error", "")),
        )

    async def key_create(self, request: Request, sess: Session, form: dict[str, str]) -> Response:
        try:
            expiry = parse_duration(form.get("expiry", "24h") or "24h")
        except ValueError as exc:
            return self._keys_page(request, sess, None, form, status=400, error=str(exc))
        tags = [t.strip() for t in form.get("tags", "").replace(",", " ").split() if t.strip()]
        answer = self.op(
            {
                "op": "keys.create",
                "reusable": form.get("reusable") == "on",
                "expiry_seconds": expiry,
                "note": form.get("note", ""),
                "user": form.get("user", "").strip(),
                "tags": tags,
                "ephemeral": form.get("ephemeral") == "on",
                "approval": form.get("approval") == "on",
            }
        )
        if not answer.get("ok"):
            return self._keys_page(
                request, sess, None, form, status=400, error=str(answer.get("error"))
            )
        # shown once, in this response only (no-store): never stored for a later page
        return self._keys_page(request, sess, answer, {}, status=200)

    async def key_revoke(self, _request: Request, sess: Session, form: dict[str, str]) -> Response:
        key_id = form.get("key_id", "")
        answer = self.op({"op": "keys.revoke", "key_id": key_id})
        if answer.get("ok"):
            self.flash(sess, f"auth key {key_id} revoked")
        else:
            self.flash(sess, str(answer.get("error")), True)
        return RedirectResponse("/ui/keys", status_code=303)

    # -- users and tags -------------------------------------------------------------------
    async def users(self, request: Request, sess: Session) -> Response:
        users = self.op({"op": "users.list"})
        nodes = self.op({"op": "nodes.list"}).get("nodes", [])
        tags: dict[str, dict[str, list[str]]] = {}
        policy = self.op({"op": "policy.get"})
        if policy.get("ok") and policy.get("text"):
            try:
                compiled = compile_policy(str(policy["text"]))
            except PolicyError:
                compiled = None
            if compiled is not None:
                for tag, owners in compiled.tag_owners.items():
                    tags.setdefault(tag, {"owners": [], "nodes": []})["owners"] = sorted(owners)
        for node in nodes:
            for tag in node.get("tags", []):
                tags.setdefault(str(tag), {"owners": [], "nodes": []})["nodes"].append(
                    str(node.get("name"))
                )
        return self.render(
            "users.html",
            request,
            sess,
            users=users.get("users", []),
            error="" if users.get("ok") else users.get("error", ""),
            tags=sorted(tags.items()),
        )

    async def user_create(self, _request: Request, sess: Session, form: dict[str, str]) -> Response:
        name = form.get("name", "").strip()
        answer = self.op({"op": "users.create", "name": name})
        self.flash(
            sess,
            f"user {name} created" if answer.get("ok") else str(answer.get("error")),
            not answer.get("ok"),
        )
        return RedirectResponse("/ui/users", status_code=303)

    async def user_remove(self, _request: Request, sess: Session, form: dict[str, str]) -> Response:
        name = form.get("name", "")
        answer = self.op({"op": "users.remove", "name": name, "force": form.get("force") == "on"})
        self.flash(
            sess,
            f"user {name} removed" if answer.get("ok") else str(answer.get("error")),
            not answer.get("ok"),
        )
        return RedirectResponse("/ui/users", status_code=303)

    # -- policy ---------------------------------------------------------------------------
    async def policy(self, request: Request, sess: Session) -> Response:
        current = self.op({"op": "policy.get"})
        return self.render(
            "policy.html",
            request,
            sess,
            text=current.get("text") or "",
            digest=current.get("digest"),
            error="" if current.get("ok") else current.get("error", ""),
            problems=[],
            explain=None,
            explain_form={},
        )

    async def policy_save(self, request: Request, sess: Session, form: dict[str, str]) -> Response:
        text = form.get("text", "").replace("\r\n", "\n")
        answer = self.op({"op": "policy.set", "text": text})
        if answer.get("ok"):
            self.flash(
                sess,
                f"policy {answer.get('digest')} saved and in force "
                f"({answer.get('acls')} acls, {answer.get('ssh')} ssh rules)",
            )
            return RedirectResponse("/ui/policy", status_code=303)
        current = self.op({"op": "policy.get"})
        return self.render(
            "policy.html",
            request,
            sess,
            status=400,
            text=text,  # what was typed stays in the editor, so it can be fixed
            digest=current.get("digest"),
            error=str(answer.get("error")),
            problems=answer.get("problems", []),
            more=answer.get("more", 0),
            explain=None,
            explain_form={},
        )

    async def policy_explain(
        self, request: Request, sess: Session, form: dict[str, str]
    ) -> Response:
        req: dict[str, Any] = {
            "op": "policy.explain",
            "src": form.get("src", "").strip(),
            "dst": form.get("dst", "").strip(),
            "service": form.get("service", "").strip(),
        }
        if form.get("user", "").strip():
            req["user"] = form["user"].strip()
        answer = self.op(req)
        current = self.op({"op": "policy.get"})
        return self.render(
            "policy.html",
            request,
            sess,
            text=current.get("text") or "",
            digest=current.get("digest"),
            error="",
            problems=[],
            explain=answer,
            explain_form=form,
        )

    # -- audit log ------------------------------------------------------------------------
    async def audit(self, request: Request, sess: Session) -> Response:
        q = request.query_params
        kind, text, since = q.get("kind", ""), q.get("q", ""), q.get("since", "")
        error = ""
        start: float | None = None
        if since:
            try:
                age = parse_duration(since)
            except ValueError as exc:
                error = str(exc)
            else:
                start = None if age is None else self.wall() - age
        data_dir = self.ctx.ops.data_dir
        rows: list[dict[str, Any]] = []
        kinds: list[str] = []
        if data_dir is None:
            error = error or "this server keeps no audit log"
        else:
            try:
                rows, kinds = await asyncio.to_thread(
                    _audit_rows, Path(data_dir), kind, text, start
                )
            except PermissionError as exc:
                error = f"cannot read the audit log: {exc.strerror}"
        return self.render(
            "audit.html",
            request,
            sess,
            rows=rows,
            kinds=kinds,
            kind=kind,
            q=text,
            since=since,
            error=error,
            limit=MAX_AUDIT_ROWS,
        )

    # -- live streams ---------------------------------------------------------------------
    async def streams(self, request: Request, sess: Session) -> Response:
        answer = self.op({"op": "streams.list"})
        streams = answer.get("streams", []) if answer.get("ok") else []
        return self.render(
            "streams.html",
            request,
            sess,
            streams=streams,
            error="" if answer.get("ok") else str(answer.get("error", "")),
        )

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        ctype = STATIC_FILES.get(name)
        if ctype is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(STATIC / name, media_type=ctype)

    async def not_found(self, request: Request) -> Response:
        return self.refuse(request, self.session(request), 404, "no such page")

    async def home(self, _request: Request) -> Response:
        return RedirectResponse("/ui/nodes", status_code=303)


def _access(principal: ApiPrincipal) -> Access:
    """``ApiPrincipal.scope`` → what a web session may do."""
    return Access.ADMIN if principal.scope is Scope.ADMIN else Access.READ


def _same_origin(request: Request) -> bool:
    """A browser's ``Origin`` (sent with every POST) must be this site; absent is allowed
    (non-browser clients; they still need the CSRF token)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def _audit_rows(
    data_dir: Path, kind: str, text: str, start: float | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The newest :data:`MAX_AUDIT_ROWS` events matching the filters, newest first, and
    every kind seen (for the filter's choices)."""
    from homeport.server import audit as au

    path = au.audit_path(data_dir)
    if not path.exists():
        return [], []
    kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_AUDIT_ROWS)
    kinds: set[str] = set()
    needle = text.lower()
    events: Iterator[dict[str, Any]] = au.since_filter(au.read_events(path), start)
    for ev in events:
        ev_kind = str(ev.get("kind", ""))
        kinds.add(ev_kind)
        if kind and ev_kind != kind:
            continue
        fields = {
            str(k)[:64]: str(v)[:MAX_AUDIT_FIELD] for k, v in ev.items() if k not in ("ts", "kind")
        }
        if needle and not any(needle in f"{k}={v}".lower() for k, v in fields.items()):
            continue
        kept.append({"ts": ev.get("ts"), "kind": ev_kind, "fields": fields})
    return list(reversed(kept)), sorted(kinds)


def build_routes(ui: WebUI) -> list[BaseRoute]:
    """``/ui/...`` routes of one :class:`WebUI`, with the security headers on all of them."""
    inner = [
        Route("/", ui.home, methods=["GET"]),
        Route("/login", ui.login_page, methods=["GET"]),
        Route("/login", ui.login, methods=["POST"]),
        Route("/logout", ui.action(ui.logout, read_ok=True), methods=["POST"]),
        Route("/nodes", ui.page(ui.nodes), methods=["GET"]),
        Route("/nodes/action", ui.action(ui.node_action), methods=["POST"]),
        Route("/keys", ui.page(ui.keys), methods=["GET"]),
        Route("/keys/create", ui.action(ui.key_create), methods=["POST"]),
        Route("/keys/revoke", ui.action(ui.key_revoke), methods=["POST"]),
        Route("/users", ui.page(ui.users), methods=["GET"]),
        Route("/users/create", ui.action(ui.user_create), methods=["POST"]),
        Route("/users/remove", ui.action(ui.user_remove), methods=["POST"]),
        Route("/policy", ui.page(ui.policy), methods=["GET"]),
        Route("/policy/save", ui.action(ui.policy_save), methods=["POST"]),
        Route("/policy/explain", ui.action(ui.policy_explain, read_ok=True), methods=["POST"]),
        Route("/audit", ui.page(ui.audit), methods=["GET"]),
        Route("/streams", ui.page(ui.streams), methods=["GET"]),
        Route("/static/{name}", ui.static, methods=["GET"]),
        Route("/{rest:path}", ui.not_found),  # our 404, with our headers
    ]
    return [
        Route("/", ui.home, methods=["GET"]),
        Mount("/ui", routes=inner, middleware=[Middleware(SecurityHeaders)]),
    ]
