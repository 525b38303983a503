"""An agent that boots before DNS works keeps retrying instead of exiting.

A real DNS failure cannot be produced here without sending queries off the
machine, so ``socket.getaddrinfo`` is replaced for one reserved name (RFC 6761
``.invalid``) by a stand-in that fails the way glibc does when the network is
down. The agent runs on the default asyncio loop for this test because uvloop
resolves names in libuv, out of the stand-in's reach.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from homeport.agent.runtime import Agent, ExitCode
from homeport.crypto import identity
from homeport.io.dial import DialError, resolve
from homeport.node.files import write_private
from homeport.node.state import NodeState
from homeport.proto.backoff import Backoff
from homeport.testing.deadline import wait_for

NAME = "homeport-boot-test.invalid"


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NAME:
            asked.append(host)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


def test_resolve_failure_is_a_retriable_dial_error(no_dns: list[str]) -> None:
    with pytest.raises(DialError) as info:
        resolve(NAME, 8443)
    assert info.value.retriable
    assert NAME in info.value.message
    assert no_dns == [NAME]


def test_agent_keeps_retrying_while_dns_fails(no_dns: list[str], tmp_path: Path) -> None:
    state = NodeState(
        dir=tmp_path,
        server=f"{NAME}:8443",
        server_pin="sha256:" + "0" * 64,
        node_id="n000000000000",
        name="early",
    )
    ca = identity.create_ca()
    key = identity.new_private_key_pem()
    write_private(state.key_path, key)
    state.cert_path.write_bytes(identity.sign_node_csr(ca, identity.make_csr(key, "early"), "n0"))
    state.ca_path.write_bytes(ca.cert_pem)
    agent = Agent(state, (), host_keys=(), backoff=Backoff(base=0.02, cap=0.05))
    result: list[int] = []

    def run() -> None:
        result.append(int(asyncio.run(agent.run())))

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def retried() -> bool:
        assert t.is_alive(), f"the agent exited on a DNS failure: {result}"
        return len(no_dns) >= 5

    wait_for(retried, 20, "the agent to keep trying to resolve its server")
    agent.stop()
    t.join(20)
    assert result == [int(ExitCode.STOPPED)]
