"""INTERIM (replaced by the tidy branch's OpenSSH key parser)."""

from __future__ import annotations

MAX_HOST_KEYS = 16


def sanitize_host_keys(lines: tuple[str, ...]) -> tuple[str, ...]:
    keys = [
        " ".join(k.split()[:2])
        for k in lines
        if k
        and "\n" not in k
        and len(k.split()) >= 2
        and len(k) < 4096
        and k.split()[1].startswith("AAAA")
    ]
    return tuple(dict.fromkeys(keys))[:MAX_HOST_KEYS]
