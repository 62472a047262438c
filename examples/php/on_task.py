"""A Swoole-style ``onTask`` handler for ``mqexecutor serve --swoole-handler``.

    PYTHONPATH=examples/php mqexecutor serve 0x70001002 --swoole-handler on_task:on_task
    php examples/php/swoole_task.php 0x70001002

Each task worker calls ``on_task(data, task_id=..., flags=...)`` for every
packet it takes from the queue (see docs/external.md, "Swoole task packets").
"""
from __future__ import annotations

import mqexecutor
from mqexecutor.swoole import SW_TASK_SERIALIZE, SW_TASK_TMPFILE


def on_task(data, task_id: int, flags: int) -> None:
    """Print one line per task, as the seed's onTask does with ``echo``.

    Args:
        data: bytes; or, with SW_TASK_SERIALIZE and the ``phpserialize``
            package installed, the unserialized PHP value.
        task_id: the sender's task id.
        flags: SW_TASK_* bits of the packet.
    """
    how = []
    if flags & SW_TASK_TMPFILE:
        how.append("tmpfile")
    if flags & SW_TASK_SERIALIZE:
        how.append("serialized")
    size = len(data) if isinstance(data, (bytes, str, dict, list)) else "?"
    print(f"#{mqexecutor.worker_id()} onTask: task_id={task_id} "
          f"({', '.join(how) or 'plain'}) {type(data).__name__} of {size}: "
          f"{data!r:.60}", flush=True)
