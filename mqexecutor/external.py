"""Language-neutral tasks: JSON messages from programs that are not Python.

(Stub: to be completed — see issue 6.)
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["handle_json"]


def handle_json(raw: bytes, allow: Sequence[str],
                send_reply: Callable[[int, int, bytes], bool]) -> str | None:
    """Run one JSON task message; returns None when handled, else the reason it
    was refused (the worker logs and sets it aside)."""
    return "JSON tasks are not supported yet"
