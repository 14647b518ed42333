"""The service's database: SQLAlchemy 2 models (`models`), engine + sessions + migrations (`session`).

SQLite (a file under var/) is the embedded default; PostgreSQL is for deployments. The schema is owned
by the Alembic migrations in `service/db/migrations`; the service upgrades to head at start-up.
"""
