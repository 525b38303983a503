"""The OpenAPI document: valid OpenAPI 3.1, and exactly the routes the application serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from homeport.server.admin import AdminOps
from homeport.server.web.api import ROUTES
from homeport.server.web.app import AdminContext, api_routes, build_app
from homeport.server.web.openapi import openapi_document
from homeport.store.db import open_store
from homeport.store.registry import Registry

validator = pytest.importorskip(
    "openapi_spec_validator", reason="needs openapi-spec-validator (the test extra)"
)


@pytest.fixture
def ctx(tmp_path: Path) -> AdminContext:
    ops = AdminOps(Registry(open_store("sqlite://"), server_pin="pin"), data_dir=tmp_path)
    return AdminContext(ops=ops, verify_token=ops.verify_api_token)


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    validator.validate(doc)


def test_a_broken_document_is_refused_by_the_validator() -> None:
    """The validation above can fail: a response without a description is not OpenAPI."""
    import copy

    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    doc = copy.deepcopy(openapi_document())
    del doc["paths"]["/api/v1/nodes"]["get"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validator.validate(doc)


def _served(ctx: AdminContext) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in api_routes(ctx):
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                out.add((method, route.path))
    return out


def test_every_served_route_is_documented_and_vice_versa(ctx: AdminContext) -> None:
    documented = {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
    }
    served = _served(ctx)
    assert served == documented
    assert len(served) == len(ROUTES) + 1  # and /metrics


def test_the_document_is_served_to_a_read_token(ctx: AdminContext) -> None:
    tok = ctx.ops.handle({"op": "apikeys.create", "name": "docs", "scope": "read"})["token"]
    with TestClient(build_app(ctx)) as c:
        assert c.get("/api/v1/openapi.json").status_code == 401
        res = c.get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {tok}"})
        assert res.status_code == 200 and res.json() == openapi_document()


def test_every_operation_says_its_scope_and_error_shape() -> None:
    doc = openapi_document()
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert op["x-homeport-scope"] == route.scope.value
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        params = {p["name"] for p in op.get("parameters", ())}
        assert {p.name for p in route.params} == params
        for name in (seg[1:-1] for seg in route.path.split("/") if seg.startswith("{")):
            assert name in params, (route.path, name)
