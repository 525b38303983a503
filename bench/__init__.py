"""Benchmarks: scripts that measure side by side and write docs/benchmarks.md."""
