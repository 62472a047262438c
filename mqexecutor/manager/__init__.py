"""The manager process of a pool (Swoole's manager process): it forks the task
workers, reaps them, replaces them under the same worker id, reports the task a
dead worker was running, and stops them when asked or when its owner dies.

* :mod:`.process`: the manager itself (one thread), and its control messages;
* :mod:`.launch`: the owner's side: starting it (fork or a fresh interpreter)
  and talking to it.
"""
