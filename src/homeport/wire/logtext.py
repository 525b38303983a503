"""One escaper for every peer-supplied string that reaches a log line.

Why: a log line is a record an operator trusts. A node that puts a newline into
an OPEN ``dst`` or a REJECT ``code`` must not be able to forge a second line
("node ... removed"), and terminal escape sequences must not reach a terminal
tailing the log. :func:`esc` keeps printable text as it is (the common case is
one ``isprintable`` call), writes everything else as a Python-style escape
(``\\n``, ``\\x1b``, ``\\u202e``) and cuts very long values. The backslash itself
is kept: a peer can write a literal ``\\n`` but never a line break, and texts that
already quote a value with ``repr`` (``'a\\nb'``) pass through unchanged.

Pure and import-free: every layer may log with it.
"""

#: Longest peer-supplied value written into one log line (longer ones are cut, with a marker).
MAX_LOG_VALUE = 256

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def esc(value: object, limit: int = MAX_LOG_VALUE) -> str:
    """``value`` as one safe line: no control, format or separator characters, at most
    ``limit`` characters of the original (then ``...(+N)``)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    if not text.isprintable():
        out = []
        for ch in text:
            if ch in _NAMED:
                out.append(_NAMED[ch])
            elif ch.isprintable():
                out.append(ch)
            elif ord(ch) < 0x100:
                out.append(f"\\x{ord(ch):02x}")
            elif ord(ch) < 0x10000:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(f"\\U{ord(ch):08x}")
        text = "".join(out)
    return f"{text}...(+{cut})" if cut > 0 else text
