"""The OpenAPI 3.1 document of the REST API, generated from the route table.

Generated, not hand-written, so it lists every route the application serves
and nothing else (see :mod:`homeport.server.web.api`); ``/metrics`` is added
here by hand because it is not an admin op.
"""

from __future__ import annotations

import functools
from typing import Any

from homeport import __version__
from homeport.server.apikeys import Scope
from homeport.server.web.api import ROUTES, SCHEMAS, ApiRoute

_ERRORS = {
    "400": "bad request (a parameter or body field is missing or of the wrong type)",
    "401": "no token, or an invalid, expired or revoked one (or its user was removed)",
    "403": "the token's scope (read) does not allow this",
}
_ROUTE_ERRORS = {
    "404": "the named node, key or user does not exist",
    "409": "conflicts with the current state (name taken, user still owns nodes)",
    "422": "policy refused: every problem is listed; the policy in force is unchanged",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def _operation(route: ApiRoute) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.op.replace(".", "_").replace("-", "_"),
        "summary": route.summary,
        "tags": [route.tag] if route.tag else [],
        "security": [{"bearer": []}],
        "x-homeport-scope": route.scope.value,
        "x-homeport-op": route.op,
    }
    if route.params:
        op["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "description": p.description,
                "schema": {"type": p.kind},
            }
            for p in route.params
        ]
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route.body}},
        }
    responses: dict[str, Any] = {str(route.status): _json(route.response, "success")}
    for code, text in _ERRORS.items():
        if code == "403" and route.scope is Scope.READ:
            continue
        responses[code] = _error(text)
    if route.op not in ("openapi", "status", "status.nodes", "streams.list"):
        for code, text in _ROUTE_ERRORS.items():
            responses[code] = _error(text)
    op["responses"] = responses
    return op


def _metrics_operation() -> dict[str, Any]:
    return {
        "operationId": "metrics",
        "summary": "Prometheus metrics (no token on a loopback-only listener, else read scope)",
        "tags": ["meta"],
        "security": [{}, {"bearer": []}],
        "responses": {
            "200": {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "401": _error(_ERRORS["401"]),
            "404": _error("this server keeps no metrics"),
        },
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document (computed once; callers must not change it)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    paths["/metrics"] = {"get": _metrics_operation()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "homeport admin API",
            "version": __version__,
            "description": (
                "Everything `homeport` admin commands do, over HTTP on the server's admin "
                "listener (`homeport server --admin-listen`). Authenticate with "
                "`Authorization: Bearer <token>` from `homeport apikeys create`."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token hpk_<id>_<secret> (homeport apikeys create)",
                }
            },
        },
    }
