"""Alembic migrations of the service database (see service/db/session.py)."""
