"""The admin listener's ASGI application: REST API, OpenAPI document, ``/metrics``, extra routes.

Why one route table (:mod:`homeport.server.web.api`) drives both the Starlette
routes and the OpenAPI document: the document can then never miss a route or
describe one that does not exist (a test checks both directions anyway).

Every API route runs exactly the admin operation the CLI runs
(:meth:`AdminOps.handle`, in-process), so the API, the CLI and the web UI
cannot drift apart. Operations run on the server's event loop (they touch the
live coordinator); the few that only read a file (the audit log) or compute
(policy check) run on a worker thread instead.

Authorization: every request needs ``Authorization: Bearer hpk_…`` with a
scope that covers the route (``read`` may only look; ``admin`` may do
everything); the one exception is ``GET /metrics`` on a loopback-only listener,
as Prometheus expects. Routes in ``extra_routes`` (the web UI) bring their own
authentication.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from homeport.server.admin import AdminOps
from homeport.server.apikeys import ApiPrincipal, Scope
from homeport.server.web.api import API_PREFIX, ROUTES, ApiRoute, BadInput, build_request
from homeport.server.web.openapi import openapi_document

log = logging.getLogger("homeport.server.web")

#: Largest request body accepted (a ``PUT /policy`` carries the policy text, like admin.sock).
MAX_BODY = 8 * 1024 * 1024
#: HTTP status for each failure ``code`` of an admin answer (admin.AdminError.code).
STATUS_OF_CODE = {
    "bad-request": 400,
    "refused": 400,
    "not-found": 404,
    "conflict": 409,
    "policy-refused": 422,
    "unavailable": 503,
}
#: Headers on every API answer: tokens and keys are shown once and must not sit in caches.
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class AdminContext:
    """Everything the admin listener's routes need (shared with the web UI and metrics).

    ``verify_token`` maps a presented bearer token to its principal (None: refused);
    ``metrics`` returns the Prometheus exposition (body, content type), or is None
    when the server keeps no metrics; ``loopback`` says the listener is bound to a
    loopback address only (then ``/metrics`` needs no token).
    """

    ops: AdminOps
    verify_token: Callable[[str], ApiPrincipal | None]
    metrics: Callable[[], tuple[bytes, str]] | None = None
    extra_routes: tuple[BaseRoute, ...] = field(default=())
    loopback: bool = True


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """The API's one error shape: ``{"error": "..."}`` (plus details such as policy problems)."""
    headers = dict(API_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="homeport"'
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def authenticate(ctx: AdminContext, request: Request, needed: Scope) -> ApiPrincipal | Response:
    """The principal of the request's bearer token if its scope covers ``needed``, else the
    401/403 answer to send."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header:
        return error(401, "missing API token: send 'Authorization: Bearer <token>'")
    if scheme.lower() != "bearer" or not token:
        return error(401, "expected 'Authorization: Bearer <token>'")
    principal = ctx.verify_token(token)
    if principal is None:
        return error(401, "invalid, expired or revoked API token")
    if not principal.scope.allows(needed):
        return error(
            403, f"API key {principal.key_id} has scope {principal.scope.value}; this needs admin"
        )
    return principal


class _NonJsonConstant(ValueError):
    """A body used ``NaN``/``Infinity``/``-Infinity``: Python's parser accepts them, JSON
    does not, and a stored non-finite number would break every later listing."""


def _refuse_constant(name: str) -> Any:
    raise _NonJsonConstant(name)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: an answer must never fail to
    encode (Starlette refuses NaN/Infinity) nor be invalid JSON. Admin ops already clean
    their listings (:func:`homeport.server.admin.finite_time`); this is the last guard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


async def read_json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object ({} when empty). Raises BadInput (400/413)."""
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise BadInput(f"request body larger than {MAX_BODY} bytes", status=413)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > MAX_BODY:
            raise BadInput(f"request body larger than {MAX_BODY} bytes", status=413)
    if not buf.strip():
        return {}
    try:
        body = json.loads(buf, parse_constant=_refuse_constant)
    except _NonJsonConstant as exc:
        raise BadInput(f"request body is not JSON: {exc} is not a JSON number") from None
    except ValueError:
        raise BadInput("request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object")
    return body


def answer_response(route: ApiRoute, answer: dict[str, Any]) -> JSONResponse:
    """An admin answer as HTTP: the fields on success, ``{"error": ...}`` with a 4xx if not."""
    if answer.get("ok"):
        body = json_safe({k: v for k, v in answer.items() if k != "ok"})
        return JSONResponse(body, status_code=route.status, headers=API_HEADERS)
    status = STATUS_OF_CODE.get(str(answer.get("code", "")), 400)
    extra = {k: answer[k] for k in ("problems", "more") if k in answer}
    return error(status, str(answer.get("error", "request failed")), **extra)


#: Admin ops that only read a file or compute: run on a worker thread, off the event loop.
OFFLOAD_OPS = frozenset(r.op for r in ROUTES if r.offload)


async def call_op(ops: AdminOps, request: dict[str, Any]) -> dict[str, Any]:
    """Run one admin request from a route (the API's, or the web UI's): on the event loop
    (ops act on the live coordinator), except :data:`OFFLOAD_OPS` on a worker thread."""
    if request.get("op") in OFFLOAD_OPS:
        return await asyncio.to_thread(ops.handle, request)
    return ops.handle(request)


def _endpoint(ctx: AdminContext, route: ApiRoute) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        auth = authenticate(ctx, request, route.scope)
        if isinstance(auth, Response):
            return auth
        try:
            body = await read_json_body(request) if route.method != "GET" else {}
            if body and route.body is None:  # e.g. {"seconds": ...} to nodes/X/extend
                raise BadInput(
                    f"{route.method} {route.path} takes no body fields (got {', '.join(body)})"
                )
            req = build_request(route, dict(request.path_params), request.query_params, body)
        except BadInput as exc:
            return error(exc.status, str(exc))
        if route.op == "openapi":
            return JSONResponse(openapi_document(), headers=API_HEADERS)
        answer = await call_op(ctx.ops, req)
        if route.scope is Scope.ADMIN:
            log.info(
                "api %s %s by key %s (%s): %s",
                request.method,
                request.url.path,
                auth.key_id,
                auth.name,
                "ok" if answer.get("ok") else answer.get("error"),
            )
        return answer_response(route, answer)

    return endpoint


def _metrics_endpoint(ctx: AdminContext) -> Callable[[Request], Any]:
    async def metrics(request: Request) -> Response:
        if not ctx.loopback:
            auth = authenticate(ctx, request, Scope.READ)
            if isinstance(auth, Response):
                return auth
        if ctx.metrics is None:
            return error(404, "this server keeps no metrics")
        body, content_type = ctx.metrics()
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    return metrics


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIX + "/") or request.url.path == "/metrics"


async def _not_found(request: Request, exc: Exception) -> Response:
    if not _is_api(request):  # the web UI's pages: not JSON
        return PlainTextResponse("Not Found", status_code=404)
    return error(404, f"no such route: {request.method} {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    if not _is_api(request):
        return PlainTextResponse("Method Not Allowed", status_code=405)
    return error(405, f"{request.method} is not allowed on {request.url.path}")


def api_routes(ctx: AdminContext) -> list[BaseRoute]:
    """The REST API's routes and ``/metrics`` (without the extra routes)."""
    routes: list[BaseRoute] = [
        Route(r.path, _endpoint(ctx, r), methods=[r.method], name=r.op) for r in ROUTES
    ]
    routes.append(Route("/metrics", _metrics_endpoint(ctx), methods=["GET"], name="metrics"))
    return routes


def build_app(ctx: AdminContext) -> Starlette:
    """The admin listener's application: API routes, then ``ctx.extra_routes`` (the web UI)."""
    return Starlette(
        routes=[*api_routes(ctx), *ctx.extra_routes],
        exception_handlers={404: _not_found, 405: _not_allowed},
    )


__all__ = ["API_PREFIX", "AdminContext", "api_routes", "build_app", "call_op"]
