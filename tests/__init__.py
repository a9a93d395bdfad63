"""Tenaya's test suite: unit tests, corpus tests and integration tests, with what they share in
:mod:`tests.support`."""
