"""Engine, sessions and migrations for one database URL.

SQLite: every transaction starts with BEGIN IMMEDIATE (SQLAlchemy's pysqlite recipe), so writers
queue on the busy timeout instead of failing with "database is locked" when two transactions that
both read first try to write; WAL lets pages be read meanwhile. PostgreSQL: a pooled psycopg 3 engine
with pre-ping; rows are locked with SELECT ... FOR UPDATE where the order of writes matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Serialises concurrent `upgrade` calls of several replicas on one PostgreSQL database.
MIGRATION_LOCK_ID = 0x5742_4344  # "WBCD"


def normalise_url(url: str | URL) -> URL:
    """`postgresql://` means psycopg 3 here (the driver installed); a SQLite file's folder is created."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    parsed = normalise_url(url)
    # Bound values (specimen accessions, file names) never appear in error messages or SQL logs.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        _sqlite_immediate_transactions(engine)
        return engine
    return create_engine(parsed, pool_pre_ping=True, **kwargs)


def _sqlite_immediate_transactions(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not emit its own BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(connection: Any | None = None, url: str | None = None):  # -> alembic.config.Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


class Database:
    """One database: `transaction()` for units of work, `upgrade()` to apply the migrations."""

    def __init__(self, url: str | URL):
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        with self.engine.connect() as connection:
            command.upgrade(alembic_config(connection), revision)
            connection.commit()

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back on an exception."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    def describe(self) -> str:
        """The URL without its password, for logs."""
        return self.url.render_as_string(hide_password=True)
