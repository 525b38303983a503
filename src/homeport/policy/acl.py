"""The ACL policy: a Tailscale-compatible subset, compiled once, evaluated by pure functions.

What users bring is Tailscale's policy file (HuJSON): ``groups``, ``tagOwners``,
``hosts``, ``acls``, ``ssh``, ``tests`` and ``sshTests``. :func:`compile_policy`
turns the text into a :class:`CompiledPolicy` (groups expanded to users, host
aliases to node names, ports to ranges) or raises :class:`PolicyError` listing
*every* problem with its line, column and JSON path (``acls[2].dst[0]``); the
file's own ``tests``/``sshTests`` run at compile time, so a policy that breaks
one is never installed.

Why default deny inside a policy: once a policy is set, a stream is allowed
only when some ``acls`` rule accepts it (and, before that, the destination must
expose the service: see :mod:`homeport.policy.decide`). Rules only *grant*, so
removing a rule never grants more and the order of rules never changes a
verdict (both are property-tested); the deciding rule reported is the first one
that grants, for explanations only.

Selectors (``src``; ``dst`` adds ``:ports``):

=======================  ======================================================
``*``                    every node
``alice@example.com``    nodes owned by that user (``user:NAME`` for names without ``@``)
``group:NAME``           nodes owned by any member of the group
``tag:NAME``             nodes carrying the tag (must be declared in ``tagOwners``)
``HOST``                 a ``hosts`` alias: names one node
``NODE``                 a node by its name
``autogroup:member``     nodes owned by a user (not tagged)
``autogroup:tagged``     tagged nodes
``autogroup:self``       ``dst`` only: nodes owned by the source's own user
=======================  ======================================================

homeport has no overlay IP addresses, so an IP or CIDR anywhere is an error
that says so rather than a rule that silently never matches.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from homeport.policy.hujson import HujsonError, Node, parse
from homeport.wire import names

#: Most problems one error lists (the rest are counted).
MAX_PROBLEMS = 50
#: The ``checkPeriod`` of an ``ssh`` ``check`` rule that names none (Tailscale's default).
DEFAULT_CHECK_PERIOD = 12 * 3600.0
#: Longest ``checkPeriod`` accepted (a week, Tailscale's limit).
MAX_CHECK_PERIOD = 7 * 86400.0
#: The local-user wildcard of ``ssh`` rules: every local account except root.
NONROOT = "autogroup:nonroot"

_TOP_FIELDS = ("groups", "tagOwners", "hosts", "acls", "ssh", "tests", "sshTests")
#: Tailscale fields a user may bring that homeport does not implement: named, not "unknown".
_TAILSCALE_ONLY = (
    "autoApprovers",
    "derpMap",
    "disableIPv4",
    "grants",
    "ipsets",
    "nodeAttrs",
    "OneCGNATRoute",
    "postures",
    "randomizeClientPort",
    "defaultSrcPosture",
    "attrs",
)
_LOCAL_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_IPISH_RE = re.compile(r"^[0-9a-fA-F:.]+(/\d+)?$")


# -- errors -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy: where (line, column, JSON path) and what."""

    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "column": self.column, "path": self.path, "error": self.message}


class PolicyError(ValueError):
    """The policy was refused; ``problems`` says every reason (first :data:`MAX_PROBLEMS`)."""

    def __init__(self, problems: Sequence[Problem], *, more: int = 0) -> None:
        self.problems = tuple(problems)
        self.more = more
        lines = [str(p) for p in self.problems]
        if more:
            lines.append(f"... and {more} more")
        super().__init__("\n".join(lines))


# -- the compiled model ---------------------------------------------------------------------


class SelKind(enum.Enum):
    ANY = "any"
    USER = "user"
    TAG = "tag"
    NODE = "node"
    MEMBER = "member"
    TAGGED = "tagged"
    SELF = "self"


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks (or is asked): a node, its owning user ("" if none) and its tags.

    ``homeport.policy.decide.Subject`` is this class.
    """

    node_id: str
    name: str
    user: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sel:
    """One resolved selector; ``text`` is what the file said (``group:dev`` for each member)."""

    kind: SelKind
    value: str = ""
    text: str = ""

    def matches(self, subj: Subject, src: Subject | None = None) -> bool:
        """Whether ``subj`` is selected (``src``: the source, for ``autogroup:self``)."""
        k = self.kind
        if k is SelKind.ANY:
            return True
        if k is SelKind.USER:
            return bool(subj.user) and subj.user == self.value and not subj.tags
        if k is SelKind.TAG:
            return self.value in subj.tags
        if k is SelKind.NODE:
            return subj.name == self.value
        if k is SelKind.MEMBER:
            return bool(subj.user) and not subj.tags
        if k is SelKind.TAGGED:
            return bool(subj.tags)
        # SELF: the destination belongs to the source's own user
        return (
            src is not None
            and bool(src.user)
            and not src.tags
            and subj.user == src.user
            and not subj.tags
        )


@dataclass(frozen=True, slots=True)
class SelSet:
    """Many selectors matched at once: O(1) per subject (plus its tags), whatever their number.

    Why: a group expands to one selector per member, and visibility asks "may
    this viewer reach that peer" for every pair of a map, so matching must not
    walk every member of every group.
    """

    any: bool = False
    member: bool = False
    tagged: bool = False
    self_: bool = False
    users: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, sels: Iterable[Sel]) -> SelSet:
        kinds: set[SelKind] = set()
        users: set[str] = set()
        tags: set[str] = set()
        nodes: set[str] = set()
        for sel in sels:
            kinds.add(sel.kind)
            {SelKind.USER: users, SelKind.TAG: tags, SelKind.NODE: nodes}.get(sel.kind, set()).add(
                sel.value
            )
        return cls(
            SelKind.ANY in kinds,
            SelKind.MEMBER in kinds,
            SelKind.TAGGED in kinds,
            SelKind.SELF in kinds,
            frozenset(users),
            frozenset(tags),
            frozenset(nodes),
        )

    @classmethod
    def union(cls, sets: Iterable[SelSet]) -> SelSet:
        """One set matching what any of ``sets`` matches."""
        out = cls()
        for x in sets:
            out = cls(
                out.any or x.any,
                out.member or x.member,
                out.tagged or x.tagged,
                out.self_ or x.self_,
                out.users | x.users,
                out.tags | x.tags,
                out.nodes | x.nodes,
            )
        return out

    def matches(self, subj: Subject, src: Subject | None = None) -> bool:
        """Same answer as ``any(sel.matches(subj, src) for sel in sels)``."""
        if self.any or subj.name in self.nodes:
            return True
        if subj.tags:
            return self.tagged or not self.tags.isdisjoint(subj.tags)
        if not subj.user:
            return False
        if self.member or subj.user in self.users:
            return True
        return (
            self.self_
            and src is not None
            and not src.tags
            and bool(src.user)
            and src.user == subj.user
        )


@dataclass(frozen=True, slots=True)
class PortRange:
    lo: int
    hi: int

    def __str__(self) -> str:
        if (self.lo, self.hi) == (1, 65535):
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


ALL_PORTS = (PortRange(1, 65535),)


def ports_text(ports: Sequence[PortRange]) -> str:
    return ",".join(str(p) for p in ports)


#: The "ports" word of an ``acls`` destination that grants exit use: ``labpc:exit``.
EXIT_PORTS = "exit"


@dataclass(frozen=True, slots=True)
class DstEntry:
    """``selector:ports`` of an ``acls`` rule, or ``selector:exit`` (``exit``, no ports).

    An exit entry grants using the selected nodes as exit nodes (``homeport
    socks --via``), never a port of theirs; a port entry never grants exit use.
    """

    sel: Sel
    ports: tuple[PortRange, ...]
    exit: bool = False

    def allows(self, port: int) -> bool:
        return any(p.lo <= port <= p.hi for p in self.ports)

    @property
    def ports_shown(self) -> str:
        return EXIT_PORTS if self.exit else ports_text(self.ports)


@dataclass(frozen=True, slots=True)
class AclRule:
    """An ``acls`` rule: ``name`` is its place in the file (``acls[3]``)."""

    name: str
    src: tuple[Sel, ...]
    dst: tuple[DstEntry, ...]
    #: ``src`` and every ``dst`` selector as sets (derived; for fast matching).
    src_set: SelSet = field(init=False, compare=False, repr=False)
    dst_set: SelSet = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_set", SelSet.of(self.src))
        object.__setattr__(self, "dst_set", SelSet.of(d.sel for d in self.dst))

    def grants(self, src: Subject, dst: Subject, port: int) -> bool:
        if not self.src_set.matches(src) or not self.dst_set.matches(dst, src):
            return False
        return any(d.allows(port) and d.sel.matches(dst, src) for d in self.dst)

    def grants_exit(self, src: Subject, dst: Subject) -> bool:
        """Whether this rule lets ``src`` use ``dst`` as an exit node (a ``:exit`` entry)."""
        if not self.src_set.matches(src):
            return False
        return any(d.exit and d.sel.matches(dst, src) for d in self.dst)


class SshAction(enum.Enum):
    ACCEPT = "accept"
    CHECK = "check"


@dataclass(frozen=True, slots=True)
class SshRule:
    name: str
    action: SshAction
    src: tuple[Sel, ...]
    dst: tuple[Sel, ...]
    users: tuple[str, ...]
    check_period: float = 0.0

    def applies(self, src: Subject, dst: Subject) -> bool:
        return any(s.matches(src) for s in self.src) and any(d.matches(dst, src) for d in self.dst)


@dataclass(frozen=True, slots=True)
class AclTest:
    name: str
    src: str
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    pos: tuple[int, int]


@dataclass(frozen=True, slots=True)
class SshTest:
    name: str
    src: str
    dst: tuple[str, ...]
    accept: tuple[str, ...]
    check: tuple[str, ...]
    deny: tuple[str, ...]
    pos: tuple[int, int]


@dataclass(frozen=True, slots=True)
class _SrcIndex:
    """Rule positions by source selector: the rules a subject's ``src`` matches, found by lookup."""

    always: tuple[int, ...]
    member: tuple[int, ...]
    tagged: tuple[int, ...]
    users: Mapping[str, tuple[int, ...]]
    tags: Mapping[str, tuple[int, ...]]
    nodes: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, rules: Sequence[AclRule]) -> _SrcIndex:
        flags: dict[str, list[int]] = {"any": [], "member": [], "tagged": []}
        by: dict[str, dict[str, list[int]]] = {"users": {}, "tags": {}, "nodes": {}}
        for i, r in enumerate(rules):
            ss = r.src_set
            for name, on in (("any", ss.any), ("member", ss.member), ("tagged", ss.tagged)):
                if on:
                    flags[name].append(i)
            for name, values in (("users", ss.users), ("tags", ss.tags), ("nodes", ss.nodes)):
                for v in values:
                    by[name].setdefault(v, []).append(i)
        frozen = {k: {v: tuple(ix) for v, ix in d.items()} for k, d in by.items()}
        return cls(
            tuple(flags["any"]),
            tuple(flags["member"]),
            tuple(flags["tagged"]),
            frozen["users"],
            frozen["tags"],
            frozen["nodes"],
        )

    def lookup(self, subj: Subject) -> list[int]:
        """Positions of the rules whose ``src`` selects ``subj``, in file order."""
        hits = set(self.always)
        hits.update(self.nodes.get(subj.name, ()))
        if subj.tags:
            hits.update(self.tagged)
            for tag in subj.tags:
                hits.update(self.tags.get(tag, ()))
        elif subj.user:
            hits.update(self.member)
            hits.update(self.users.get(subj.user, ()))
        return sorted(hits)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy ready to evaluate. ``groups`` (name → users) serves explanations only."""

    acls: tuple[AclRule, ...] = ()
    ssh: tuple[SshRule, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tag_owners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)
    text: str = ""
    #: Which ``acls`` rules a source selector leads to (derived, for O(matches) lookups).
    src_index: _SrcIndex = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_index", _SrcIndex.of(self.acls))

    @property
    def digest(self) -> str:
        """A short fingerprint of the source text (``policy get``, audit records)."""
        return "sha256:" + hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def describe_src(self, subj: Subject) -> str:
        """How a refusal names a source: its first group, else tag, else user, else name."""
        if subj.user and not subj.tags:
            for group, members in self.groups.items():
                if subj.user in members:
                    return group
            return subj.user
        if subj.tags:
            return subj.tags[0]
        return subj.name

    @staticmethod
    def describe_dst(subj: Subject) -> str:
        return subj.tags[0] if subj.tags else subj.name


# -- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AclVerdict:
    allowed: bool
    rule: str
    reason: str


def acl_check(policy: CompiledPolicy, src: Subject, dst: Subject, port: int) -> AclVerdict:
    """May ``src`` reach ``dst`` on ``port`` under ``policy``'s ``acls``? Pure."""
    for rule in reachable(policy, src):
        if rule.grants(src, dst, port):
            return AclVerdict(
                True,
                rule.name,
                f"allowed by {rule.name}: {policy.describe_src(src)} may reach "
                f"{policy.describe_dst(dst)}:{port}",
            )
    return AclVerdict(
        False,
        "default-deny",
        f"denied by policy: no rule lets {policy.describe_src(src)} reach "
        f"{policy.describe_dst(dst)}:{port}",
    )


def exit_check(policy: CompiledPolicy, src: Subject, dst: Subject) -> AclVerdict:
    """May ``src`` use ``dst`` as an exit node under ``policy``? Pure; first granting rule."""
    for rule in reachable(policy, src):
        if rule.grants_exit(src, dst):
            return AclVerdict(
                True,
                rule.name,
                f"allowed by {rule.name}: {policy.describe_src(src)} may use "
                f"{policy.describe_dst(dst)} as an exit node",
            )
    return AclVerdict(
        False,
        "default-deny",
        f"denied by policy: no rule lets {policy.describe_src(src)} use "
        f"{policy.describe_dst(dst)} as an exit node (add {policy.describe_dst(dst)}:exit "
        "to a rule's dst)",
    )


def may_see(policy: CompiledPolicy, viewer: Subject, peer: Subject) -> bool:
    """Whether ``viewer`` may reach ``peer`` on some port (peer-map visibility)."""
    return reach_set(policy, viewer).matches(peer, viewer)


def reach_set(policy: CompiledPolicy, viewer: Subject) -> SelSet:
    """Every destination ``viewer`` may reach on some port, as one selector set."""
    return SelSet.union(r.dst_set for r in reachable(policy, viewer))


def reachable(policy: CompiledPolicy, viewer: Subject) -> tuple[AclRule, ...]:
    """The rules whose ``src`` selects ``viewer``: what it may reach is their ``dst``."""
    acls = policy.acls
    return tuple(acls[i] for i in policy.src_index.lookup(viewer))


def src_rules(policy: CompiledPolicy, viewer: Subject) -> tuple[str, ...]:
    """The names of the rules whose ``src`` selects ``viewer`` (a visibility audience key)."""
    return tuple(r.name for r in reachable(policy, viewer))


def rules_for_destination(policy: CompiledPolicy, dst: Subject) -> tuple[AclRule, ...]:
    """The rules that can grant anything on ``dst``, with only their entries that may match it.

    What the server sends a node (POLICY): sources stay symbolic (users, tags,
    node names), so a node joining elsewhere changes nobody else's copy.
    ``autogroup:self`` is kept when ``dst`` is owned by a user (it depends on the source).
    """
    out: list[AclRule] = []
    for rule in policy.acls:
        entries = tuple(
            d
            for d in rule.dst
            if (d.sel.kind is SelKind.SELF and dst.user and not dst.tags) or d.sel.matches(dst)
        )
        if entries:
            out.append(AclRule(rule.name, rule.src, entries))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SshGrant:
    """The local users ``src`` may log in as on ``dst`` (``autogroup:nonroot`` kept symbolic).

    A user granted by an ``accept`` rule is not listed in ``check_users``:
    rules only grant, and the most permissive grant wins whatever the order.
    ``check_period``: the shortest period of the ``check`` rules that apply (0 if none).
    """

    accept_users: tuple[str, ...] = ()
    check_users: tuple[str, ...] = ()
    check_period: float = 0.0
    rules: tuple[str, ...] = ()


def _user_in(local_user: str, users: Iterable[str]) -> bool:
    return any(u == local_user or (u == NONROOT and local_user != "root") for u in users)


def ssh_access(policy: CompiledPolicy | None, src: Subject, dst: Subject) -> SshGrant:
    """What the ``ssh`` rules let ``src`` do on ``dst``. No policy: no SSH grants."""
    if policy is None:
        return SshGrant()
    accept: list[str] = []
    check: list[str] = []
    periods: list[float] = []
    rules: list[str] = []
    for rule in policy.ssh:
        if not rule.applies(src, dst):
            continue
        rules.append(rule.name)
        target = accept if rule.action is SshAction.ACCEPT else check
        if rule.action is SshAction.CHECK:
            periods.append(rule.check_period)
        for u in rule.users:
            if u not in target:
                target.append(u)
    check = [u for u in check if u not in accept and not (u != "root" and NONROOT in accept)]
    return SshGrant(tuple(accept), tuple(check), min(periods) if check else 0.0, tuple(rules))


class SshVerdict(enum.Enum):
    ACCEPT = "accept"
    CHECK = "check"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class SshDecision:
    """A verdict on logging in as ``local_user``: the deciding rule and a sentence."""

    verdict: SshVerdict
    code: str
    reason: str
    rule: str
    check_period: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.verdict is not SshVerdict.DENY


def check_ssh(
    policy: CompiledPolicy | None, src: Subject, dst: Subject, local_user: str
) -> SshDecision:
    """May ``src`` log in to ``dst`` as ``local_user``? ``accept`` beats ``check``; else deny."""
    if policy is None:
        return SshDecision(SshVerdict.DENY, "no-policy", "no policy: no ssh rules", "no-policy")
    checking: SshRule | None = None
    for rule in policy.ssh:
        if not rule.applies(src, dst) or not _user_in(local_user, rule.users):
            continue
        if rule.action is SshAction.ACCEPT:
            return SshDecision(
                SshVerdict.ACCEPT,
                "ok",
                f"allowed by {rule.name}: {policy.describe_src(src)} may log in to "
                f"{policy.describe_dst(dst)} as {local_user}",
                rule.name,
            )
        if checking is None or rule.check_period < checking.check_period:
            checking = rule
    if checking is not None:
        return SshDecision(
            SshVerdict.CHECK,
            "check",
            f"{checking.name}: {policy.describe_src(src)} may log in to "
            f"{policy.describe_dst(dst)} as {local_user} after a check every "
            f"{_show_period(checking.check_period)}",
            checking.name,
            checking.check_period,
        )
    return SshDecision(
        SshVerdict.DENY,
        "policy",
        f"denied by policy: no ssh rule lets {policy.describe_src(src)} log in to "
        f"{policy.describe_dst(dst)} as {local_user}",
        "default-deny",
    )


def _show_period(seconds: float) -> str:
    if seconds == 0:
        return "login"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


# -- compiling ----------------------------------------------------------------------------------


def parse_duration(text: str) -> float | None:
    """A Go-style duration (``12h``, ``1h30m``, ``90s``) or ``always`` (0) in seconds, or None."""
    if text == "always":
        return 0.0
    pos, total = 0, 0.0
    for mo in _DURATION_RE.finditer(text):
        if mo.start() != pos:
            return None
        total += float(mo.group(1)) * {"h": 3600, "m": 60, "s": 1}[mo.group(2)]
        pos = mo.end()
    return total if pos == len(text) and text else None


class _Compiler:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.groups: dict[str, tuple[str, ...]] = {}
        self.tag_owners: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, str] = {}

    def err(self, node: Node | tuple[int, int], path: str, message: str) -> None:
        line, col = (node.line, node.column) if isinstance(node, Node) else node
        self.problems.append(Problem(line, col, path, message))

    # -- shape helpers ------------------------------------------------------------------
    def obj(
        self, node: Node, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, Node] | None:
        if not isinstance(node.value, dict):
            self.err(node, path, "expected an object")
            return None
        members: dict[str, Node] = node.value
        for key in members:
            if key not in allowed:
                where = node.key_pos.get(key, (node.line, node.column))
                self.err(
                    where,
                    f"{path}.{key}" if path else key,
                    f"unknown field {key!r} (allowed: {', '.join(allowed)})",
                )
        for key in required:
            if key not in members:
                self.err(node, path, f"missing field {key!r}")
        return members

    def strings(self, node: Node, path: str, *, nonempty: bool = True) -> list[tuple[str, Node]]:
        if not isinstance(node.value, list):
            self.err(node, path, "expected a list of strings")
            return []
        out: list[tuple[str, Node]] = []
        for i, item in enumerate(node.value):
            if not isinstance(item.value, str):
                self.err(item, f"{path}[{i}]", "expected a string")
            else:
                out.append((item.value, item))
        if nonempty and not node.value:
            self.err(node, path, "must not be empty")
        return out

    def string(self, node: Node, path: str) -> str | None:
        if not isinstance(node.value, str):
            self.err(node, path, "expected a string")
            return None
        return node.value

    # -- sections -----------------------------------------------------------------------
    def top(self, root: Node) -> dict[str, Node]:
        if not isinstance(root.value, dict):
            self.err(root, "", "the policy must be a JSON object")
            return {}
        members: dict[str, Node] = root.value
        for key in members:
            if key in _TOP_FIELDS:
                continue
            where = root.key_pos.get(key, (root.line, root.column))
            if key in _TAILSCALE_ONLY:
                self.err(where, key, f"{key!r} is a Tailscale field homeport does not support")
            else:
                self.err(where, key, f"unknown field {key!r} (allowed: {', '.join(_TOP_FIELDS)})")
        return members

    def do_groups(self, node: Node) -> None:
        members = self.obj(node, "groups", [k for k in _dict_keys(node) if k.startswith("group:")])
        for key in _dict_keys(node):
            if not key.startswith("group:"):
                continue  # reported above
            if key == "group:" or not _name_ok(key[6:]):
                self.err(node.key_pos[key], f"groups.{key}", f"bad group name {key!r}")
        for key, value in (members or {}).items():
            if not key.startswith("group:"):
                continue
            users: list[str] = []
            for i, (text, item) in enumerate(self.strings(value, key, nonempty=False)):
                user = _user_of(text)
                if user is None:
                    self.err(
                        item,
                        f"groups.{key}[{i}]",
                        f"{text!r} is not a user (a group lists users, e.g. alice@example.com)",
                    )
                else:
                    users.append(user)
            self.groups[key] = tuple(users)

    def do_tag_owners(self, node: Node) -> None:
        keys = _dict_keys(node)
        members = self.obj(node, "tagOwners", [k for k in keys if k.startswith("tag:")])
        for key, value in (members or {}).items():
            if key == "tag:" or not _name_ok(key[4:]):
                self.err(node.key_pos[key], f"tagOwners.{key}", f"bad tag name {key!r}")
            owners: list[str] = []
            for i, (text, item) in enumerate(self.strings(value, key, nonempty=False)):
                path = f"tagOwners.{key}[{i}]"
                if text in ("autogroup:admin", "autogroup:member") or text.startswith("tag:"):
                    owners.append(text)
                elif text.startswith("group:"):
                    if text not in self.groups:
                        self.err(item, path, f"{text!r} is not defined in groups")
                    owners.append(text)
                elif _user_of(text) is not None:
                    owners.append(text)
                else:
                    self.err(item, path, f"{text!r} cannot own a tag (a user, group or tag can)")
            self.tag_owners[key] = tuple(owners)

    def do_hosts(self, node: Node) -> None:
        members = self.obj(node, "hosts", _dict_keys(node))
        for key, value in (members or {}).items():
            path = f"hosts.{key}"
            if names.node_name_problem(key) is not None:
                self.err(node.key_pos[key], path, f"bad host alias {key!r}: use a node-like name")
            text = self.string(value, path)
            if text is None:
                continue
            if _looks_like_ip(text):
                self.err(
                    value,
                    path,
                    f"{text!r} is an IP address: homeport has no overlay IP addresses; "
                    'a host alias names a node (e.g. "labpc")',
                )
                continue
            problem = names.node_name_problem(text)
            if problem is not None:
                self.err(value, path, f"a host alias names a node: {problem}")
                continue
            self.hosts[key] = text

    def selector(self, text: str, item: Node, path: str, *, dst: bool) -> list[Sel]:
        if text == "*":
            return [Sel(SelKind.ANY, "", text)]
        if text.startswith("autogroup:"):
            if text == "autogroup:member":
                return [Sel(SelKind.MEMBER, "", text)]
            if text == "autogroup:tagged":
                return [Sel(SelKind.TAGGED, "", text)]
            if text == "autogroup:self":
                if dst:
                    return [Sel(SelKind.SELF, "", text)]
                self.err(item, path, "autogroup:self is allowed only in dst")
                return []
            self.err(
                item,
                path,
                f"{text!r} is not supported (use autogroup:member, autogroup:tagged"
                + (", autogroup:self)" if dst else ")"),
            )
            return []
        if text.startswith("group:"):
            if text not in self.groups:
                self.err(item, path, f"{text!r} is not defined in groups")
                return []
            return [Sel(SelKind.USER, u, text) for u in self.groups[text]]
        if text.startswith("tag:"):
            if text not in self.tag_owners:
                self.err(item, path, f"{text!r} is not defined in tagOwners")
                return []
            return [Sel(SelKind.TAG, text, text)]
        user = _user_of(text)
        if user is not None:
            return [Sel(SelKind.USER, user, text)]
        if text in self.hosts:
            return [Sel(SelKind.NODE, self.hosts[text], text)]
        if _looks_like_ip(text):
            self.err(
                item,
                path,
                f"{text!r} is an IP address: homeport has no overlay IP addresses; "
                "name a node, a host alias, a tag, a user or a group",
            )
            return []
        problem = names.node_name_problem(text)
        if problem is None:
            return [Sel(SelKind.NODE, text, text)]
        self.err(
            item,
            path,
            f"{text!r} is not a selector (*, a user, group:x, tag:x, a host alias, "
            "a node name or autogroup:…)",
        )
        return []

    def ports(self, text: str, item: Node, path: str) -> tuple[PortRange, ...] | None:
        if text == "*":
            return ALL_PORTS
        out: list[PortRange] = []
        for part in text.split(","):
            lo_s, dash, hi_s = part.partition("-")
            if not (lo_s.isdigit() and (not dash or hi_s.isdigit())) or len(part) > 11:
                self.err(item, path, f"bad ports {text!r}: use *, 22, 80,443 or 8000-8999")
                return None
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
            if not 1 <= lo <= hi <= 65535:
                self.err(item, path, f"bad port range {part!r} (1-65535, low to high)")
                return None
            out.append(PortRange(lo, hi))
        return tuple(out)

    def do_acls(self, node: Node) -> list[AclRule]:
        rules: list[AclRule] = []
        if not isinstance(node.value, list):
            self.err(node, "acls", "expected a list of rules")
            return rules
        for i, item in enumerate(node.value):
            path = f"acls[{i}]"
            members = self.obj(
                item, path, ("action", "src", "dst", "proto"), ("action", "src", "dst")
            )
            if members is None:
                continue
            if "action" in members:
                action = self.string(members["action"], f"{path}.action")
                if action is not None and action != "accept":
                    self.err(members["action"], f"{path}.action", 'only "accept" (rules grant)')
            if "proto" in members:
                proto = self.string(members["proto"], f"{path}.proto")
                if proto is not None and proto not in ("tcp", "6"):
                    self.err(members["proto"], f"{path}.proto", "homeport carries only tcp")
            src: list[Sel] = []
            if "src" in members:
                for j, (text, it) in enumerate(self.strings(members["src"], f"{path}.src")):
                    src += self.selector(text, it, f"{path}.src[{j}]", dst=False)
            dst: list[DstEntry] = []
            if "dst" in members:
                for j, (text, it) in enumerate(self.strings(members["dst"], f"{path}.dst")):
                    jp = f"{path}.dst[{j}]"
                    host, colon, port_text = text.rpartition(":")
                    if not colon or not host:
                        self.err(it, jp, f"{text!r}: expected selector:ports, e.g. tag:db:5432")
                        continue
                    if port_text == EXIT_PORTS:  # use these nodes as exit nodes
                        sels = self.selector(host, it, jp, dst=True)
                        dst += [DstEntry(s, (), exit=True) for s in sels]
                        continue
                    ports = self.ports(port_text, it, jp)
                    sels = self.selector(host, it, jp, dst=True)
                    if ports is not None:
                        dst += [DstEntry(s, ports) for s in sels]
            rules.append(AclRule(path, tuple(src), tuple(dst)))
        return rules

    def do_ssh(self, node: Node) -> list[SshRule]:
        rules: list[SshRule] = []
        if not isinstance(node.value, list):
            self.err(node, "ssh", "expected a list of rules")
            return rules
        for i, item in enumerate(node.value):
            path = f"ssh[{i}]"
            members = self.obj(
                item,
                path,
                ("action", "src", "dst", "users", "checkPeriod"),
                ("action", "src", "dst", "users"),
            )
            if members is None:
                continue
            action = SshAction.ACCEPT
            if "action" in members:
                text = self.string(members["action"], f"{path}.action")
                if text in ("accept", "check"):
                    action = SshAction(text)
                elif text is not None:
                    self.err(members["action"], f"{path}.action", 'use "accept" or "check"')
            period = DEFAULT_CHECK_PERIOD if action is SshAction.CHECK else 0.0
            if "checkPeriod" in members:
                cp = members["checkPeriod"]
                text = self.string(cp, f"{path}.checkPeriod")
                value = None if text is None else parse_duration(text)
                if text is not None and (value is None or value > MAX_CHECK_PERIOD):
                    self.err(cp, f"{path}.checkPeriod", f"bad duration {text!r} (e.g. 12h, always)")
                elif action is not SshAction.CHECK:
                    self.err(cp, f"{path}.checkPeriod", 'checkPeriod needs action "check"')
                elif value is not None:
                    period = value
            src: list[Sel] = []
            if "src" in members:
                for j, (text, it) in enumerate(self.strings(members["src"], f"{path}.src")):
                    src += self.selector(text, it, f"{path}.src[{j}]", dst=False)
            dst: list[Sel] = []
            if "dst" in members:
                for j, (text, it) in enumerate(self.strings(members["dst"], f"{path}.dst")):
                    dst += self.selector(text, it, f"{path}.dst[{j}]", dst=True)
            users: list[str] = []
            if "users" in members:
                for j, (text, it) in enumerate(self.strings(members["users"], f"{path}.users")):
                    if text == NONROOT or _LOCAL_USER_RE.match(text):
                        users.append(text)
                    else:
                        self.err(
                            it,
                            f"{path}.users[{j}]",
                            f"{text!r} is not a local account name (or autogroup:nonroot)",
                        )
            rules.append(SshRule(path, action, tuple(src), tuple(dst), tuple(users), period))
        return rules

    def do_tests(self, node: Node) -> list[AclTest]:
        out: list[AclTest] = []
        if not isinstance(node.value, list):
            self.err(node, "tests", "expected a list of tests")
            return out
        for i, item in enumerate(node.value):
            path = f"tests[{i}]"
            members = self.obj(item, path, ("src", "proto", "accept", "deny"), ("src",))
            if members is None or "src" not in members:
                continue
            src = self.string(members["src"], f"{path}.src")
            lists = {
                k: tuple(t for t, _ in self.strings(members[k], f"{path}.{k}", nonempty=False))
                for k in ("accept", "deny")
                if k in members
            }
            if src is not None:
                out.append(
                    AclTest(
                        path,
                        src,
                        lists.get("accept", ()),
                        lists.get("deny", ()),
                        (item.line, item.column),
                    )
                )
        return out

    def do_ssh_tests(self, node: Node) -> list[SshTest]:
        out: list[SshTest] = []
        if not isinstance(node.value, list):
            self.err(node, "sshTests", "expected a list of tests")
            return out
        for i, item in enumerate(node.value):
            path = f"sshTests[{i}]"
            members = self.obj(
                item, path, ("src", "dst", "accept", "check", "deny"), ("src", "dst")
            )
            if members is None or "src" not in members or "dst" not in members:
                continue
            src = self.string(members["src"], f"{path}.src")
            dst = tuple(t for t, _ in self.strings(members["dst"], f"{path}.dst"))
            lists = {
                k: tuple(t for t, _ in self.strings(members[k], f"{path}.{k}", nonempty=False))
                for k in ("accept", "check", "deny")
                if k in members
            }
            if src is not None:
                out.append(
                    SshTest(
                        path,
                        src,
                        dst,
                        lists.get("accept", ()),
                        lists.get("check", ()),
                        lists.get("deny", ()),
                        (item.line, item.column),
                    )
                )
        return out

    # -- tests ----------------------------------------------------------------------------
    def subject(self, text: str) -> Subject | str:
        """A hypothetical node standing for a test's ``src``/``dst`` host, or why not."""
        if text.startswith("tag:"):
            if text not in self.tag_owners:
                return f"{text!r} is not defined in tagOwners"
            return Subject("test", f"test-{text[4:]}", "", (text,))
        user = _user_of(text)
        if user is not None:
            return Subject("test", "test-node", user, ())
        if text in self.hosts:
            return Subject("test", self.hosts[text])
        if names.node_name_problem(text) is None:
            return Subject("test", text)
        return f"{text!r} is not a user, tag, host alias or node name"

    def run_tests(self, policy: CompiledPolicy, tests: list[AclTest]) -> None:
        for t in tests:
            src = self.subject(t.src)
            if isinstance(src, str):
                self.err(t.pos, f"{t.name}.src", src)
                continue
            for want, targets in ((True, t.accept), (False, t.deny)):
                for j, target in enumerate(targets):
                    key = "accept" if want else "deny"
                    host, _, port_text = target.rpartition(":")
                    dst = self.subject(host) if host else "expected host:port, e.g. tag:db:5432"
                    if not isinstance(dst, str) and not (
                        (port_text.isdigit() and len(port_text) < 6) or port_text == EXIT_PORTS
                    ):
                        dst = "expected host:port with one port number (or host:exit)"
                    if isinstance(dst, str):
                        self.err(t.pos, f"{t.name}.{key}[{j}]", f"{target!r}: {dst}")
                        continue
                    got = (
                        exit_check(policy, src, dst)
                        if port_text == EXIT_PORTS
                        else acl_check(policy, src, dst, int(port_text))
                    )
                    if got.allowed != want:
                        self.err(
                            t.pos,
                            f"{t.name}.{key}[{j}]",
                            f"test failed: {t.src} -> {target}: expected "
                            f"{'accept' if want else 'deny'}, got "
                            f"{'accept (' + got.rule + ')' if got.allowed else 'deny'}",
                        )

    def run_ssh_tests(self, policy: CompiledPolicy, tests: list[SshTest]) -> None:
        for t in tests:
            src = self.subject(t.src)
            if isinstance(src, str):
                self.err(t.pos, f"{t.name}.src", src)
                continue
            for k, host in enumerate(t.dst):
                dst = self.subject(host)
                if isinstance(dst, str):
                    self.err(t.pos, f"{t.name}.dst[{k}]", dst)
                    continue
                for want, users in (
                    (SshVerdict.ACCEPT, t.accept),
                    (SshVerdict.CHECK, t.check),
                    (SshVerdict.DENY, t.deny),
                ):
                    for j, user in enumerate(users):
                        got = check_ssh(policy, src, dst, user)
                        if got.verdict is not want:
                            self.err(
                                t.pos,
                                f"{t.name}.{want.value}[{j}]",
                                f"test failed: {t.src} -> {host} as {user}: expected "
                                f"{want.value}, got {got.verdict.value} ({got.rule})",
                            )


def _dict_keys(node: Node) -> list[str]:
    return list(node.value.keys()) if isinstance(node.value, dict) else []


def _looks_like_ip(text: str) -> bool:
    return (
        _IPISH_RE.match(text) is not None
        and any(ch.isdigit() for ch in text)
        and ("." in text or "/" in text or text.count(":") > 1)
    )


def _name_ok(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def _user_of(text: str) -> str | None:
    """The user a selector names (``alice@example.com``, ``alice@``, ``user:alice``), or None."""
    if text.startswith("user:"):
        rest = text[5:]
        return rest if rest and _user_ok(rest) else None
    if "@" in text and ":" not in text:
        user = text[:-1] if text.endswith("@") else text
        return user if _user_ok(user) else None
    return None


def _user_ok(user: str) -> bool:
    return 0 < len(user) <= 253 and not any(c.isspace() or c in ",:*\"'" for c in user)


def compile_policy(text: str) -> CompiledPolicy:
    """Parse, check and compile a policy; run its ``tests`` and ``sshTests``.

    Raises:
        PolicyError: every problem (syntax, unknown field, bad selector, failing
            test), each with line, column and JSON path.
    """
    try:
        root = parse(text)
    except HujsonError as exc:
        raise PolicyError([Problem(exc.line, exc.column, "", exc.message)]) from None
    c = _Compiler()
    top = c.top(root)
    if "groups" in top:
        c.do_groups(top["groups"])
    if "tagOwners" in top:
        c.do_tag_owners(top["tagOwners"])
    if "hosts" in top:
        c.do_hosts(top["hosts"])
    acls = c.do_acls(top["acls"]) if "acls" in top else []
    ssh = c.do_ssh(top["ssh"]) if "ssh" in top else []
    tests = c.do_tests(top["tests"]) if "tests" in top else []
    ssh_tests = c.do_ssh_tests(top["sshTests"]) if "sshTests" in top else []
    policy = CompiledPolicy(
        acls=tuple(acls),
        ssh=tuple(ssh),
        groups=dict(c.groups),
        tag_owners=dict(c.tag_owners),
        hosts=dict(c.hosts),
        text=text,
    )
    if not c.problems:  # tests only mean something for a policy that compiled
        c.run_tests(policy, tests)
        c.run_ssh_tests(policy, ssh_tests)
    if c.problems:
        ordered = sorted(c.problems, key=lambda p: (p.line, p.column))
        raise PolicyError(ordered[:MAX_PROBLEMS], more=max(0, len(ordered) - MAX_PROBLEMS))
    return policy
