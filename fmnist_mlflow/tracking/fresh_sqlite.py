"""A new sqlite tracking file made whole before any other client can open it, so that no migrations but
one ever run on it.

MLflow makes a store's tables on first use by running its alembic migrations in place, and nothing stops
two clients from doing so on one sqlite file at the same moment: the loser fails ("duplicate column name",
"No such constraint"), or leaves the file half-migrated for good ("table _alembic_tmp_latest_metrics
already exists"). Our own processes take turns under a file lock (`connection.open_store`), but a client
we did not start (a notebook, `mlflow ui`, another tool) does not take it. So:

- a file that does not exist yet is made beside it under a private name, then linked into place only if
  the name is still free (`os.link` creates or fails, atomically): whoever opens the name after that finds
  every table made;
- a file that exists but is not made yet is in another client's hands: we wait until it is made (the
  default experiment, which MLflow writes last, is there) or has stopped changing, and only then open it.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

QUIET_S = 2.0  # a file not made that has not changed for this long has nobody making it
WAIT_S = 120.0  # the longest we wait for another client to finish making a store
NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def make_aside(path: Path, create: Callable[[str], None]) -> bool:
    """Make a new store at `path` (absent) by `create(uri)` on a private file beside it, then link it into
    place; False when the name was taken meanwhile (another client is making it) or the file system has no
    hard links, and the caller opens `path` as it is."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        create(f"sqlite:///{aside}")
        try:
            os.link(aside, path)
        except FileExistsError:
            return False
        except OSError as exc:  # no hard links on this file system (some network or FUSE ones)
            if exc.errno in NO_LINKS:
                return False
            raise
        return True
    finally:
        for leftover in (aside, aside.with_name(aside.name + "-journal")):
            leftover.unlink(missing_ok=True)


def made(path: Path) -> bool:
    """Whether the sqlite file holds a whole MLflow store: MLflow creates the default experiment after its
    migrations are through, and a batch migration under way leaves an `_alembic_tmp_` table."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables or any(t.startswith("_alembic_tmp_") for t in tables):
                return False
            return db.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] > 0
    except sqlite3.Error:  # locked by a migration under way, or not (yet) a database
        return False


def wait_until_made(path: Path, quiet_s: float = QUIET_S, timeout_s: float = WAIT_S) -> bool:
    """Wait while another client makes the store at `path`: until it is made (True), or has not changed for
    `quiet_s` (False: nobody is making it; MLflow will, or will say what is wrong with it). Raises
    TimeoutError if it is still changing, unmade, after `timeout_s`."""
    started = time.monotonic()
    last, still_since = None, started
    while not made(path):
        now = time.monotonic()
        state = _state(path)
        if state != last:
            last, still_since = state, now
        elif now - still_since >= quiet_s:
            return False
        if now - started > timeout_s:
            raise TimeoutError(f"another process has been making the MLflow store {path} for {timeout_s:.0f} s "
                               "and has not finished")
        time.sleep(0.1)
    return True


def _state(path: Path) -> tuple:
    """What changes while a client writes the file: its size and time, and its rollback journal's."""
    def stat(p: Path):
        try:
            s = p.stat()
            return s.st_size, s.st_mtime_ns
        except FileNotFoundError:
            return None

    return stat(path), stat(path.with_name(path.name + "-journal")), stat(path.with_name(path.name + "-wal"))
