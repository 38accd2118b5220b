"""Benchmarks, run by hand as `python -m bench.<name>` (never by the tests)."""
