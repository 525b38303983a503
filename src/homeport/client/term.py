"""Peer-supplied text made safe for a terminal (import-free: ``homeport nc`` uses it).

Pure and import-free like :mod:`homeport.wire.names`: nc prints server messages
on its error path and must not pay for imports on the warm path.
"""

#: Characters shown as escapes: C0 controls, DEL, C1 controls (ESC, CSI, OSC ... start
#: terminal sequences) and the Unicode line/paragraph separators and bidi overrides.
_UNSAFE = frozenset(
    [
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters as ``\\xNN``/``\\uNNNN`` escapes.

    Why: node names, service names and error messages come from the server (and
    through it from other nodes); a compromised server must not be able to move
    the cursor, retitle the window or forge lines in the user's terminal.
    """
    if not any(ord(c) in _UNSAFE or c == "\\" for c in text):
        return text
    out = []
    for c in text:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif o in _UNSAFE:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)
