"""PoolConfig: what a pool is, fixed when it is made.

The producer (``MQExecutor.__init__``) builds one PoolConfig; the manager
process receives a copy when it starts, and every task worker it forks runs
with that copy. Plain data only (it is pickled to a manager started as a fresh
interpreter).
"""
from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["PoolConfig"]


class PoolConfig(NamedTuple):
    """Everything a pool's manager process and task workers need (a named tuple).

    Attributes:
        task_key (int): SysV key of the task queue.
        targeted (bool): Mode.TARGETED (worker i receives mtype i + 1) or
            Mode.PREEMPTIVE (workers receive any type).
        max_workers (int): number of task workers (worker ids 0..max_workers-1).
        owner_pid (int), owner_token (int): the producer that owns the pool
            (its pid, and the random 64-bit token in its messages' headers).
        owner_reply_key (int): SysV key of the owner's reply queue.
        owner_subdir (str): the owner's spill sub-directory (``p-<pid>-<token>``).
        board_dir (str): directory of the scoreboard and the outbox files (the
            owner's sub-directory under spill root 0).
        private_queue (bool): the task queue has no key of the user's
            (removed when the owner is gone).
        initializer (tuple | None): ``(initializer, initargs)``.
        max_tasks_per_child (int | None): a worker exits after this many tasks.
        spill_env (str | None): the owner's ``MQEXECUTOR_SPILL_DIR``.
        allow (tuple of str): fnmatch patterns JSON tasks may call.
        swoole_handler (str | None): ``"module:function"`` fed Swoole packets.
        authkey (bytes | None): the HMAC key of every message, if any.
        sweep (bool): reclaim dead producers' leftovers shortly after start.
        sys_path (tuple of str): the owner's ``sys.path``, for a manager started
            as a fresh interpreter (imports by reference must resolve there too).
        max_memory_per_child (int | None): bytes of resident set above which a
            worker is recycled after its task.
        watch_deadlines (bool): the manager watches time limits from the start
            (``task_timeout=``, or a keyed pool, whose attach() producers may
            send timed tasks); else from the owner's first timed task.
        task_timeout (float | None): seconds; the time limit of a task whose
            message carries none (an attach() producer's, a task left in the
            queue), as the pool's owner gives its own tasks.
        log_level (int | None): relay logging records at or above this level
            to the producer of the task that emitted them; None: no relay.
        relay_output (bool): send what tasks print to their producer (a
            notebook's kernel) instead of the worker's own stdout and stderr.
        mp_authkey (bytes | None): the owner's ``multiprocessing`` authkey,
            for a manager started as a fresh interpreter when the owner uses
            ``multiprocessing.managers`` (its proxies, passed to tasks, connect
            back with it), as multiprocessing's spawn passes it on.
    """

    task_key: int
    targeted: bool
    max_workers: int
    owner_pid: int
    owner_token: int
    owner_reply_key: int
    owner_subdir: str
    board_dir: str
    private_queue: bool
    initializer: tuple | None = None
    max_tasks_per_child: int | None = None
    spill_env: str | None = None
    allow: tuple = ()
    swoole_handler: str | None = None
    authkey: bytes | None = None
    sweep: bool = False
    sys_path: tuple = ()
    max_memory_per_child: int | None = None
    watch_deadlines: bool = False
    task_timeout: float | None = None
    log_level: int | None = None
    relay_output: bool = False
    mp_authkey: bytes | None = None

    @property
    def scoreboard_path(self) -> str:
        """The scoreboard file (see :mod:`mqexecutor.scoreboard`)."""
        return os.path.join(self.board_dir, "scoreboard")
