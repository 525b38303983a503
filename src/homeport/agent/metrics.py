"""Prometheus metrics of one agent (``homeport up --metrics-listen 127.0.0.1:9101``).

Off by default; imported only when asked (never on ``homeport nc``'s path).
Served by prometheus_client's own small HTTP server (a daemon thread): a
scrape is rare and tiny, and the library's server is the well-trodden one.

Where the values come from. Events are counted as they happen through one
seam, :attr:`homeport.agent.runtime.Agent.observe`: it sees every command the
pure node core makes (session ready, reconnect scheduled, stream started) and
the byte counts of each relayed stream when its pump ends. Everything else --
the control link's state, streams open, each peer's current path, the direct
paths' punch and stream counters and bytes -- is read at scrape time, on the
agent's event loop (the HTTP thread hops onto it, bounded by
:data:`SCRAPE_TIMEOUT`), because that is where the core's state lives.

Cardinality: label values come only from fixed vocabularies (path kinds,
directions); never peer names or other text a peer chose.

Metrics, labels and meaning: docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from homeport.agent.runtime import Agent, StreamPumped
from homeport.proto import node as core
from homeport.proto.path import PathKind

log = logging.getLogger("homeport.agent.metrics")

#: Seconds a scrape waits for the event loop to read the agent's state (it only reads).
SCRAPE_TIMEOUT = 2.0
#: The classic text format's content type (every Prometheus version parses it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds ``close`` waits for the HTTP thread.
CLOSE_TIMEOUT = 5.0
#: Where ``--metrics-listen PORT`` (no host) listens: loopback, never all interfaces.
DEFAULT_HOST = "127.0.0.1"


class ListenError(ValueError):
    """A ``--metrics-listen`` value we refuse (one line for the user)."""


def parse_metrics_listen(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); loopback unless allowed.

    Why loopback only by default: the metrics say which peers this node talks to
    and how much; anyone who can reach the port can read them (no token here).
    """
    import ipaddress

    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ListenError(f"--metrics-listen {text!r}: expected [HOST:]PORT with a port 1-65535")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ListenError(f"--metrics-listen {text!r}: {host!r} is not an IP address") from None
        if not loopback and not allow_remote:
            raise ListenError(
                f"--metrics-listen {text!r}: {host} is not a loopback address; the metrics "
                "have no access control, so add --metrics-allow-remote to serve them there"
            )
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a scrape reads on the event loop."""

    connected: bool
    active: int
    paths: dict[str, int]
    counters: dict[str, int]
    links: dict[Any, tuple[int, int]]  # live direct links -> (bytes sent, bytes received)


class _Scrape:
    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        return self._owner._collect()


class AgentMetrics:
    """One agent's metrics (own registry); :meth:`observe` is the agent's observer."""

    def __init__(self, agent: Agent | None = None) -> None:
        self._agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.sessions = Counter(
            "homeport_agent_control_sessions",
            "Control sessions established with the server (WELCOME received)",
            registry=reg,
        )
        self.reconnects = Counter(
            "homeport_agent_reconnects",
            "Reconnects scheduled after a lost session or a failed connect",
            registry=reg,
        )
        self.relayed = Counter(
            "homeport_agent_relay_streams",
            "Streams over the relay, by direction (incoming: served for a peer; "
            "outgoing: opened by a local client)",
            ["direction"],
            registry=reg,
        )
        self.relay_bytes = Counter(
            "homeport_agent_relay_bytes",
            "Bytes of ended relayed streams, by direction (out: to the peer)",
            ["direction"],
            registry=reg,
        )
        for d in ("incoming", "outgoing"):
            self.relayed.labels(d)
        for d in ("in", "out"):
            self.relay_bytes.labels(d)
        self._lock = threading.Lock()
        self._links_seen: dict[Any, tuple[int, int]] = {}
        self._links_gone = (0, 0)
        reg.register(_Scrape(self))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format: (body, content type); any thread."""
        return generate_latest(self.registry), CONTENT_TYPE

    def observe(self, event: object) -> None:
        """A core command (event loop) or a StreamPumped (a stream thread)."""
        try:
            if isinstance(event, core.SessionReady):
                self.sessions.inc()
            elif isinstance(event, core.Reconnect):
                self.reconnects.inc()
            elif isinstance(event, core.StartStream):  # we ACCEPTed a peer's stream
                self.relayed.labels("incoming").inc()
            elif isinstance(event, core.LocalOpenSucceeded):  # OPENED for a local client
                self.relayed.labels("outgoing").inc()
            elif isinstance(event, StreamPumped):
                self.relay_bytes.labels("out").inc(event.sent)
                self.relay_bytes.labels("in").inc(event.received)
        except Exception:  # a metrics bug must not break the agent
            log.exception("metrics observer failed on %r", event)

    # -- scrape time -----------------------------------------------------------------------
    def _read(self) -> _Snapshot | None:
        agent = self._agent
        if agent is None:
            return None
        loop = agent._loop
        if loop is None or loop.is_closed():
            return None
        try:
            snap: _Snapshot = agent._on_loop_wait(lambda: _snapshot(agent), SCRAPE_TIMEOUT)
        except Exception as exc:  # the loop is busy or stopping: report what we count
            log.debug("metrics scrape could not read the agent: %s", exc)
            return None
        return snap

    def _direct_bytes(self, links: dict[Any, tuple[int, int]]) -> tuple[int, int]:
        """Bytes over direct links: closed links' last seen counts plus the live ones'.

        A link's bytes after the last scrape before it closed are not seen (an
        undercount bounded by one scrape interval of that link's traffic).
        """
        with self._lock:
            gone_s, gone_r = self._links_gone
            for lk, (s, r) in self._links_seen.items():
                if lk not in links:
                    gone_s, gone_r = gone_s + s, gone_r + r
            self._links_gone = (gone_s, gone_r)
            self._links_seen = dict(links)
            return (
                gone_s + sum(s for s, _ in links.values()),
                gone_r + sum(r for _, r in links.values()),
            )

    def _collect(self) -> Iterator[Metric]:
        snap = self._read()
        if snap is None:
            return
        yield GaugeMetricFamily(
            "homeport_agent_control_connected",
            "1 while the control session with the server is up",
            value=1 if snap.connected else 0,
        )
        yield GaugeMetricFamily(
            "homeport_agent_streams_active",
            "Incoming streams being set up or served now",
            value=snap.active,
        )
        paths = GaugeMetricFamily(
            "homeport_agent_peer_paths",
            "Peers by the path a new stream to them would take now",
            labels=["path"],
        )
        for kind in PathKind:
            paths.add_metric([kind.value], snap.paths.get(kind.value, 0))
        yield paths
        cnt = snap.counters
        for name, key, text in (
            ("homeport_agent_punch_attempts", "punch_attempts", "Hole punches started"),
            ("homeport_agent_punch_successes", "punch_successes", "Hole punches that won"),
        ):
            fam = CounterMetricFamily(name, text)
            fam.add_metric([], cnt.get(key, 0))
            yield fam
        direct = CounterMetricFamily(
            "homeport_agent_direct_streams",
            "Streams over direct paths, by direction (incoming: served for a peer)",
            labels=["direction"],
        )
        direct.add_metric(["incoming"], cnt.get("streams_incoming_direct", 0))
        direct.add_metric(["outgoing"], cnt.get("streams_direct", 0))
        yield direct
        sent, received = self._direct_bytes(snap.links)
        dbytes = CounterMetricFamily(
            "homeport_agent_direct_bytes",
            "Bytes over direct links (mux framing included), by direction (out: to the peer)",
            labels=["direction"],
        )
        dbytes.add_metric(["out"], sent)
        dbytes.add_metric(["in"], received)
        yield dbytes


def _snapshot(agent: Agent) -> _Snapshot:
    """(event loop) the agent's state a scrape reports."""
    import asyncio

    core_ = agent.core
    now = asyncio.get_running_loop().time()
    paths: dict[str, int] = {}
    for peer in core_.peers.peers.values():
        if peer.online and peer.node_id != core_.node_id:  # the map lists this node too
            kind = core_.path_choice(peer.node_id, now).kind.value
            paths[kind] = paths.get(kind, 0) + 1
    direct = agent._direct
    counters = direct.counters.as_json() if direct is not None else {}
    links: dict[Any, tuple[int, int]] = {}
    if direct is not None:
        for lk in direct._links.values():
            links[lk.link] = (lk.link.bytes_sent, lk.link.bytes_received)
    return _Snapshot(core_.ready, core_.active, paths, counters, links)


class AgentMetricsServer:
    """The HTTP listener serving one agent's metrics; :meth:`close` stops it."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self._httpd, self._thread = start_http_server(port, host, registry=metrics.registry)
        self.port = int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(CLOSE_TIMEOUT)


def serve_agent_metrics(agent: Agent, host: str, port: int) -> AgentMetricsServer:
    """Observe ``agent`` and serve its metrics on ``host:port``. Raises OSError (bind)."""
    metrics = AgentMetrics(agent)
    try:
        server = AgentMetricsServer(metrics, host, port)
    except OSError as exc:
        raise OSError(f"--metrics-listen {host}:{port}: {exc.strerror or exc}") from exc
    agent.observe = metrics.observe
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server


def attach_metrics(host: str, port: int) -> Callable[[Agent], Callable[[], None]]:
    """For :func:`homeport.agent.runtime.run_agent`'s ``attach``: serve the metrics of the
    agent it runs on ``host:port`` while it runs."""

    def attach(agent: Agent) -> Callable[[], None]:
        return serve_agent_metrics(agent, host, port).close

    return attach
