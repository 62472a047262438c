"""The task worker: a process, forked by the manager process, that receives
task messages from the task queue and runs them.

* :mod:`.process`: process set-up (signals, faulthandler, the manager watch),
  :func:`run_worker`;
* :mod:`.loop`: the receive loop, one handler per message kind, running a task;
* :mod:`.batcher`: the results of a BATCH's tasks, sent together;
* :mod:`.replies`: sending to producers' reply queues, encoding outcomes.
"""
from .loop import EXIT_INIT_FAILED, EXIT_MEMORY
from .process import STOP_SIGNAL, run_worker

__all__ = ["run_worker", "STOP_SIGNAL", "EXIT_INIT_FAILED", "EXIT_MEMORY"]
