"""HuJSON (JSON with comments and trailing commas) parsed into values that remember where they were.

Why our own parser rather than a JSON5 library: the policy file's errors must
name a line, a column and a JSON path for *semantic* problems too (an unknown
field, a selector that names no group), long after parsing. The maintained
JSON5 parsers for Python (``json5``, ``pyjson5``) return plain dicts and lists
without positions, so a semantic error could only point at the whole file. The
grammar is small (JSON plus ``//`` and ``/* */`` comments and a trailing comma
before ``]`` or ``}``: exactly Tailscale's HuJSON), and this module is pure and
bounded: input size, nesting depth and string length have named limits, and
every problem is a :class:`HujsonError` with a position.

Every parsed value is a :class:`Node`: ``value`` (str, int, float, bool, None,
``list[Node]`` or ``dict[str, Node]``), its ``line``/``column`` (1-based) and,
for an object's members, the position of the key (``key_pos``), so an unknown
field is reported where its name is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

#: Largest policy text accepted (a Tailscale policy of thousands of rules fits).
MAX_TEXT = 1024 * 1024
#: Deepest nesting of arrays/objects (a policy needs 4).
MAX_DEPTH = 32


class HujsonError(ValueError):
    """A syntax error at ``line``:``column`` (1-based)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column


@dataclass(slots=True)
class Node:
    """A parsed value and where it started; object members also keep their key's position."""

    value: object
    line: int
    column: int
    key_pos: dict[str, tuple[int, int]] = field(default_factory=dict)

    def plain(self) -> object:
        """The value as plain Python (dicts, lists, scalars), positions dropped."""
        v = self.value
        if isinstance(v, list):
            return [n.plain() for n in v]
        if isinstance(v, dict):
            return {k: n.plain() for k, n in v.items()}
        return v


_WS = " \t\r\n"
_NUMBER_CHARS = "+-0123456789.eE"


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    # -- positions -----------------------------------------------------------------
    def pos(self, i: int | None = None) -> tuple[int, int]:
        i = self.i if i is None else i
        line = self.s.count("\n", 0, i) + 1
        start = self.s.rfind("\n", 0, i) + 1
        return line, i - start + 1

    def fail(self, message: str, i: int | None = None) -> HujsonError:
        line, col = self.pos(i)
        return HujsonError(message, line, col)

    # -- lexing ------------------------------------------------------------------------
    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in _WS:
                self.i += 1
            elif s.startswith("//", self.i):
                end = s.find("\n", self.i)
                self.i = n if end < 0 else end + 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                if end < 0:
                    raise self.fail("unterminated /* comment")
                self.i = end + 2
            else:
                return

    def peek(self) -> str:
        self.skip()
        return self.s[self.i] if self.i < len(self.s) else ""

    # -- grammar -----------------------------------------------------------------------
    def value(self, depth: int) -> Node:
        c = self.peek()
        line, col = self.pos()
        if not c:
            raise self.fail("unexpected end of input: a value is missing")
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH}")
        if c == "{":
            return self.obj(depth, line, col)
        if c == "[":
            return self.arr(depth, line, col)
        if c == '"':
            return Node(self.string(), line, col)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return Node(val, line, col)
        if c in _NUMBER_CHARS:
            return Node(self.number(), line, col)
        raise self.fail(f"unexpected {c!r}: expected a value")

    def string(self) -> str:
        start = self.i
        i = start + 1
        s, n = self.s, len(self.s)
        while i < n:
            c = s[i]
            if c == '"':
                break
            if c == "\\":
                i += 2
                continue
            if c == "\n":
                raise self.fail("newline inside a string (missing closing quote?)", start)
            i += 1
        else:
            raise self.fail("unterminated string", start)
        raw = s[start : i + 1]
        self.i = i + 1
        try:
            out = json.loads(raw)
        except ValueError as exc:
            raise self.fail(f"bad string: {exc.args[0].split(':')[0]}", start) from None
        assert isinstance(out, str)
        return out

    def number(self) -> int | float:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _NUMBER_CHARS:
            self.i += 1
        raw = self.s[start : self.i]
        try:
            out = json.loads(raw)
        except ValueError:
            raise self.fail(f"bad number {raw[:32]!r}", start) from None
        if not isinstance(out, int | float) or isinstance(out, bool):
            raise self.fail(f"bad number {raw[:32]!r}", start)
        return out

    def arr(self, depth: int, line: int, col: int) -> Node:
        self.i += 1
        items: list[Node] = []
        while True:
            c = self.peek()
            if c == "]":
                self.i += 1
                return Node(items, line, col)
            items.append(self.value(depth + 1))
            c = self.peek()
            if c == ",":
                self.i += 1
            elif c != "]":
                raise self.fail("expected ',' or ']' after an array element")

    def obj(self, depth: int, line: int, col: int) -> Node:
        self.i += 1
        members: dict[str, Node] = {}
        keys: dict[str, tuple[int, int]] = {}
        while True:
            c = self.peek()
            if c == "}":
                self.i += 1
                return Node(members, line, col, keys)
            if c != '"':
                raise self.fail("expected a quoted field name or '}'")
            kpos = self.pos()
            key = self.string()
            if key in members:
                raise self.fail(f"duplicate field {key!r}", self.i - len(key) - 2)
            if self.peek() != ":":
                raise self.fail(f"expected ':' after field name {key!r}")
            self.i += 1
            members[key] = self.value(depth + 1)
            keys[key] = kpos
            c = self.peek()
            if c == ",":
                self.i += 1
            elif c != "}":
                raise self.fail("expected ',' or '}' after an object member")


def parse(text: str) -> Node:
    """Parse HuJSON ``text``; the whole input must be one value.

    Raises:
        HujsonError: a syntax error, with its line and column.
    """
    if len(text) > MAX_TEXT:
        raise HujsonError(f"policy text longer than {MAX_TEXT} characters", 1, 1)
    p = _Parser(text)
    node = p.value(0)
    if p.peek():
        raise p.fail("unexpected text after the end of the document")
    return node
