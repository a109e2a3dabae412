"""Benchmarks of the project and of a plain Channels baseline (see README.md)."""
