"""Reusable test support shipped with homeport (in the spirit of ``trio.testing``).

It lives inside the package, not under ``tests/``, so that benchmarks, downstream
test suites and ad-hoc scripts can drive the same real OpenSSH server and NAT lab
that homeport's own tests use.
"""
