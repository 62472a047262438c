"""Swoole compatibility: task packets posted by PHP code written for Swoole.

(Stub: to be completed — see issue 6.)
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["load_handler", "handle_packet"]


def load_handler(spec: str) -> Callable[..., Any]:
    """Import "module:function" and return the function."""
    import importlib
    module, _, name = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def handle_packet(raw: bytes, handler: Callable[..., Any]) -> str | None:
    """Hand one Swoole task packet to ``handler``; returns None when handled,
    else the reason it was refused."""
    return "Swoole packets are not supported yet"
