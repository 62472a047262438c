"""The producer side of a pool, in the submitting process.

* :mod:`.pool`: what one pool owns (queues, files, flags), the live pools;
* :mod:`.dispatch`: encoding, targeting, the backlog, sending;
* :mod:`.collector`: the thread that drains the reply queue into Futures;
* :mod:`.monitor`: the thread that follows the manager process, polls the
  backlog and tears the pool down;
* :mod:`.adoption`: taking over the tasks of dead producers.
"""
