"""Tenaya's master: the CLI, the arbiter that supervises workers, and the listeners it owns."""
