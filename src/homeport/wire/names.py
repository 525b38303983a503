"""INTERIM (replaced by the tidy branch's rule table): node and service name rules."""

from __future__ import annotations

import re

NODE_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_NODE_NAME = 63
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")


def check_node_name(name: str) -> str | None:
    if not 1 <= len(name) <= MAX_NODE_NAME:
        return f"node names are 1 to {MAX_NODE_NAME} characters, got {len(name)}"
    if NODE_NAME_RE.fullmatch(name) is None:
        return (
            f"invalid node name {name!r}: use lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return None


def check_service_name(name: str) -> str | None:
    if SERVICE_NAME_RE.fullmatch(name) is None or name.isdigit():
        return f"invalid service name {name[:64]!r}"
    return None
