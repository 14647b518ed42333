"""The Alembic migrations build exactly the models' schema, on PostgreSQL and on SQLite, and go down again."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db.models import Base
from service.db.session import Database, alembic_config


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path) -> Database:
    url = (
        request.getfixturevalue("pg_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/wbc.db"
    )
    db = Database(url)
    yield db
    db.dispose()


def test_upgrade_matches_models_and_downgrades(database: Database) -> None:
    database.upgrade()
    database.upgrade()  # idempotent: a restart finds head
    assert database.current_revision() == "0001"
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    with database.engine.connect() as connection:
        command.downgrade(alembic_config(connection), "base")
        connection.commit()
    assert database.current_revision() is None
    assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
