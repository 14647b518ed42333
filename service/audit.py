"""The audit log: append-only, hash-chained; `verify` finds an edited, inserted or deleted entry.

Each entry's `hash` is HMAC-SHA256(WBC_AUDIT_KEY, canonical JSON of [seq, at, actor, action, subject,
details, prev_hash]) and `prev_hash` is the entry before's hash, so changing any entry breaks its own
hash and every link after it. Without a key (empty key) the chain still catches edits made by hand,
but someone with write access could recompute it; with the key kept outside the database (an
environment secret) they cannot. The `audit_head` row holds the last seq and hash, so deleting entries
at the end is caught too. The database also refuses UPDATE/DELETE on audit_log (triggers, see the
migration); the chain is what catches whoever disables them.

Entries are appended inside the caller's transaction, so an action and its audit entry commit together.
Details name rows by integer id; specimen accessions and file names never go into the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import AuditEntry, AuditHead

GENESIS_HASH = "0" * 64

# What is audited.
PREDICTION_SERVED = "prediction.served"
CELL_REVIEWED = "cell.reviewed"
SPECIMEN_SIGNED_OFF = "specimen.signed_off"
SPECIMEN_REOPENED = "specimen.reopened"
MODEL_PROMOTED = "model.promoted"
MODEL_ROLLED_BACK = "model.rolled_back"
USER_CREATED = "user.created"
USER_DISABLED = "user.disabled"
TOKEN_CREATED = "token.created"
TOKEN_REVOKED = "token.revoked"
SITE_DATA_EXPORTED = "site_data.exported"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(
    key: bytes, seq: int, at: str, actor: str, action: str, subject: str, details: str, prev_hash: str
) -> str:
    message = canonical_json([seq, at, actor, action, subject, details, prev_hash]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _hash_of(entry: AuditEntry, key: bytes) -> str:
    return entry_hash(
        key, entry.seq, entry.at, entry.actor, entry.action, entry.subject, entry.details, entry.prev_hash
    )


class AuditLog:
    def __init__(self, key: bytes | str | None = None):
        self.key = key.encode() if isinstance(key, str) else (key or b"")

    def append(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str = "",
        details: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Chain one entry onto the log in `session`'s transaction (committed with the caller's work).

        The head row is updated first: that locks it (row lock on PostgreSQL, the write lock on
        SQLite), so concurrent appends queue here and each sees the hash of the one before.
        """
        seq, prev_hash = session.execute(
            update(AuditHead)
            .where(AuditHead.id == 1)
            .values(seq=AuditHead.seq + 1)
            .returning(AuditHead.seq, AuditHead.hash)
        ).one()
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        text = canonical_json(details or {})
        digest = entry_hash(self.key, seq, at, actor, action, subject, text, prev_hash)
        entry = AuditEntry(
            seq=seq,
            at=at,
            actor=actor,
            action=action,
            subject=subject,
            details=text,
            prev_hash=prev_hash,
            hash=digest,
        )
        session.add(entry)
        session.flush()
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=digest))
        return entry

    def verify(self, session: Session, max_problems: int = 20) -> VerifyReport:
        """Walk the whole chain in order; every broken link or hash is a problem."""
        report = VerifyReport()
        expected_seq, prev_hash = 1, GENESIS_HASH
        rows = session.execute(select(AuditEntry).order_by(AuditEntry.seq).execution_options(yield_per=1000))
        for entry in rows.scalars():
            if entry.seq != expected_seq:
                missing = (
                    f"{expected_seq}" if entry.seq == expected_seq + 1 else f"{expected_seq}–{entry.seq - 1}"
                )
                report.problem(f"entry {missing} missing: deleted", max_problems)
            if entry.prev_hash != prev_hash:
                report.problem(
                    f"entry {entry.seq}: prev_hash does not match the entry before it "
                    "(that one was edited or deleted, or this link was changed)",
                    max_problems,
                )
            if _hash_of(entry, self.key) != entry.hash:
                report.problem(
                    f"entry {entry.seq} ({entry.action}): its contents do not match its hash "
                    "(edited, or verified with another WBC_AUDIT_KEY)",
                    max_problems,
                )
            report.entries += 1
            expected_seq, prev_hash = entry.seq + 1, entry.hash
        head = session.get(AuditHead, 1)
        report.head_seq, report.head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
        last_seq = expected_seq - 1
        if head is None:
            report.problem("the audit_head row is missing", max_problems)
        elif (head.seq, head.hash) != (last_seq, prev_hash):
            report.problem(
                f"the chain ends at entry {last_seq} but the head records entry {head.seq} "
                f"({head.hash[:12]}…): entries at the end were deleted, or the head was changed",
                max_problems,
            )
        return report


@dataclass
class VerifyReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    problems: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str, limit: int) -> None:
        if len(self.problems) < limit:
            self.problems.append(text)
        else:
            self.truncated = True


async def record_from_request(
    request: Request, actor: str, action: str, subject: str = "", details: dict[str, Any] | None = None
) -> None:
    """One entry from a route outside the review loop (model promotion, rollback), off the event loop.
    A no-op in an app without the review loop's database (service.review.wiring sets `audit_event`)."""
    event = getattr(request.app.state, "audit_event", None)
    if event is not None:
        await run_in_threadpool(event, actor, action, subject, details)
