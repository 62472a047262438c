"""Language-neutral tasks: JSON messages from programs that are not Python.

A program written in PHP, C, Go, shell... cannot build mqexecutor's own task
message (its body is a Python pickle). It can post a *JSON task* instead: one
UTF-8 JSON object, sent as the whole message text, whose first byte is ``{``.
A task worker that receives such a message runs the named function, if the
pool allows it, and sends the outcome as JSON to a queue the sender names.
This is what Swoole's external producers did with ``msg_send`` (seed 000:
"other programs can post data to this queue"), made safe: a pool runs nothing
from a JSON task unless it was started with ``allow=`` patterns
(``MQExecutor(key, allow=["math:*"])`` or ``mqexecutor serve KEY --allow 'math:*'``).

Task (version 1)::

    {"v": 1,                        optional; any other value is refused
     "id": <any JSON>,              optional; copied into the reply
     "fn": "module:qualname",       required, e.g. "math:hypot", "os.path:join"
     "args": [3, 4],                optional list (default [])
     "kwargs": {},                  optional object (default {})
     "reply": {"key": 1234,         optional: SysV key of the queue to answer on
               "mtype": 1}}         optional message type of the reply (default 1)

Reply, sent with ``msgsnd`` to ``reply.key`` with type ``reply.mtype``::

    {"v": 1, "id": ..., "ok": true, "result": <the return value as JSON>,
     "worker": 0, "pid": 4242}
    {"v": 1, "id": ..., "ok": false, "worker": 0, "pid": 4242,
     "error": {"code": "not_allowed", "type": "PermissionError",
               "message": "...", "traceback": "..." (code "raised" only)}}

Error codes: ``bad_message`` (not JSON, not an object, a field of the wrong
type, an unknown version), ``not_allowed`` (no ``allow`` pattern matches
``fn``), ``not_found`` (the module does not import or has no such attribute,
or it is not callable), ``raised`` (the function raised; ``type`` is the
exception's class name), ``bad_result`` (the return value is not JSON: bytes,
a set, NaN or infinity...), ``too_large`` (the reply would exceed
``kernel.msgmax``).

Other rules:

* Unknown fields are ignored (room for later versions); trailing NUL bytes,
  as a C sender may include, are stripped before parsing; ``"kwargs": []`` is
  taken as ``{}`` (PHP's ``json_encode([])`` gives ``[]``).
* ``fn`` must be ``module:qualname`` made of Python identifiers. It is matched
  against the allow patterns with :func:`fnmatch.fnmatchcase` *before* the
  module is imported, so a refused name never runs import-time code. A part of
  the qualname that starts with ``_`` (``os:_exit``, ``x:__class__``) is
  accepted only when an allow pattern names it exactly, without wildcards:
  ``"math:*"`` does not reach ``math:__loader__.load_module``.
* The reply is sent without blocking for good (the worker's ``send_raw``
  gives up on a queue that stays full); results never go back through the
  task queue, so a pool cannot deadlock on its own replies (FIELD-NOTES:
  "Deadlock seen here"). A reply that cannot be delivered is dropped with a
  line on the worker's stderr. Never name the pool's own task queue as the
  reply queue: a worker would take the reply as a (malformed) task.
* The JSON must be strict: NaN and Infinity are refused both ways.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import sysv_ipc

from .context import report as _log
from .context import worker_id
from .limits import msgmax

__all__ = ["VERSION", "handle_json", "parse_task", "is_allowed", "resolve",
           "JSONTask", "TaskRefused"]

#: Version of the JSON task and reply schema described in the module docstring.
VERSION = 1

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FN_RE = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)")
_WILDCARDS = set("*?[")
#: Longest accepted ``fn`` string, characters.
MAX_FN_LENGTH = 512
#: Room kept for the JSON around an error message and a traceback, bytes.
_MESSAGE_MAX = 2000
_LONG_MAX = (1 << 63) - 1


class TaskRefused(Exception):
    """A JSON task that will not be run.

    Attributes:
        code (str): ``bad_message``, ``not_allowed`` or ``not_found``.
        type (str): the exception class name put in the error reply.
    """

    def __init__(self, code: str, message: str, type_name: str = "ValueError"):
        super().__init__(message)
        self.code = code
        self.type = type_name


class JSONTask:
    """A parsed JSON task (see the module docstring for the schema).

    Attributes:
        id: the ``id`` field as decoded from JSON (None when absent).
        fn (str): ``"module:qualname"``.
        args (list), kwargs (dict): the arguments, as decoded from JSON.
        reply_key (int | None): signed 32-bit SysV key of the reply queue.
        reply_mtype (int): message type of the reply (>= 1).
    """

    __slots__ = ("id", "fn", "args", "kwargs", "reply_key", "reply_mtype")

    def __init__(self, id: Any = None, fn: str = "", args: list | None = None,
                 kwargs: dict | None = None, reply_key: int | None = None,
                 reply_mtype: int = 1):
        self.id = id
        self.fn = fn
        self.args = args if args is not None else []
        self.kwargs = kwargs if kwargs is not None else {}
        self.reply_key = reply_key
        self.reply_mtype = reply_mtype


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_reply(obj: Any) -> tuple[int | None, int, str | None]:
    """(key, mtype, problem) of a ``reply`` field; key None when absent/unusable."""
    if obj is None:
        return None, 1, None
    if not isinstance(obj, dict):
        return None, 1, "'reply' must be an object {\"key\": int, \"mtype\": int}"
    key = obj.get("key")
    mtype = obj.get("mtype", 1)
    if not _is_int(key) or key == 0 or not -(1 << 31) <= key <= 0xFFFFFFFF:
        return None, 1, ("'reply.key' must be a non-zero 32-bit SysV key (0 is "
                         "IPC_PRIVATE: other processes cannot open it by key)")
    if key > 0x7FFFFFFF:
        key -= 1 << 32  # unsigned, as ipcs prints it
    if not _is_int(mtype) or not 1 <= mtype <= _LONG_MAX:
        return key, 1, "'reply.mtype' must be an integer >= 1"
    return key, mtype, None


def parse_task(raw: bytes | bytearray | memoryview) -> JSONTask:
    """Decode and check one JSON task message.

    Args:
        raw: the message text as received (UTF-8 JSON; trailing NULs ignored).

    Returns:
        JSONTask. Its reply fields are set whenever the ``reply`` object itself
        is valid, even if another field is not (so the caller can still answer).

    Raises:
        TaskRefused (code ``bad_message``): not UTF-8, not JSON, not an object,
            nesting too deep, an unknown ``v``, or a field of the wrong type. The
            exception carries ``.task`` (a JSONTask with whatever ``id`` and
            ``reply`` could be read, or None when the JSON did not parse).
    """
    data = bytes(raw).rstrip(b"\x00")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints longer than the
        # interpreter's int_max_str_digits.
        err = TaskRefused("bad_message", f"the message is not UTF-8 JSON: {exc}"[:500])
        err.task = None  # type: ignore[attr-defined]
        raise err from None
    if not isinstance(obj, dict):
        err = TaskRefused("bad_message", "a JSON task must be a JSON object")
        err.task = None  # type: ignore[attr-defined]
        raise err
    key, mtype, reply_problem = _parse_reply(obj.get("reply"))
    task = JSONTask(id=obj.get("id"), reply_key=key, reply_mtype=mtype)

    def refuse(message: str) -> TaskRefused:
        err = TaskRefused("bad_message", message)
        err.task = task  # type: ignore[attr-defined]
        return err

    version = obj.get("v", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise refuse(f"unsupported JSON task version {version!r} (this worker speaks "
                     f"version {VERSION})")
    if reply_problem:
        raise refuse(reply_problem)
    fn = obj.get("fn")
    if not isinstance(fn, str):
        if "ok" in obj and "fn" not in obj:
            raise refuse("this is a JSON reply, not a task (was the pool's task queue "
                         "named as a reply queue?)")
        raise refuse("'fn' must be a string \"module:qualname\"")
    if len(fn) > MAX_FN_LENGTH or not _FN_RE.fullmatch(fn):
        raise refuse(f"'fn' must be \"module:qualname\" made of Python identifiers, "
                     f"not {fn[:100]!r}")
    args = obj.get("args", [])
    kwargs = obj.get("kwargs", {})
    if kwargs == []:
        kwargs = {}  # PHP's json_encode([]) gives [] for an empty array
    if not isinstance(args, list):
        raise refuse("'args' must be a JSON array")
    if not isinstance(kwargs, dict):
        raise refuse("'kwargs' must be a JSON object")
    task.fn, task.args, task.kwargs = fn, args, kwargs
    return task


def is_allowed(fn: str, allow: Sequence[str]) -> bool:
    """Whether ``fn`` (``"module:qualname"``) matches one of the ``allow`` patterns.

    Patterns are :func:`fnmatch.fnmatchcase` patterns (case-sensitive; ``*``
    also matches dots). A qualname part starting with ``_`` matches only a
    pattern without wildcards equal to ``fn``. An empty ``allow`` allows
    nothing (the default of ``MQExecutor`` and ``mqexecutor serve``).
    """
    if not allow:
        return False
    _module, _, qualname = fn.partition(":")
    private = any(part.startswith("_") for part in qualname.split("."))
    for pattern in allow:
        if not isinstance(pattern, str):
            continue
        if private:
            if pattern == fn and not (_WILDCARDS & set(pattern)):
                return True
        elif fnmatch.fnmatchcase(fn, pattern):
            return True
    return False


def resolve(fn: str) -> Callable[..., Any]:
    """Import ``"module:qualname"`` and return the callable it names.

    Raises:
        TaskRefused (code ``not_found``): the module does not import (any
            exception at import time), an attribute is missing, or the object is
            not callable.
    """
    module_name, _, qualname = fn.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - import-time code may raise anything
        raise TaskRefused("not_found", f"cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}"[:_MESSAGE_MAX],
                          "ImportError") from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskRefused("not_found", f"{fn!r}: no attribute {part!r}",
                              "AttributeError") from None
        except BaseException as exc:  # noqa: BLE001 - a property may raise anything
            raise TaskRefused("not_found", f"{fn!r}: {type(exc).__name__}: {exc}"
                              [:_MESSAGE_MAX], "AttributeError") from None
    if not callable(obj):
        raise TaskRefused("not_found", f"{fn!r} is not callable (it is a "
                          f"{type(obj).__name__})", "TypeError")
    return obj


def _identity() -> tuple[int | None, int]:
    return worker_id(), os.getpid()


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except BaseException:  # noqa: BLE001
        return f"<unprintable {type(obj).__name__}>"


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


def _error_reply(task_id: Any, code: str, type_name: str, message: str,
                 tb: str | None, limit: int) -> bytes:
    """An error reply that fits in ``limit`` bytes (message and traceback cut)."""
    wid, pid = _identity()
    message = message[:_MESSAGE_MAX]
    error: dict[str, Any] = {"code": code, "type": type_name, "message": message}
    if tb:
        error["traceback"] = tb[-(limit // 2):]
    reply = {"v": VERSION, "id": task_id, "ok": False, "worker": wid, "pid": pid,
             "error": error}
    try:
        body = _dumps(reply)
    except (TypeError, ValueError):  # cannot happen: id came from JSON
        reply["id"] = None
        body = _dumps(reply)
    while len(body) > limit:
        if error.get("traceback"):
            error["traceback"] = error["traceback"][len(error["traceback"]) // 2:]
            if len(error["traceback"]) < 64:
                del error["traceback"]
        elif len(error["message"]) > 64:
            error["message"] = error["message"][:len(error["message"]) // 2]
        elif reply["id"] is not None:
            reply["id"] = None  # an id too large to echo
        else:
            break
        body = _dumps(reply)
    return body


def _send_fresh(key: int, mtype: int, body: bytes) -> bool:
    """One non-blocking msgsnd through a freshly opened queue object."""
    try:
        queue = sysv_ipc.MessageQueue(key, 0, max_message_size=max(len(body), 1))
        queue.send(body, block=False, type=mtype)
        return True
    except (sysv_ipc.Error, OSError, ValueError):
        return False


def _send(send_reply: Callable[[int, int, bytes], bool], task: JSONTask,
          body: bytes) -> None:
    if task.reply_key is None:
        return
    try:
        sent = send_reply(task.reply_key, task.reply_mtype, body)
    except Exception:  # noqa: BLE001 - a reply failure must not kill the worker
        # e.g. OSError EINVAL from a cached queue object whose queue was removed
        # and re-created under the same key (a new msqid): open it afresh.
        sent = _send_fresh(task.reply_key, task.reply_mtype, body)
    if not sent:
        _log(f"JSON reply for task id {task.id!r} could not be delivered to key "
             f"0x{task.reply_key & 0xFFFFFFFF:08x} (queue gone, not ours, or full)")


def handle_json(raw: bytes, allow: Sequence[str],
                send_reply: Callable[[int, int, bytes], bool]) -> str | None:
    """Run one JSON task message in a task worker (see the module docstring).

    Called by the worker for every message whose first byte is ``{``.

    Args:
        raw: the whole message text (at most ``kernel.msgmax`` bytes).
        allow: fnmatch patterns of ``"module:qualname"`` this pool may run
            (``MQExecutor(allow=...)``, ``mqexecutor serve --allow``); empty:
            every JSON task is refused.
        send_reply: ``send_reply(key, mtype, message) -> bool``, sends one
            message to the queue of SysV ``key`` without blocking for good and
            returns False when it could not (the worker's ``send_raw``).

    Returns:
        None when the task was handled: it ran and its result or its exception
        was answered (or no reply was asked for). A reason string when it was
        refused: malformed, not allowed, or not found; an error reply is still
        sent when the message named a usable reply queue. Never raises for any
        content of ``raw``.
    """
    limit = msgmax()
    task: JSONTask | None = None
    try:
        try:
            task = parse_task(raw)
        except TaskRefused as refused:
            task = getattr(refused, "task", None)
            raise
        if not is_allowed(task.fn, allow):
            raise TaskRefused("not_allowed", f"{task.fn!r} is not allowed in this pool "
                              "(start it with allow= patterns, or serve --allow)",
                              "PermissionError")
        fn = resolve(task.fn)
    except TaskRefused as refused:
        if task is not None:
            _send(send_reply, task, _error_reply(task.id, refused.code, refused.type,
                                                 str(refused), None, limit))
        return f"JSON task refused ({refused.code}): {refused}"
    except Exception as exc:  # noqa: BLE001 - never crash the worker on bad input
        return f"JSON task refused: {type(exc).__name__}: {exc}"

    try:
        result = fn(*task.args, **task.kwargs)
    except BaseException as exc:  # noqa: BLE001 - as ProcessPoolExecutor: an outcome
        try:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the worker
            tb = None
        body = _error_reply(task.id, "raised", type(exc).__name__, _safe_str(exc), tb,
                            limit)
        del exc
        _send(send_reply, task, body)
        return None
    if task.reply_key is None:
        return None
    wid, pid = _identity()
    try:
        body = _dumps({"v": VERSION, "id": task.id, "ok": True, "result": result,
                       "worker": wid, "pid": pid})
    except (TypeError, ValueError, RecursionError) as exc:
        body = _error_reply(task.id, "bad_result", type(exc).__name__,
                            f"the result of {task.fn} is not JSON-serializable "
                            f"({type(result).__name__}): {_safe_str(exc)}", None, limit)
    except BaseException as exc:  # noqa: BLE001 - a __str__ or subclass may raise anything
        body = _error_reply(task.id, "bad_result", type(exc).__name__,
                            f"the result of {task.fn} could not be encoded: "
                            f"{_safe_str(exc)}", None, limit)
    if len(body) > limit:
        body = _error_reply(task.id, "too_large", "ValueError",
                            f"the JSON reply is {len(body)} bytes; a message holds at "
                            f"most {limit} (kernel.msgmax)", None, limit)
    _send(send_reply, task, body)
    return None
