"""Every parser of network and local-socket bytes: "parse, or raise the wire error".

The parsers that already had a property test keep theirs (test_wire_frame, test_wire_mux,
test_wire_natpmp, test_wire_probe, test_wire_hostkey, test_wire_misc's preamble,
test_proto_mux); this file adds the rest: every control message body (structured, so the
field checks are reached, not only the JSON parser), the control machine fed raw bytes,
auth keys, stream tokens, mux payload helpers, whoami address text, the agent's local API
request line and the server's admin socket requests. A decoded control message must also
encode again: what one node sends, the server forwards to others (finding 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeport.io import localapi
from homeport.proto.control import ControlConnection, Role
from homeport.server.admin import AdminOps
from homeport.store.db import open_store
from homeport.store.registry import Registry
from homeport.wire import authkey, data, mux, probe
from homeport.wire import control as m
from homeport.wire.errors import WireError

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _for_hint(hint: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped like ``hint`` most of the time, anything JSON sometimes."""
    origin = typing.get_origin(hint)
    if depth > 3:
        return json_scalar
    if hint is str:
        shaped: st.SearchStrategy[Any] = st.text(max_size=80) | st.sampled_from(
            ["ssh", "22", "labpc", "\ud800", "a\nb", "x" * 300, "00" * 16]
        )
    elif hint is int:
        shaped = st.integers(min_value=-1, max_value=2**64) | st.sampled_from([0, 1, 22, 65536])
    elif hint is bool:
        shaped = st.booleans()
    elif hint is float:
        shaped = st.floats(allow_nan=False, allow_infinity=False)
    elif origin is tuple:
        (elem, _ell) = typing.get_args(hint)
        shaped = st.lists(_for_hint(elem, depth + 1), max_size=4)
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        shaped = _obj(hint, depth + 1)
    else:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        shaped = st.none() | (_for_hint(args[0], depth + 1) if args else json_scalar)
    return shaped | json_value


def _obj(cls: type, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return st.fixed_dictionaries({}, optional={n: _for_hint(hints[n], depth) for n in names}).map(
        lambda d: d
    )


@st.composite
def _frame(draw: st.DrawFn) -> tuple[int, bytes]:
    t = draw(st.sampled_from(sorted(m.MESSAGES)))
    obj = draw(_obj(m.MESSAGES[t]))
    body = json.dumps(obj).encode()
    if draw(st.booleans()) and body:  # and sometimes a damaged body
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=4))
    return t, body


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_frame())
def test_control_bodies_parse_or_raise_wire_error_and_reencode(frame: tuple[int, bytes]) -> None:
    t, body = frame
    try:
        msg = m.decode_untrusted(t, body)
    except WireError:
        return
    again = m.encode(msg)  # what the server forwards must encode (no lone surrogates, sizes)
    assert m.decode_untrusted(again[4], again[5:]) == msg


@given(st.integers(0, 255), st.binary(max_size=64))
def test_control_any_type_byte(t: int, body: bytes) -> None:
    with contextlib.suppress(WireError):
        m.decode_untrusted(t, body)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=6), st.sampled_from(list(Role)))
def test_control_machine_never_raises(chunks: list[bytes], role: Role) -> None:
    conn = ControlConnection(role, 0.0)
    for i, chunk in enumerate(chunks):
        conn.receive_data(chunk or b"\x00", float(i))
        while conn.next_event() is not None:
            pass
        conn.data_to_send()


@given(st.text(max_size=200))
def test_auth_key_parse_or_wire_error(text: str) -> None:
    with contextlib.suppress(WireError):
        authkey.parse_untrusted(text)


@given(st.text(max_size=80))
def test_token_hex_parse_or_wire_error(text: str) -> None:
    with contextlib.suppress(WireError):
        assert len(data.token_from_hex_untrusted(text)) == 16


@given(st.binary(max_size=64), st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1))
def test_mux_payload_helpers_parse_or_wire_error(
    payload: bytes, msg_type: int, flags: int, stream_id: int
) -> None:
    for fn in (mux.json_untrusted, mux.code_reason_untrusted, mux.u32_untrusted, mux.u64_untrusted):
        with contextlib.suppress(WireError):
            fn(payload)
    with contextlib.suppress(WireError):
        mux.check_header_untrusted(msg_type, flags, stream_id, len(payload))


@given(st.text(max_size=80))
def test_whoami_address_text_parse_or_wire_error(text: str) -> None:
    with contextlib.suppress(WireError):
        probe.parse_addr_untrusted(text)


@given(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()))
def test_local_api_request_line_parse_or_request_error(line: bytes) -> None:
    with contextlib.suppress(localapi.RequestError):
        localapi.parse_request(line)


@given(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["open"])},
        optional={"dst": _for_hint(str), "service": _for_hint(str), "timeout": json_value},
    )
)
def test_local_api_open_fields(obj: dict[str, Any]) -> None:
    with contextlib.suppress(localapi.RequestError):
        req = localapi.parse_request(json.dumps(obj).encode())
        assert "\n" not in req.dst and "/" not in req.dst


_OPS = ["ping", "keys.create", "keys.list", "keys.revoke", "nodes.list", "nodes.remove",
        "nodes.approve", "nodes.expire", "nodes.extend", "nodes.disable-expiry",
        "users.create", "users.list", "users.remove", "nope"]  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    json_value
    | st.fixed_dictionaries(
        {"op": st.sampled_from(_OPS)},
        optional={
            k: json_value | st.text(max_size=20)
            for k in (
                "name",
                "key_id",
                "reusable",
                "ephemeral",
                "expiry",
                "user",
                "tags",
                "tag",
                "approve",
                "preauthorized",
                "reason",
            )
        },
    )
)
def test_admin_socket_request_never_raises(request: Any) -> None:
    ops = AdminOps(Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32))
    answer = ops.handle(json.loads(json.dumps(request)))
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
    json.dumps(answer)  # the reply line must encode
