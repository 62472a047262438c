"""The task worker: a process that receives task messages and runs them."""
from .loop import EXIT_INIT_FAILED, STOP_SIGNAL, WorkerConfig, current_task_id, run_worker, worker_id

__all__ = ["worker_id", "current_task_id", "WorkerConfig", "run_worker", "EXIT_INIT_FAILED",
           "STOP_SIGNAL"]
