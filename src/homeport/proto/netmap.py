"""INTERIM (replaced by the netmap branch): full maps only."""

from __future__ import annotations

from homeport.wire import control as m

PEERS_PER_FRAME = 1000


class PeerBook:
    def __init__(self) -> None:
        self._peers: dict[str, m.Peer] = {}
        self.version = 0

    def upsert(self, peer: m.Peer) -> None:
        old = self._peers.get(peer.node_id)
        if old is not None and old == peer:
            return
        self.version += 1
        self._peers[peer.node_id] = peer

    def remove(self, node_id: str) -> None:
        if self._peers.pop(node_id, None) is not None:
            self.version += 1

    def updates_for(self, viewer_id: str, base: int) -> list[m.Peers]:
        peers = list(self._peers.values())
        chunks = [peers[i : i + PEERS_PER_FRAME] for i in range(0, len(peers), PEERS_PER_FRAME)]
        chunks = chunks or [[]]
        return [
            m.Peers(
                version=self.version,
                base=0,
                reset=True,
                peers=tuple(c),
                more=i < len(chunks) - 1,
            )
            for i, c in enumerate(chunks)
        ]

    def encoded_updates_for(self, viewer_id: str, base: int) -> bytes:
        return b"".join(m.encode(f) for f in self.updates_for(viewer_id, base))


class PeerView:
    def __init__(self) -> None:
        self.peers: dict[str, m.Peer] = {}
        self.version = 0
        self._pending: list[m.Peers] = []

    def apply(self, msg: m.Peers) -> bool:
        self._pending.append(msg)
        if msg.more:
            return False
        frames, self._pending = self._pending, []
        if frames[0].reset:
            self.peers = {}
        for f in frames:
            for p in f.peers:
                self.peers[p.node_id] = p
            for r in f.removed:
                self.peers.pop(r, None)
        self.version = msg.version
        return True
