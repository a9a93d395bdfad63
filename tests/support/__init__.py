"""What the tests share, one job per module.

- :mod:`~tests.support.waits`: polling for a condition, or a value that settles, with a deadline.
- :mod:`~tests.support.payloads`: deterministic bodies of any size and their SHA-256.
- :mod:`~tests.support.headers`: case-insensitive header lookups over (name, value) pairs.
- :mod:`~tests.support.origin`: the test origin, a configurable HTTP/1.1 server with counters.
- :mod:`~tests.support.client`: raw HTTP/1.1 clients and request builders; a fake transport.
- :mod:`~tests.support.config`: config mappings and app modules for a master; declared settings.
- :mod:`~tests.support.master`: the real master as a subprocess.
- :mod:`~tests.support.nginx`: nginx as a fast, real origin.
- :mod:`~tests.support.resources`: descriptors and memory of a process; a free port.
- :mod:`~tests.support.protocols`: the engine behind its HTTP/1.1 and HTTP/2 servers in one
  process, without a socket, for the protocol tests.

The fixtures that start these and stop them at the end are in ``tests/conftest.py``.
"""
