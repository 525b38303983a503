"""An in-memory server for tests: the coordinator core plus a registry on in-memory SQLite.

No sockets, no threads, no clock: the test says what arrives, when, and reads
what the core sent to each session and asked of the relay. Enrollment's
database step and the write-behind run synchronously, in command order, so
what the tests read back from the store is exactly what the server would have
written.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

from homeport.crypto import identity
from homeport.proto import coord as c
from homeport.proto.audit import Audit
from homeport.store.db import open_store
from homeport.store.registry import Registry
from homeport.wire import control as m
from homeport.wire.frame import FrameDecoder

PIN = "sha256:" + "ab" * 32
T0 = 1_800_000_000.0

#: A well-formed OpenSSH public key line (an all-zero Ed25519 key).
HOST_KEY = "ssh-ed25519 " + base64.b64encode(
    struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
).decode("ascii")


def csr(name: str = "labpc") -> str:
    return identity.make_csr(identity.new_private_key_pem(), name).decode()


@dataclass
class Outbox:
    """What one session was sent, and whether it was closed (and why)."""

    messages: list[m.Message] = field(default_factory=list)
    closed: tuple[str, str] | None = None
    finished: bool = False

    def take(self) -> list[m.Message]:
        out, self.messages = self.messages, []
        return out

    def of(self, cls: type[m.Message]) -> list[m.Message]:
        return [x for x in self.messages if isinstance(x, cls)]


class Sim:
    """Coordinator + registry, driven by hand."""

    _ca: identity.KeyPair | None = None

    def __init__(self, **core_kw: object) -> None:
        if Sim._ca is None:
            Sim._ca = identity.create_ca()
        self.ca = Sim._ca
        self.registry = Registry(open_store("sqlite://"), server_pin=PIN)
        self.core = c.Coordinator(ca=self.ca, server_pin=PIN, **core_kw)  # type: ignore[arg-type]
        self.out: dict[int, Outbox] = {}
        self.relay: list[c.Command] = []
        self.notes: list[str] = []
        self.audits: list[Audit] = []
        self._next = 0
        self.now = T0

    # -- plumbing ----------------------------------------------------------------------
    def run(self) -> None:
        while cmds := self.core.commands():
            for cmd in cmds:
                self._execute(cmd)

    def _execute(self, cmd: c.Command) -> None:
        if isinstance(cmd, c.Send):
            self.out[cmd.session].messages.append(cmd.message)
        elif isinstance(cmd, c.SendEncoded):
            dec = FrameDecoder()
            for t, body in dec.feed_untrusted(cmd.data):
                self.out[cmd.session].messages.append(m.decode_untrusted(t, body))
        elif isinstance(cmd, c.Close):
            self.out[cmd.session].closed = (cmd.code, cmd.message)
        elif isinstance(cmd, c.Finish):
            self.out[cmd.session].finished = True
        elif isinstance(cmd, c.Persist):
            self.registry.apply(cmd.op)
        elif isinstance(cmd, c.EnrollRequest):
            self.core.enroll_done(cmd.session, self.registry.enroll(cmd), self.now)
        elif isinstance(cmd, c.Note):
            self.notes.append(cmd.text)
        elif isinstance(cmd, Audit):
            self.audits.append(cmd)
        else:
            self.relay.append(cmd)

    def advance(self, seconds: float) -> None:
        """Let time pass, firing every timer that comes due on the way."""
        end = self.now + seconds
        while (t := self.core.get_timer()) is not None and t <= end:
            self.now = max(self.now, t)
            self.core.handle_timer(self.now)
            self.run()
        self.now = end

    # -- sessions ------------------------------------------------------------------------
    def connect(self, fp: str | None = None, address: str = "192.0.2.10:40000") -> int:
        self._next += 1
        self.out[self._next] = Outbox()
        self.core.session_started(self._next, fp, address)
        return self._next

    def send(self, sid: int, msg: m.Message) -> None:
        self.core.message(sid, msg, self.now)
        self.run()

    def end(self, sid: int) -> None:
        self.core.session_ended(sid, self.now)
        self.run()

    # -- high-level steps ------------------------------------------------------------------
    def enroll(self, key_text: str, name: str, csr_pem: str | None = None) -> m.Message:
        """ENROLLED, or the ERROR the session was closed with (as an Error message)."""
        sid = self.connect(None)
        self.send(
            sid, m.Enroll(proto=1, auth_key=key_text, name=name, csr_pem=csr_pem or csr(name))
        )
        box = self.out[sid]
        if box.closed is not None:
            return m.Error(code=box.closed[0], message=box.closed[1])
        [enrolled] = box.of(m.Enrolled)
        return enrolled

    def new_node(self, name: str) -> c.NodeRecord:
        key = self.registry.create_auth_key(now=self.now)
        msg = self.enroll(str(key), name)
        assert isinstance(msg, m.Enrolled), msg
        node = self.core.node(msg.node_id)
        assert node is not None
        return node

    def hello(self, node: c.NodeRecord, role: str = "agent", *, capver: int = 2) -> int:
        sid = self.connect(node.fingerprint)
        caps = m.OUR_CAPS if capver >= 2 else ()
        self.send(sid, m.Hello(proto=1, role=role, capver=capver, caps=caps))
        return sid

    def agent(
        self, node: c.NodeRecord, services: tuple[m.ServiceInfo, ...] = (), *, capver: int = 2
    ) -> int:
        sid = self.hello(node, "agent", capver=capver)
        self.send(sid, m.Announce(services=services, host_keys=(HOST_KEY,)))
        return sid
