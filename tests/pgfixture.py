"""PostgreSQL for the store tests: a fresh schema per test on the server ``HOMEPORT_TEST_PG`` names.

``bash .ci/run`` installs Debian's ``postgresql``, starts its cluster, creates a
role that may create schemas, and exports ``HOMEPORT_TEST_PG``. Elsewhere the
PostgreSQL variants skip and say why.

Why a schema per test and not a database: ``CREATE SCHEMA`` takes about a
millisecond, ``CREATE DATABASE`` a good part of a second. The test's URL sets
``search_path`` to its schema (libpq ``options``), so the store's unqualified
table names land there, and a per-test ``application_name`` lets the cleanup
end any connection the test left open before dropping the schema.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

#: The environment variable with the test server's URL (a role with CREATE on its database).
PG_ENV = "HOMEPORT_TEST_PG"
#: Backends the ``db_url`` fixture runs each test on.
BACKENDS = ("sqlite", "pg")


def _libpq_url(url: str) -> str:
    """The URL for psycopg itself (no SQLAlchemy ``+driver`` suffix)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@functools.cache
def pg_skip_reason() -> str | None:
    """Why the PostgreSQL variants cannot run here (None: they can)."""
    url = os.environ.get(PG_ENV)
    if not url:
        return (
            f"PostgreSQL tests need {PG_ENV}=postgresql://… (bash .ci/run starts one and sets it)"
        )
    try:
        import psycopg
    except ImportError:
        return "PostgreSQL tests need psycopg: pip install -e '.[test]'"
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {PG_ENV} is not reachable: {first}"
    return None


_admin: list[Any] = []  # the one admin connection, closed at the end of the session


def _admin_conn() -> Any:
    """One autocommit connection for creating and dropping schemas (a connect costs ~50 ms)."""
    import psycopg

    if not _admin:
        _admin.append(psycopg.connect(_libpq_url(os.environ[PG_ENV]), autocommit=True))
    return _admin[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _admin:
        _admin.pop().close()


def _admin_exec(sql: str, params: tuple[Any, ...] = ()) -> None:
    _admin_conn().execute(sql, params)


@contextmanager
def fresh_pg_schema() -> Iterator[str]:
    """A new, empty schema; yields a ``postgresql+psycopg://`` URL whose tables live there."""
    reason = pg_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from sqlalchemy.engine import make_url

    name = f"hp_t_{secrets.token_hex(6)}"
    _admin_exec(f'CREATE SCHEMA "{name}"')
    base = make_url(os.environ[PG_ENV]).set(drivername="postgresql+psycopg")
    url = base.update_query_dict(
        # no fsync wait per commit: durability is not under test, and the write-heavy tests
        # would otherwise measure the disk (production keeps PostgreSQL's default)
        {"options": f"-csearch_path={name} -csynchronous_commit=off", "application_name": name}
    ).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        # end what the test left connected (its engines share the name), then drop everything
        _admin_exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        )
        _admin_exec(f'DROP SCHEMA "{name}" CASCADE')


def sqlite_url(tmp_path: Path) -> str:
    """The embedded default: a file in a data directory (several engines may share it)."""
    return f"sqlite:///{tmp_path}/homeport.db"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: once on SQLite, once on PostgreSQL (or skipped, saying why)."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema's URL (skipped, saying why, without a server)."""
    with fresh_pg_schema() as url:
        yield url
