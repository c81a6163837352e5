"""One retry helper for the one race every store has: two processes creating (or migrating) a new
database's tables at the same moment. The loser's error names the race; after a short wait it finds the
tables made. Any other error is raised at once."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

# What a database says when another process creates the same tables or rows at the same moment: sqlite
# ("table ... already exists", a UNIQUE constraint, a locked file, "duplicate column name" when a client we
# did not start migrates a fresh MLflow store beside us), PostgreSQL ("duplicate key value", its catalog
# with three workers starting together), alembic ("Online migration expected to match one row ... 0 found";
# "No such constraint" or an _alembic_tmp_ table when another client's batch migration ran between its
# steps). A new sqlite file is no longer migrated beside another client (tracking/fresh_sqlite.py); these
# stay for a database server's store, where two clients' migrations can still meet.
SCHEMA_RACES = ("already exists", "UNIQUE constraint", "duplicate key value", "expected to match one row",
                "database is locked", "duplicate column name", "No such constraint", "_alembic_tmp_")


def is_race(exc: BaseException) -> bool:
    return any(race in str(exc) for race in SCHEMA_RACES)


def on_race(fn: Callable[[], T], *, attempts: int = 6, wait_s: float = 0.5) -> T:
    """`fn()`, again after `wait_s * attempt` seconds while it fails with a schema race (at most `attempts`
    tries); any other error, or the last race, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # every store library has its own error types; the message tells a race
            if attempt == attempts or not is_race(exc):
                raise
        time.sleep(wait_s * attempt)
    raise AssertionError("unreachable")
