"""The audit log on PostgreSQL: appended in order, refused by the database when changed, and
`verify` catches an edited, deleted (middle or end) or re-keyed chain."""

from __future__ import annotations

import itertools
import threading

import pytest
from review_helpers import AUDIT_KEY
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from service.audit import GENESIS_HASH, AuditLog
from service.db.models import AuditEntry
from service.db.session import Database


def fill(db: Database, log: AuditLog, n: int) -> None:
    for i in range(n):
        with db.transaction() as session:
            log.append(
                session,
                actor="tester",
                action="cell.reviewed",
                subject=f"cell:{i}",
                details={"old": "neutrophil", "new": "lymphocyte", "i": i},
            )


def tamper(db: Database, sql: str) -> None:
    """What someone with the owner's rights can do: switch the append-only triggers off, then write."""
    with db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        connection.execute(text(sql))
        connection.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))


def verify(db: Database, log: AuditLog):
    with db.transaction() as session:
        return log.verify(session)


def test_chain_links_and_verifies(pg_db: Database, audit_log: AuditLog) -> None:
    fill(pg_db, audit_log, 5)
    with pg_db.transaction() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).all()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    report = verify(pg_db, audit_log)
    assert report.ok and report.entries == 5 and report.head_seq == 5 and report.head_hash == entries[-1].hash


def test_database_refuses_update_and_delete(pg_db: Database, audit_log: AuditLog) -> None:
    fill(pg_db, audit_log, 1)
    for statement in (
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(DBAPIError, match="append-only"), pg_db.engine.begin() as connection:
            connection.execute(text(statement))
    assert verify(pg_db, audit_log).ok


@pytest.mark.parametrize(
    "sql, expected",
    [
        (
            "UPDATE audit_log SET details = replace(details, 'lymphocyte', 'monocyte') WHERE seq = 2",
            "entry 2 (cell.reviewed): its contents do not match its hash",
        ),
        ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4", "entry 4 (cell.reviewed): its contents"),
        ("DELETE FROM audit_log WHERE seq = 3", "entry 3 missing"),
        ("DELETE FROM audit_log WHERE seq = 5", "the chain ends at entry 4 but the head records entry 5"),
    ],
)
def test_verify_finds_tampering(pg_db: Database, audit_log: AuditLog, sql: str, expected: str) -> None:
    fill(pg_db, audit_log, 5)
    tamper(pg_db, sql)
    report = verify(pg_db, audit_log)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_recomputed_hash_without_the_key_is_caught(pg_db: Database, audit_log: AuditLog) -> None:
    """An editor without WBC_AUDIT_KEY who recomputes a plain-SHA chain still fails verification."""
    fill(pg_db, audit_log, 3)
    assert not verify(pg_db, AuditLog(None)).ok  # wrong (no) key: every entry mismatches
    assert verify(pg_db, AuditLog(AUDIT_KEY)).ok


def test_concurrent_appends_stay_one_chain(pg_db: Database, audit_log: AuditLog) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fill(pg_db, audit_log, 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = verify(pg_db, audit_log)
    assert report.ok and report.entries == 40


def test_sqlite_default_is_append_only_and_verifies(tmp_path, audit_log: AuditLog) -> None:
    db = Database(f"sqlite:///{tmp_path}/wbc.db")
    db.upgrade()
    fill(db, audit_log, 3)
    with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET actor = 'mallory'"))
    assert verify(db, audit_log).ok
    with db.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER audit_log_no_update"))
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    assert not verify(db, audit_log).ok
