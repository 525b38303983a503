"""The one shape of homeport's expected failures: a stable code and a message for people.

``code`` is what tests, the wire (ERROR / OPEN_FAILED / REJECT) and scripts match on;
``message`` is the one line a user reads. Pure: imports nothing.
"""

from __future__ import annotations


class CodedError(Exception):
    """An expected failure with a machine-stable ``code`` and a user-facing ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
