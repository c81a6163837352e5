"""A new sqlite tracking file made whole before another client can open it, so that, normally, one client
alone runs MLflow's migrations on it.

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

What is left to chance: a client that sits on an empty file for longer than `EMPTY_QUIET_S` before its
first write; and where the folder has no hard links, or a crashed client's journal lies beside an absent
file (linking would replay it into the new file), the file is made in place, as MLflow does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Callable

from ..process import variables

QUIET_S = 2.0  # a file not made that has not changed for this long has nobody making it...
EMPTY_QUIET_S = 10.0  # ... or this long while it is empty (a client imports its migrations before writing)
WAIT_S = 120.0  # the longest we wait for another client that is still writing a store it has not made
NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.EINVAL, errno.ENOSYS)
JOURNALS = ("-journal", "-wal", "-shm")


def make_aside(path: Path, uri_of: Callable[[Path], str], create: Callable[[str], None]) -> bool:
    """Make a new store at `path` (absent) by `create(uri_of(private file))` beside it, then link it into
    place. False, with nothing made, when a journal of an earlier file lies there; False when the name was
    taken meanwhile (another client is making it) or the file system has no hard links: the caller then
    opens `path` as it is."""
    if any(_beside(path, suffix).exists() for suffix in JOURNALS):
        return False
    aside = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.new")
    try:
        # no pooled connection stays open on the private file once it is made (MLflow keeps its engines)
        with variables({"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}):
            create(uri_of(aside))
        try:
            os.link(aside, path)
        except FileExistsError:
            return False
        except OSError as exc:  # no hard links on this file system (some network, FUSE or FAT ones)
            if exc.errno in NO_LINKS:
                return False
            raise
        return True
    finally:
        for leftover in (aside, *(_beside(aside, suffix) for suffix in JOURNALS)):
            leftover.unlink(missing_ok=True)


def made(path: Path) -> bool:
    """Whether the sqlite file holds a whole MLflow store: MLflow creates the default experiment after its
    migrations are through, and a batch migration under way leaves an `_alembic_tmp_` table."""
    try:
        uri = path.resolve().as_uri() + "?mode=ro"  # any character of the path, escaped
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0.5)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables or any(t.startswith("_alembic_tmp_") for t in tables):
                return False
            return db.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] > 0
    except sqlite3.Error:  # locked by a migration under way, or not (yet) a database
        return False


def wait_until_made(path: Path, quiet_s: float = QUIET_S, empty_quiet_s: float = EMPTY_QUIET_S,
                    timeout_s: float = WAIT_S) -> bool:
    """Wait while another client makes the store at `path`: until it is made (True), or has not changed for
    `quiet_s` (`empty_quiet_s` while empty) (False: nobody is making it; MLflow will, or will say what is
    wrong with it). Raises TimeoutError if it is still changing, not made, after `timeout_s`."""
    started = time.monotonic()
    last, still_since = None, started
    while not made(path):
        now = time.monotonic()
        state = _state(path)
        empty = state[0] is None or state[0][0] == 0  # (size 0, or gone again)
        if state != last:
            last, still_since = state, now
        elif now - still_since >= (empty_quiet_s if empty else quiet_s):
            return False
        if now - started > timeout_s:
            raise TimeoutError(f"another process has been writing the MLflow store {path} for {timeout_s:.0f} s "
                               "without finishing it")
        time.sleep(0.1)
    return True


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _state(path: Path) -> tuple:
    """What changes while a client writes the file: the size and time of it and of its journals."""
    def stat(p: Path):
        try:
            s = p.stat()
            return s.st_size, s.st_mtime_ns
        except FileNotFoundError:
            return None

    return stat(path), *(stat(_beside(path, suffix)) for suffix in JOURNALS)
