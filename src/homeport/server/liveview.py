"""Read-only views of the running server for the admin API (status, online nodes, streams).

Why a separate object: :class:`~homeport.server.admin.AdminOps` also runs
offline (no server), where there is no live state; it asks a
:class:`~homeport.server.admin.LiveView` when it has one. Every method here is
called on the server's event loop (like every admin op), so reading the
coordinator and the relay needs no locking; each returns plain JSON-ready data.
"""

from __future__ import annotations

import time
from typing import Any

from homeport import __version__
from homeport.server.service import Service

#: Path reports are listed per online node only up to this many online nodes
#: (the table is quadratic in them); above it ``paths`` is null and the per-pair
#: detail is left to ``homeport status`` on the nodes.
MAX_PATH_NODES = 100
#: Streams listed at most (the relay bounds them anyway; this bounds one answer).
MAX_STREAMS_LISTED = 10_000


class ServiceView:
    """What :class:`Service` can tell about itself right now."""

    def __init__(
        self,
        service: Service,
        *,
        listen: str,
        pin: str,
        admin_listen: str = "",
        clock: Any = time.time,
    ) -> None:
        self.service = service
        self.listen = listen
        self.pin = pin
        self.admin_listen = admin_listen
        self._clock = clock
        self.started_at = clock()

    def server_info(self) -> dict[str, Any]:
        core = self.service.core
        nodes = core.node_list()
        stats = self.service.relay.statistics()
        policy = core.policy
        return {
            "version": __version__,
            "listen": self.listen,
            "admin_listen": self.admin_listen,
            "server_pin": self.pin,
            "started_at": self.started_at,
            "uptime": max(0.0, self._clock() - self.started_at),
            "nodes_total": len(nodes),
            "nodes_online": sum(1 for n in nodes if n.online),
            "streams_open": len(core.stream_states()),
            "streams_relayed": len(stats.streams),
            "streams_relayed_total": stats.streams_spliced_total,
            "bytes_relayed_total": stats.bytes_total,
            "unauthenticated_connections": self.service.unauthenticated,
            "relay_only": core.relay_only,
            "probe_port": self.service.probe_port,
            "policy": None if policy is None else policy.digest,
        }

    def online_nodes(self) -> list[dict[str, Any]]:
        core = self.service.core
        online = [n for n in core.node_list() if n.online]
        with_paths = len(online) <= MAX_PATH_NODES
        out: list[dict[str, Any]] = []
        for n in online:
            paths: list[dict[str, Any]] | None = None
            if with_paths:
                paths = []
                for peer in online:
                    if peer is n:
                        continue
                    # the node's own report, else its peer's about it: often only the end
                    # that opened a stream reports the path (a direct stream's far end too)
                    rec = core.path_record(n.node_id, peer.node_id)
                    reporter = n
                    if rec is None:
                        rec, reporter = core.path_record(peer.node_id, n.node_id), peer
                    if rec is None:
                        continue
                    paths.append(
                        {
                            "peer": peer.name,
                            "reported_by": reporter.name,
                            "kind": rec.kind,
                            "endpoint": rec.endpoint,
                            "rtt_ms": rec.rtt_ms,
                            "code": rec.code,
                            "reason": rec.reason,
                            "at": rec.at,
                            "punch_attempts": rec.punch_attempts,
                            "punch_successes": rec.punch_successes,
                            "streams_direct": rec.streams_direct,
                            "streams_relay": rec.streams_relay,
                        }
                    )
            endpoints = core.endpoints_of(n.node_id)
            out.append(
                {
                    "name": n.name,
                    "node_id": n.node_id,
                    "address": n.address,
                    "user": n.user,
                    "tags": list(n.tags),
                    "services": [{"name": s.name, "port": s.port} for s in n.services],
                    "direct": endpoints is not None,
                    "paths": paths,
                }
            )
        return out

    def streams(self) -> list[dict[str, Any]]:
        core = self.service.core
        states = core.stream_states()
        names = {n.node_id: n.name for n in core.node_list()}
        out: list[dict[str, Any]] = []
        for st in self.service.relay.statistics().streams[:MAX_STREAMS_LISTED]:
            coord_state = states.get(st.stream_id)
            out.append(
                {
                    "stream_id": st.stream_id,
                    "src": names.get(st.src_node, st.src_node),
                    "dst": names.get(st.dst_node, st.dst_node),
                    "path": "relay",
                    "state": st.state.value,
                    "coordinator_state": None if coord_state is None else coord_state.value,
                    "bytes_up": st.bytes_src_to_dst,
                    "bytes_down": st.bytes_dst_to_src,
                    "started": st.started or None,
                }
            )
        return out
