"""Shared pytest fixtures: ``db_url`` (every store test on SQLite and PostgreSQL), ``pg_url``."""

pytest_plugins = ["tests.pgfixture"]
