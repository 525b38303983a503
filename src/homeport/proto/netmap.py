"""The peer map (netmap) as two pure state machines: the coordinator's book, a node's view.

Why this exists. The first release sent every node the whole network in one
NETMAP frame, host keys included (~1 KiB per node), re-encoded for every
recipient on every change: ~1,000 nodes already overflow ``MAX_FRAME`` and a
join costs N full encodings. Capability version 2 replaces it with PEERS
(:class:`homeport.wire.control.Peers`): versioned, delta-encoded, chunked
into frames, without host keys (those travel only in OPENED, for the one peer
a stream goes to, so nobody's keys can bloat anybody's map).

Theory of operation::

    coordinator                                   node
    -----------                                   ----
    book.upsert(peer) / book.remove(id)           view = PeerView()        # wants a full map
      -> book.version += 1 per real change
    push (coalesced): for each session s:
      data = book.encoded_updates_for(s.node, s.sent)
      s.sent = book.version; s.write(data)  --->  out = view.receive(frame)  # per PEERS frame
    NETMAP_REQ from s:                              out.status NEED_FULL -> send NETMAP_REQ
      data = book.encoded_updates_for(s.node, 0)    out.status APPLIED   -> view.peers is new
      s.sent = book.version; s.write(data)

Versions. The book has one global ``version`` (0 when empty and new, +1 per
change); each entry's ``rev`` is the version at which it last changed. An
update is either a *full map* (``reset``: replace everything) or a *delta*
that applies only to a map at exactly version ``base``: upsert ``peers``,
drop ``removed``. A view at another version answers NEED_FULL; it never
guesses. Deltas are found in O(changed): entries are kept in rev order (an
OrderedDict, ``move_to_end`` on change) and read from the newest end, and
removals go to a bounded log (:data:`MAX_REMOVAL_LOG`). A base older than the
log's horizon, a base of 0 (a new session), a base from the future (another
server run), or a delta not smaller than the map all get a full map.

Chunking. One update is split into frames of at most :data:`PEERS_PER_FRAME`
entries *and* at most :data:`FRAME_BUDGET` body bytes (each entry's encoded
size is measured once, when it changes), all with the same version/base/reset
and ``more`` on all but the last; the view applies the update only when the
last frame arrives, so it never exposes half a map.

Visibility. ``visible(viewer_id, peer)`` is the hook for the policy filter
("a node learns only the peers it may reach"). In a delta, a changed entry
the viewer may not see is sent as a removal (removing an unknown id is a
no-op), so the book keeps no per-viewer state. When what a viewer may see
changes without the entries changing (a policy edit, the viewer's own
tags), call :meth:`PeerBook.reset_all` (everyone gets a full map next) or
send that viewer a full map (base 0).

Sharing. Without a filter the frames for (base -> version) are the same for
every recipient, so :meth:`PeerBook.encoded_updates_for` encodes them once per
distinct base and version and hands the same bytes to every session. With a
filter, an optional ``audience(viewer_id)`` key groups viewers that see the
same peers (under a tag/user policy: their user and tags), and the encoding is
shared per (audience, base) instead of being redone per viewer.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import types
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, replace

from homeport.wire import control as m
from homeport.wire.frame import MAX_FRAME, encode_frame

#: Most entries in one PEERS frame. A typical entry encodes to ~300 bytes (a
#: frame of ~60 KiB); a long one (every name at its limit, an IPv6 address, four
#: services and tags) to ~1 KiB, so even those frames are cut by this count
#: before FRAME_BUDGET. Far under MAX_LIST (4096) and MAX_FRAME.
PEERS_PER_FRAME = 200
#: Most removed ids in one PEERS frame (ids are short; far under MAX_LIST).
REMOVED_PER_FRAME = 1024
#: Most body bytes in one PEERS frame: a quarter of MAX_FRAME, so a frame of
#: unusually large entries (hundreds of services each) is cut by size, not count.
FRAME_BUDGET = MAX_FRAME // 4
#: Largest encoded entry the book accepts (a node with the server's maximum of
#: 256 services with 63-character names is ~25 KiB). Always fits FRAME_BUDGET.
MAX_ENTRY_BYTES = 64 * 1024
#: Longest node id the book accepts (server ids are 13 characters).
MAX_NODE_ID = 64
#: Removals remembered for deltas; a view further behind gets a full map.
MAX_REMOVAL_LOG = 4096
#: Encoded updates cached per version, one per distinct (audience, base): without
#: a filter normally 1 or 2 (every session is at the previous version or needs a
#: full map); with an audience, one or two per audience. Oldest dropped first.
MAX_CACHED_ENCODINGS = 1024
#: Upper bound on the JSON around the lists in a PEERS body (keys, two 19-digit
#: integers, booleans); the byte budget counts it once per frame.
FRAME_ENVELOPE = 160
#: Most peers a node keeps (a map growing beyond is refused, not stored).
MAX_PEERS = 65536
#: Most frames of one update a node buffers before it is complete (a full map of
#: MAX_PEERS typical entries takes MAX_PEERS / PEERS_PER_FRAME = 328 frames).
MAX_PENDING_FRAMES = 512

#: ``visible(viewer_id, peer)``: may the viewer learn this peer (the policy filter).
Visible = Callable[[str, m.Peer], bool]
#: ``audience(viewer_id)``: viewers with equal keys see the same peers.
Audience = Callable[[str], Hashable]


def entry_json(peer: m.Peer) -> bytes:
    """``peer`` exactly as ``m.encode`` writes it inside a PEERS body."""
    return _dumps(_plain(peer))


def entry_size(peer: m.Peer) -> int:
    """Bytes ``peer`` takes inside an encoded PEERS body."""
    return len(entry_json(peer))


_FIELDS: dict[type, tuple[str, ...]] = {}


def _plain(value: object) -> object:
    """JSON-ready form of a wire value: what ``m.encode`` serialises (tuples as lists,
    dataclasses as objects in field order), with the field names looked up once."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    names = _FIELDS.get(type(value))
    if names is None:
        if not dataclasses.is_dataclass(value):
            return value
        names = tuple(f.name for f in dataclasses.fields(value))
        _FIELDS[type(value)] = names
    return {name: _plain(getattr(value, name)) for name in names}


def _id_size(node_id: str) -> int:
    return len(_dumps(node_id))


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


#: Stands for the peers list while the rest of a PEERS body is serialised.
_HOLE = "\x00peers\x00"
_HOLE_JSON = _dumps(_HOLE)


@dataclass(frozen=True, slots=True)
class Delta:
    """An update before filtering and chunking: a full map (``reset``) or a delta."""

    version: int
    base: int
    reset: bool
    peers: tuple[m.Peer, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Entry:
    peer: m.Peer
    json: bytes  # entry_json(peer), serialised once when the entry changes


class PeerBook:
    """The coordinator's peer map: entries, a global version, deltas, shared encodings.

    Pure: no clock, no I/O. The server owns one book per network and calls
    :meth:`upsert`/:meth:`remove` when a node joins, leaves, goes on/offline or
    announces; it remembers per session the version it last sent (``base``).
    """

    def __init__(
        self,
        visible: Visible | None = None,
        *,
        audience: Audience | None = None,
        max_removal_log: int = MAX_REMOVAL_LOG,
    ) -> None:
        """``visible(viewer_id, peer)``: may this viewer see this peer (None: everyone
        sees everything). ``audience(viewer_id)``: optional, with ``visible``; viewers
        with equal keys must see exactly the same peers (e.g. key = their user and
        tags under a tag-based policy), so their frames are encoded once per key.
        """
        self._visible = visible
        self._audience = audience
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._version = 0
        self._removals: collections.deque[tuple[int, str]] = collections.deque()
        self._max_removals = max_removal_log
        # Bases below the horizon cannot be answered with a delta (their removals
        # fell off the log, or a reset_all happened after them).
        self._horizon = 0
        self._cache: dict[tuple[Hashable, int, bool], bytes] = {}
        self._cache_version = 0
        #: Times encoded_updates_for really encoded (for tests and the benchmark).
        self.encodes = 0

    # -- the entries ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The map version: 0 for a new book, +1 per change."""
        return self._version

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def __iter__(self) -> Iterator[m.Peer]:
        """Every entry, oldest change first."""
        return (e.peer for e in self._entries.values())

    def get(self, node_id: str) -> m.Peer | None:
        e = self._entries.get(node_id)
        return None if e is None else e.peer

    def upsert(self, peer: m.Peer) -> bool:
        """Add or replace ``peer``'s entry; return whether that was a change.

        The book assigns ``rev`` (the caller's value is ignored); an entry equal
        to the current one apart from ``rev`` is no change and bumps nothing.

        Raises:
            ValueError: a local misuse: empty or overlong node id, a non-finite
                ``last_seen`` (it would never compare equal), or an entry larger
                than :data:`MAX_ENTRY_BYTES`.
        """
        node_id = peer.node_id
        old = self._entries.get(node_id)
        if old is not None and replace(peer, rev=old.peer.rev) == old.peer:
            return False
        if not 0 < len(node_id) <= MAX_NODE_ID:
            raise ValueError(f"node id of {len(node_id)} characters (1..{MAX_NODE_ID})")
        if not math.isfinite(peer.last_seen):
            raise ValueError(f"{node_id}: last_seen {peer.last_seen!r} is not finite")
        new = replace(peer, rev=self._version + 1)
        encoded = entry_json(new)
        size = len(encoded)
        if size > MAX_ENTRY_BYTES:
            raise ValueError(f"{node_id}: entry of {size} bytes exceeds {MAX_ENTRY_BYTES}")
        self._bump()
        self._entries[node_id] = _Entry(new, encoded)
        self._entries.move_to_end(node_id)
        return True

    def remove(self, node_id: str) -> bool:
        """Drop ``node_id``'s entry; return whether it existed (else nothing changes)."""
        if self._entries.pop(node_id, None) is None:
            return False
        self._bump()
        self._removals.append((self._version, node_id))
        if len(self._removals) > self._max_removals:
            dropped_at, _ = self._removals.popleft()
            self._horizon = max(self._horizon, dropped_at)
        return True

    def reset_all(self) -> None:
        """Make every viewer's next update a full map (call after a policy change)."""
        self._bump()
        self._horizon = self._version
        self._removals.clear()

    def _bump(self) -> None:
        self._version += 1

    # -- updates -------------------------------------------------------------------------
    def needs_full(self, base: int) -> bool:
        """Whether a viewer at ``base`` must get a full map rather than a delta."""
        return base <= 0 or base < self._horizon or base > self._version

    def delta(self, base: int) -> Delta:
        """The unfiltered update from ``base`` to :attr:`version`, in O(changed).

        A full map when :meth:`needs_full` says so or when the delta would not
        be smaller than the map; an empty delta when ``base`` is current.
        """
        version = self._version
        if self.needs_full(base):
            return self._full()
        if base == version:
            return Delta(version, base, False, (), ())
        limit = len(self._entries)
        changed: list[m.Peer] = []
        for e in reversed(self._entries.values()):
            if e.peer.rev <= base:
                break
            changed.append(e.peer)
        removed: list[str] = []
        seen: set[str] = set()
        for at, node_id in reversed(self._removals):
            if at <= base:
                break
            if node_id not in self._entries and node_id not in seen:
                seen.add(node_id)
                removed.append(node_id)
            if len(changed) + len(removed) >= limit:
                break
        if len(changed) + len(removed) >= limit:
            return self._full()
        changed.reverse()
        removed.reverse()
        return Delta(version, base, False, tuple(changed), tuple(removed))

    def _full(self) -> Delta:
        return Delta(self._version, 0, True, tuple(e.peer for e in self._entries.values()), ())

    def updates_for(self, viewer_id: str, base: int) -> list[m.Peers]:
        """The PEERS frames that bring ``viewer_id`` from ``base`` to :attr:`version`.

        Empty when the viewer is current. With a visibility filter, entries the
        viewer may not see are left out of a full map and sent as removals in a
        delta.
        """
        d = self.delta(base)
        if not d.reset and not d.peers and not d.removed:
            return []
        visible = self._visible
        removed = list(d.removed)
        if visible is None:
            peers = list(d.peers)
        else:
            peers = []
            for p in d.peers:
                if visible(viewer_id, p):
                    peers.append(p)
                elif not d.reset:
                    removed.append(p.node_id)
        return self._chunk(d, peers, removed)

    def _chunk(self, d: Delta, peers: list[m.Peer], removed: list[str]) -> list[m.Peers]:
        frames: list[m.Peers] = []
        cur_peers: list[m.Peer] = []
        cur_removed: list[str] = []
        used = FRAME_ENVELOPE

        def flush() -> None:
            nonlocal cur_peers, cur_removed, used
            frames.append(
                m.Peers(
                    version=d.version,
                    base=d.base,
                    reset=d.reset,
                    peers=tuple(cur_peers),
                    removed=tuple(cur_removed),
                    more=True,
                )
            )
            cur_peers, cur_removed, used = [], [], FRAME_ENVELOPE

        entries = self._entries
        for p in peers:
            size = len(entries[p.node_id].json) + 1  # +1: the comma
            if len(cur_peers) >= PEERS_PER_FRAME or (cur_peers and used + size > FRAME_BUDGET):
                flush()
            cur_peers.append(p)
            used += size
        for node_id in removed:
            size = _id_size(node_id) + 1
            if len(cur_removed) >= REMOVED_PER_FRAME or (
                (cur_peers or cur_removed) and used + size > FRAME_BUDGET
            ):
                flush()
            cur_removed.append(node_id)
            used += size
        flush()
        frames[-1] = replace(frames[-1], more=False)
        return frames

    def encoded_updates_for(self, viewer_id: str, base: int, *, deflate: bool = False) -> bytes:
        """:meth:`updates_for` as the bytes to write (``m.encode`` of each frame).

        Without a filter the answer depends only on (base, version), so it is
        cached: pushing one change to 10,000 sessions at the same base encodes
        once. With a filter it is cached per (audience key, base) when an
        ``audience`` was given, else encoded for every viewer. ``deflate``: for a
        viewer with cap ``zpeers``, frames go out as PEERS_Z where that is smaller
        (``m.peers_frame``), cached apart from the plain encoding.
        """
        if self._visible is not None and self._audience is None:
            self.encodes += 1
            frames = self.updates_for(viewer_id, base)
            return b"".join(self._encode(f, deflate=deflate) for f in frames)
        if self._cache_version != self._version:
            self._cache.clear()
            self._cache_version = self._version
        group = None if self._audience is None else self._audience(viewer_id)
        key = (group, 0 if self.needs_full(base) else base, deflate)
        data = self._cache.get(key)
        if data is None:
            self.encodes += 1
            frames = self.updates_for(viewer_id, key[1])
            data = b"".join(self._encode(f, deflate=deflate) for f in frames)
            if len(self._cache) >= MAX_CACHED_ENCODINGS:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = data
        return data

    def _encode(self, frame: m.Peers, *, deflate: bool = False) -> bytes:
        """``m.encode(frame)``, byte for byte, from the entries' stored JSON.

        Why: serialising entries dominates a full map (10,000 entries: ~0.2 s
        through ``m.encode``, ~5 ms joining stored JSON), and a policy change
        sends a full map to every audience. Entries not stored as-is (none,
        normally) are serialised on the spot.
        """
        entries = self._entries
        parts = []
        for p in frame.peers:
            e = entries.get(p.node_id)
            parts.append(e.json if e is not None and e.peer is p else entry_json(p))
        obj = _plain(replace(frame, peers=()))
        assert isinstance(obj, dict)
        obj["peers"] = _HOLE
        # the hole is the first string in the body: version, base and reset come first
        head, _, tail = _dumps(obj).partition(_HOLE_JSON)
        body = b"".join((head, b"[", b",".join(parts), b"]", tail))
        return m.peers_frame(body) if deflate else encode_frame(m.MsgType.PEERS, body)


# -- the node side ----------------------------------------------------------------------------
class Status(enum.Enum):
    """What :meth:`PeerView.receive` did with a frame, and what the caller does next."""

    #: Part of a multi-frame update was buffered; nothing to do yet.
    PENDING = "pending"
    #: An update was applied; :attr:`PeerView.peers` is the new map.
    APPLIED = "applied"
    #: The map cannot be brought up to date from this update: send NETMAP_REQ
    #: (once: later deltas are IGNORED until the full map arrives).
    NEED_FULL = "need-full"
    #: A delta while a full map is awaited, or the rest of a discarded update.
    IGNORED = "ignored"
    #: The server exceeded a limit (too many peers or frames): a protocol
    #: error; the caller closes the connection. The previous map is kept.
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one frame: status, a reason for logs, the view's version after it."""

    status: Status
    reason: str
    version: int
    #: Node ids whose entry was added, changed or removed (APPLIED only).
    changed: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Pending:
    version: int
    base: int
    reset: bool
    peers: list[m.Peer]
    removed: list[str]
    frames: int


class PeerView:
    """A node's copy of its peer map, fed PEERS frames in order.

    Pure: no I/O. A new view has no map and waits for a full one (a delta that
    arrives first answers NEED_FULL). Call :meth:`expect_full` when a new
    control connection starts: the server sends every new session a full map.
    """

    def __init__(
        self, *, max_peers: int = MAX_PEERS, max_pending_frames: int = MAX_PENDING_FRAMES
    ) -> None:
        self._max_peers = max_peers
        self._max_frames = max_pending_frames
        self._peers: dict[str, m.Peer] = {}
        self._by_name: dict[str, str] = {}
        self._version = 0
        self._has_map = False
        self._want_full = True  # deltas cannot apply until a full map arrives
        self._asked = False  # the caller was told NEED_FULL for the current wait
        self._pending: _Pending | None = None
        self._skip = False  # dropping the rest of a discarded multi-frame update

    @property
    def version(self) -> int:
        """Version of the applied map (0 before the first map)."""
        return self._version

    @property
    def has_map(self) -> bool:
        return self._has_map

    @property
    def awaiting_full(self) -> bool:
        return self._want_full

    @property
    def peers(self) -> Mapping[str, m.Peer]:
        """node_id -> entry, read-only."""
        return types.MappingProxyType(self._peers)

    @property
    def count(self) -> int:
        """Peers in the applied map."""
        return len(self._peers)

    def get_by_name(self, name: str) -> m.Peer | None:
        node_id = self._by_name.get(name)
        return None if node_id is None else self._peers.get(node_id)

    def expect_full(self) -> None:
        """A full map is on its way (a new session, or we sent NETMAP_REQ ourselves).

        Drops a half-received update; deltas are ignored until the full map.
        """
        self._pending = None
        self._skip = False
        self._want_full = True
        self._asked = True

    def resume(self) -> None:
        """A new session that may continue this map (cap mapdelta: HELLO named our version).

        Drops a half-received update but keeps the map: the server answers with a delta
        from our version, a full map, or nothing. Without a usable map, as :meth:`expect_full`.
        """
        if not self._has_map or self._want_full:
            self.expect_full()
            return
        self._pending = None
        self._skip = False
        self._asked = False

    def apply(self, msg: m.Peers) -> bool:
        """:meth:`receive`, reduced to "was an update applied".

        For one-shot readers (``homeport status`` asks once and reads the full
        map). A long-lived agent uses :meth:`receive`: it must act on NEED_FULL
        and REFUSED, which this hides.
        """
        return self.receive(msg).status is Status.APPLIED

    def receive(self, msg: m.Peers) -> Outcome:
        """Take one PEERS frame (in arrival order) and say what happened."""
        if self._skip:
            self._skip = msg.more
            return self._out(Status.IGNORED, "rest of a discarded update")
        p = self._pending
        if p is not None and (p.version, p.base, p.reset) != (msg.version, msg.base, msg.reset):
            return self._discard(
                msg,
                f"frame of version {msg.version} (base {msg.base}, reset {msg.reset}) inside "
                f"the update to version {p.version} (base {p.base}, reset {p.reset})",
            )
        if p is None:
            if not msg.reset:
                if self._want_full:
                    return self._need_full(msg, "delta while no usable map")
                if msg.base != self._version:
                    return self._need_full(
                        msg, f"delta from version {msg.base}, our map is at {self._version}"
                    )
                if msg.version <= msg.base:
                    return self._need_full(
                        msg, f"delta to version {msg.version} from later version {msg.base}"
                    )
            p = _Pending(msg.version, msg.base, msg.reset, [], [], 0)
            self._pending = p
        p.frames += 1
        p.peers.extend(msg.peers)
        p.removed.extend(msg.removed)
        if p.frames > self._max_frames:
            return self._refuse(msg, f"an update of more than {self._max_frames} frames")
        if len(p.peers) + len(p.removed) > self._max_peers:
            return self._refuse(msg, f"an update of more than {self._max_peers} entries")
        if msg.more:
            return self._out(Status.PENDING, f"frame {p.frames} of version {p.version}")
        self._pending = None
        return self._apply(p)

    # -- internals ---------------------------------------------------------------------------
    def _out(self, status: Status, reason: str, changed: frozenset[str] = frozenset()) -> Outcome:
        return Outcome(status, reason, self._version, changed)

    def _need_full(self, msg: m.Peers, reason: str) -> Outcome:
        self._pending = None
        self._skip = msg.more
        self._want_full = True
        if self._asked:
            return self._out(Status.IGNORED, f"{reason} (full map already requested)")
        self._asked = True
        return self._out(Status.NEED_FULL, reason)

    def _discard(self, msg: m.Peers, reason: str) -> Outcome:
        # The frame that broke the sequence may sit in the middle of another
        # update; skip through that update's last frame so its tail is not
        # mistaken for the start of a new one.
        self._asked = False  # a broken sequence is a new gap: ask again
        return self._need_full(msg, reason)

    def _refuse(self, msg: m.Peers, reason: str) -> Outcome:
        self._pending = None
        self._skip = msg.more
        self._want_full = True
        self._asked = True  # asking again would bring the same map; the caller closes
        return self._out(Status.REFUSED, f"server sent {reason}")

    def _apply(self, p: _Pending) -> Outcome:
        if p.reset:
            new = {peer.node_id: peer for peer in p.peers}
            if len(new) > self._max_peers:
                return self._refuse_applied(f"a map of {len(new)} peers")
            old = self._peers
            changed = {k for k, v in new.items() if old.get(k) != v}
            changed.update(k for k in old if k not in new)
            self._peers = new
            self._by_name = {peer.name: peer.node_id for peer in new.values()}
            self._has_map = True
            self._want_full = False
            self._asked = False
        else:
            peers = self._peers
            gone = {k for k in p.removed if k in peers}
            upserts = {peer.node_id: peer for peer in p.peers}
            size = (
                len(peers) - len(gone - upserts.keys()) + sum(1 for k in upserts if k not in peers)
            )
            if size > self._max_peers:
                return self._refuse_applied(f"a map of {size} peers")
            changed = set()
            for k in p.removed:
                old_peer = peers.pop(k, None)
                if old_peer is not None:
                    changed.add(k)
                    self._unname(old_peer)
            for k, peer in upserts.items():
                old_peer = peers.get(k)
                if old_peer == peer:
                    continue
                if old_peer is not None:
                    self._unname(old_peer)
                peers[k] = peer
                self._by_name[peer.name] = k
                changed.add(k)
        self._version = p.version
        kind = "full map" if p.reset else f"delta from {p.base}"
        return self._out(
            Status.APPLIED,
            f"{kind} to version {p.version}: {len(self._peers)} peers, {len(changed)} changed",
            frozenset(changed),
        )

    def _refuse_applied(self, reason: str) -> Outcome:
        self._want_full = True
        self._asked = True
        return self._out(Status.REFUSED, f"server sent {reason} (limit {self._max_peers})")

    def _unname(self, peer: m.Peer) -> None:
        if self._by_name.get(peer.name) == peer.node_id:
            del self._by_name[peer.name]
