"""CPython's concurrent.futures process-pool tests, run against MQExecutor.

See run.py (how to run), shim.py (the adapter) and expected.py (tests that
fail on purpose, with their reasons)."""
