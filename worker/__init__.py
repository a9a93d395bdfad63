"""Tenaya's data plane: the worker process, HTTP/1.1 protocols, the proxy engine, the pool."""
