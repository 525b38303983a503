"""``homeport server migrate-db``: copy every row of one homeport database into another.

Why a copy and not a dump: the two ends may be different engines (SQLite to
PostgreSQL, or back for a backup), and the same SQLAlchemy tables describe
both, so reading rows from one and inserting them into the other moves values
with their types intact (booleans, floats, NULLs). The copy is generic over
:data:`homeport.store.db.metadata`: a table added by a later schema is copied
without touching this module.

Guarantees: the source is read in one snapshot; the target is written in ONE
transaction (rows, then the per-table row counts are checked against the
source's inside that transaction), so a failure leaves the target as it was. A
target that already holds rows is refused unless ``force`` (then its rows are
deleted in the same transaction). Both ends are migrated to this code's schema
first, exactly as a server start would.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Integer, delete, func, insert, select

from homeport.store.db import (
    SCHEMA_VERSION,
    Store,
    StoreError,
    display_url,
    metadata,
    normalize_url,
    open_store,
    peek_schema_version,
    schema_version,
)

#: Rows read from the source and inserted into the target per round trip.
COPY_BATCH_ROWS = 500


class TargetNotEmpty(StoreError):
    """The target already holds homeport rows and ``force`` was not given."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What :func:`copy_database` did, for the CLI to print."""

    source: str  # password masked
    target: str  # password masked
    source_version: int | None  # the source's schema before it was migrated (None: empty)
    schema: int
    tables: tuple[tuple[str, int], ...]  # (table, rows copied), in copy order
    replaced: int  # rows deleted from the target first (force)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.tables)


def data_tables() -> list[str]:
    """Every table that holds state, parents before children (all but ``schema_version``)."""
    return [t.name for t in metadata.sorted_tables if t is not schema_version]


def _counts(conn: Connection) -> dict[str, int]:
    return {
        name: int(
            conn.execute(select(func.count()).select_from(metadata.tables[name])).scalar_one()
        )
        for name in data_tables()
    }


def _advance_sequences(conn: Connection) -> None:
    """PostgreSQL: move serial/identity sequences past the copied ids (none today; generic)."""
    for name in data_tables():
        table = metadata.tables[name]
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or not isinstance(pk[0].type, Integer):
            continue
        # setval and pg_get_serial_sequence are strict: a column without a sequence, or an
        # empty table (max is NULL), makes this a no-op
        conn.execute(
            select(
                func.setval(func.pg_get_serial_sequence(table.name, pk[0].name), func.max(pk[0]))
            )
        )


def copy_database(source_url: str, target_url: str, *, force: bool = False) -> CopyReport:
    """Copy all state from ``source_url`` into ``target_url`` (see the module docstring).

    Raises:
        TargetNotEmpty: the target has rows and ``force`` is false (nothing written).
        StoreError: a URL is unusable, both name one database, or the copy failed
            (the target is unchanged); always one line.
    """
    source_url, target_url = normalize_url(source_url), normalize_url(target_url)
    if source_url == target_url:
        raise StoreError("--from and --to name the same database")
    before = peek_schema_version(source_url)
    if before is None:
        raise StoreError(f"{display_url(source_url)} holds no homeport database")
    source = open_store(source_url)
    try:
        target = open_store(target_url)
        try:
            return _copy(source_url, target_url, before, source, target, force=force)
        finally:
            target.close()
    finally:
        source.close()


def _copy(
    source_url: str,
    target_url: str,
    before: int,
    source: Store,
    target: Store,
    *,
    force: bool,
) -> CopyReport:
    copied: list[tuple[str, int]] = []
    replaced = 0
    try:
        with (
            source.transaction(write=False, snapshot=True) as src,
            target.transaction(write=True) as dst,
        ):
            existing = _counts(dst)
            if any(existing.values()):
                held = ", ".join(f"{t} {n}" for t, n in existing.items() if n)
                if not force:
                    raise TargetNotEmpty(
                        f"{display_url(target_url)} already holds rows ({held}); "
                        f"--force replaces them"
                    )
                for name in reversed(data_tables()):
                    dst.execute(delete(metadata.tables[name]))
                replaced = sum(existing.values())
            expected = _counts(src)
            for name in data_tables():
                table = metadata.tables[name]
                result = src.execute(select(table))
                while batch := result.fetchmany(COPY_BATCH_ROWS):
                    dst.execute(insert(table), [dict(row._mapping) for row in batch])
                copied.append((name, expected[name]))
            if dst.dialect.name == "postgresql":
                _advance_sequences(dst)
            written = _counts(dst)
            if written != expected:
                wrong = ", ".join(
                    f"{t}: {written[t]} != {expected[t]}"
                    for t in expected
                    if written[t] != expected[t]
                )
                raise StoreError(f"row counts differ after the copy ({wrong}); nothing was written")
    except StoreError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"copy failed, the target is unchanged: {first}") from exc
    return CopyReport(
        source=display_url(source_url),
        target=display_url(target_url),
        source_version=before,
        schema=SCHEMA_VERSION,
        tables=tuple(copied),
        replaced=replaced,
    )
