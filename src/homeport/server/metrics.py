"""Prometheus metrics of the server: one adapter that watches the server's existing events.

Why an adapter and not calls sprinkled through the code: the server already has
one stream of everything that happens -- the coordinator's commands (sends,
closes, relay instructions, :class:`~homeport.proto.audit.Audit` records) -- and
the relay's :class:`~homeport.relay.RelayEvent` callbacks. :class:`ServerMetrics`
observes both (:meth:`ServerMetrics.observe` is :attr:`Service.observe`,
:meth:`ServerMetrics.relay_event` joins the relay's event fan-out) plus the
shell's :class:`~homeport.server.service.ConnectionRefused` events, and reads the
gauges (nodes online, connections, streams open, bytes of live streams) only
when scraped. The coordinator core stays pure: it imports nothing of this.

Registry. Each :class:`ServerMetrics` has its own ``CollectorRegistry`` (never
the process-global one): tests and several servers in one process stay apart.

Cardinality. Every label value comes from a fixed vocabulary (the enums and
frozensets below; anything else is counted as ``other``). Node names, user
names, addresses, stream ids or peer-supplied text never become label values:
a label value is a new time series for ever in Prometheus, and a hostile node
could otherwise mint them at will.

Threads. :meth:`ServerMetrics.observe` runs on the server's event loop;
:meth:`ServerMetrics.relay_event` on relay worker threads; :meth:`exposition`
may be called on any thread: it reads the coordinator on the event loop (the
admin listener runs there; from elsewhere it hops onto it). prometheus_client's
metric objects are thread-safe; the few tables of our own are guarded by a lock.

Every metric, its labels and meaning: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from homeport import relay as hprelay
from homeport.proto import audit as au
from homeport.proto import coord as c
from homeport.proto.audit import Audit
from homeport.server.service import ConnectionRefused, Refusal

if TYPE_CHECKING:
    from homeport.server.service import Service

#: Streams whose setup is being timed at once (OPEN seen, not spliced or failed yet). The
#: coordinator bounds streams in setup far lower; past this the oldest entry is forgotten.
MAX_TIMED_SETUPS = 65_536
#: Buckets of the stream setup histogram (seconds): 1 ms to 10 s. A relayed setup is an
#: OPEN, the destination's ACCEPT (after it connected its local target) and two data
#: connections: a few ms on a LAN, hundreds over the internet, seconds when a node lags.
SETUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Seconds a scrape from another thread waits for the event loop to read the core.
SCRAPE_TIMEOUT = 2.0

OTHER = "other"
#: The classic text format's content type: every Prometheus version parses it (the body
#: generate_latest writes is that format: our names are plain ASCII identifiers).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Path(enum.Enum):
    """``path`` label: how a stream's bytes travel."""

    RELAY = "relay"
    DIRECT = "direct"  # node to node; the server learns of it from the agent's STREAM_LOG


class Result(enum.Enum):
    """``result`` label of ``homeport_streams_total``."""

    OK = "ok"  # relayed: both ends spliced; direct: the destination accepted it
    REFUSED = "refused"  # denied by the server or the destination (policy, offline, ...)
    FAILED = "failed"  # allowed, but never established (timeout, a side vanished, relay full)


class Stage(enum.Enum):
    """``stage`` label of ``homeport_refused_total``: where the refusal happened."""

    CONNECTION = "connection"  # before any session: admission limits, handshakes, junk
    SESSION = "session"  # a HELLO or ENROLL the coordinator turned away
    STREAM = "stream"  # an OPEN denied (server) or rejected (destination)


#: ``reason`` values of stage "session": the coordinator's close codes for a session
#: that never authenticated (HELLO and ENROLL refusals).
SESSION_REASONS = frozenset(
    {
        "upgrade",
        "bad-request",
        "unknown-node",
        "node-removed",
        "expired",
        "rate-limited",
        "auth-key-invalid",
        "auth-key-used",
        "auth-key-expired",
        "bad-name",
        "name-taken",
        "internal",
    }
)
#: ``reason`` values of stage "stream": the server's OPEN refusal codes and the
#: destination's REJECT codes (the latter are peer-supplied: unknown ones become "other").
STREAM_REASONS = frozenset(
    {
        "policy",
        "not-exposed",
        "offline",
        "unknown-node",
        "node-removed",
        "pending-approval",
        "busy",
        "bad-request",
        "shields-up",
        "service-down",
        "rejected",
    }
)
#: ``result`` values of ``homeport_enrollments_total`` besides "ok".
ENROLL_RESULTS = frozenset(SESSION_REASONS - {"upgrade", "unknown-node", "node-removed"})


#: Commands that carry nothing for the metrics (skipped with one set lookup).
_IGNORED: frozenset[type] = frozenset(
    {c.Send, c.SendEncoded, c.Persist, c.Note, c.Finish, c.RelayExtend, c.RelayRefuse}
)


def bounded(value: str, allowed: frozenset[str]) -> str:
    """``value`` if it is in the fixed vocabulary ``allowed``, else ``"other"``."""
    return value if value in allowed else OTHER


@dataclass(frozen=True, slots=True)
class _State:
    """What a scrape reads from the coordinator and the shell (on their loop)."""

    nodes_online: int
    nodes: int
    streams: dict[str, int]
    punches: int
    punch_successes: int
    control: int
    unauthenticated: int


class _Scrape:
    """The collector of values read at scrape time (gauges, relay bytes, punches)."""

    def __init__(self, owner: ServerMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return ()  # names are checked at registration only through describe: none to clash

    def collect(self) -> Iterator[Metric]:
        return self._owner._collect()


class ServerMetrics:
    """The server's Prometheus metrics (own registry); fed by :meth:`observe` and
    :meth:`relay_event`, read with :meth:`exposition`. See the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.streams = Counter(
            "homeport_streams",
            "Streams by path (relay/direct) and result (ok/refused/failed)",
            ["path", "result"],
            registry=reg,
        )
        self.setup_seconds = Histogram(
            "homeport_stream_setup_seconds",
            "Relayed streams: seconds from the OPEN to both data connections spliced",
            buckets=SETUP_BUCKETS,
            registry=reg,
        )
        self.refused = Counter(
            "homeport_refused",
            "Connections, sessions and streams refused, by stage and reason",
            ["stage", "reason"],
            registry=reg,
        )
        self.enrollments = Counter(
            "homeport_enrollments",
            "Enrollment attempts by result (ok or the refusal code)",
            ["result"],
            registry=reg,
        )
        for p in Path:  # the series exist (at 0) before the first event: rate() works at once
            for r in Result:
                self.streams.labels(p.value, r.value)
        self.enrollments.labels("ok")
        for reason in Refusal:
            self.refused.labels(Stage.CONNECTION.value, reason.value)
        self._children: dict[tuple[object, ...], Counter] = {}  # any thread (GIL-atomic)
        self._lock = threading.Lock()
        self._setups: OrderedDict[str, float] = OrderedDict()  # stream id -> OPEN seen at
        self._ended = {"up": 0, "down": 0}  # bytes of relayed streams that ended
        self._bytes_hwm = {"up": 0, "down": 0}  # what the last scrape reported (monotonic)
        self._established = dict.fromkeys(Path, 0)  # streams_total{result="ok"} by path
        self._core: c.Coordinator | None = None
        self._service: Service | None = None
        self._relay: hprelay.Relay | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        reg.register(_Scrape(self))

    def bind(self, core: c.Coordinator, service: Service, relay: hprelay.Relay) -> None:
        """Where the scrape-time values come from (the server wires this once, on its
        event loop: scrapes from other threads read the coordinator there)."""
        self._core, self._service, self._relay = core, service, relay
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format: (body, content type). Any thread (module docstring)."""
        return generate_latest(self.registry), CONTENT_TYPE

    # -- events --------------------------------------------------------------------------
    def observe(self, event: object) -> None:
        """A core command (before it runs) or a shell event; the event loop only."""
        if type(event) in _IGNORED:  # the bulk of commands (sends, writes, notes): one lookup
            return
        if isinstance(event, Audit):
            self._audit(event)
        elif isinstance(event, c.RelayExpect):
            with self._lock:
                self._setups[event.stream_id] = self._clock()
                while len(self._setups) > MAX_TIMED_SETUPS:
                    self._setups.popitem(last=False)
        elif isinstance(event, (c.RelayCancel, c.RelayCutStream)):
            # never spliced (a refusal already took its entry): the setup failed
            if self._forget(event.stream_id) is not None:
                self._inc(self.streams, Path.RELAY.value, Result.FAILED.value)
        elif isinstance(event, c.Close):
            core = self._core
            if core is not None and not core.session_node(event.session):
                # no node behind the session yet: a HELLO or ENROLL turned away
                reason = bounded(event.code, SESSION_REASONS)
                self._inc(self.refused, Stage.SESSION.value, reason)
        elif isinstance(event, ConnectionRefused):
            self._inc(self.refused, Stage.CONNECTION.value, event.reason.value)

    def relay_event(self, ev: hprelay.RelayEvent) -> None:
        """From the relay, on any thread (it must not block)."""
        if isinstance(ev, hprelay.StreamStarted):
            began = self._forget(ev.stream_id)
            self._ok(Path.RELAY)
            if began is not None:
                self.setup_seconds.observe(max(0.0, self._clock() - began))
        else:
            with self._lock:
                self._ended["up"] += ev.bytes_up
                self._ended["down"] += ev.bytes_down

    def _inc(self, counter: Counter, *labels: str) -> None:
        """``counter.labels(*labels).inc()``, the child cached: ``labels()`` costs several
        microseconds, and every value here is from a bounded vocabulary."""
        key = (counter, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()

    def _forget(self, stream_id: str) -> float | None:
        with self._lock:
            return self._setups.pop(stream_id, None)

    def _audit(self, ev: Audit) -> None:
        f = ev.as_dict()
        if ev.kind == au.STREAM:
            direct = f.get("by") == "destination-direct"
            path = Path.DIRECT if direct else Path.RELAY
            if f.get("verdict") == "allowed":
                if direct:  # a relayed one counts when spliced (or failed), not here
                    self._ok(path)
                return
            self._inc(self.streams, path.value, Result.REFUSED.value)
            reason = bounded(f.get("code", ""), STREAM_REASONS)
            self._inc(self.refused, Stage.STREAM.value, reason)
            if not direct and f.get("stream"):
                self._forget(f["stream"])  # the destination rejected it: not a failure
        elif ev.kind == au.ENROLL:
            self._inc(self.enrollments, "ok")
        elif ev.kind == au.ENROLL_REFUSED:
            self._inc(self.enrollments, bounded(f.get("code", ""), ENROLL_RESULTS))

    # -- scrape time -----------------------------------------------------------------------
    def _relay_bytes(self) -> dict[str, int]:
        """Bytes relayed per direction: ended streams plus the live ones' progress.

        A stream's bytes move from "live" (the relay's snapshot) to "ended" (its
        StreamEnded event) on another thread; a scrape in between could see a dip,
        so the value reported never goes below the last one (a counter must not).
        """
        live = {"up": 0, "down": 0}
        relay = self._relay
        if relay is not None:
            for st in relay.statistics().streams:
                live["up"] += st.bytes_src_to_dst
                live["down"] += st.bytes_dst_to_src
        with self._lock:
            for d in ("up", "down"):
                self._bytes_hwm[d] = max(self._bytes_hwm[d], self._ended[d] + live[d])
            return dict(self._bytes_hwm)

    def _ok(self, path: Path) -> None:
        self._inc(self.streams, path.value, Result.OK.value)
        with self._lock:
            self._established[path] += 1

    def _direct_ratio(self) -> float:
        with self._lock:
            direct, total = self._established[Path.DIRECT], sum(self._established.values())
        return direct / total if total else 0.0

    def _read(self) -> _State | None:
        """The coordinator's and shell's numbers, read on the server's event loop.

        The admin listener runs on that loop, so a scrape is normally already there;
        called from another thread (a sync handler in a thread pool, a test), it hops
        onto the loop, bounded by :data:`SCRAPE_TIMEOUT`.
        """
        core, service, loop = self._core, self._service, self._loop
        if core is None or service is None:
            return None

        def read() -> _State:
            nodes = core.node_list()
            states = list(core.stream_states().values())
            return _State(
                nodes_online=sum(1 for n in nodes if n.online),
                nodes=len(nodes),
                streams={st.value: states.count(st) for st in c.StreamState},
                punches=core.punches_total,
                punch_successes=core.punch_successes_total,
                control=service.control_connections,
                unauthenticated=service.unauthenticated,
            )

        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return read()
        if loop.is_closed():
            return None

        async def hop() -> _State:
            return read()

        try:
            return asyncio.run_coroutine_threadsafe(hop(), loop).result(SCRAPE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return None

    def _collect(self) -> Iterator[Metric]:
        st = self._read()
        if st is not None:
            yield GaugeMetricFamily(
                "homeport_nodes_online", "Nodes with an agent session now", value=st.nodes_online
            )
            yield GaugeMetricFamily(
                "homeport_nodes", "Enrolled nodes (not removed)", value=st.nodes
            )
            opened = GaugeMetricFamily(
                "homeport_streams_open",
                "Streams through the server now, by state (waiting for the destination, "
                "accepted and waiting for the data connections, live = relayed)",
                labels=["state"],
            )
            for state, n in st.streams.items():
                opened.add_metric([state], n)
            yield opened
            punches = CounterMetricFamily(
                "homeport_punch_attempts", "Hole punches the server coordinated (PUNCH pairs)"
            )
            punches.add_metric([], st.punches)
            yield punches
            ups = CounterMetricFamily(
                "homeport_punch_successes",
                "Coordinated punches after which the pair reported a direct path up",
            )
            ups.add_metric([], st.punch_successes)
            yield ups
            yield GaugeMetricFamily(
                "homeport_control_connections",
                "Control connections open (TLS; handshaking or in a session)",
                value=st.control,
            )
            yield GaugeMetricFamily(
                "homeport_unauthenticated_connections",
                "Connections not yet authenticated (handshakes, preambles being read)",
                value=st.unauthenticated,
            )
        relayed = CounterMetricFamily(
            "homeport_relay_bytes",
            "Bytes the relay moved, by direction (up = opener to destination)",
            labels=["direction"],
        )
        for d, n in self._relay_bytes().items():
            relayed.add_metric([d], n)
        yield relayed
        yield GaugeMetricFamily(
            "homeport_direct_path_ratio",
            "Share of established streams that went direct, since the server started "
            "(derived from homeport_streams_total; direct ones as reported by agents)",
            value=self._direct_ratio(),
        )
